"""The ``mutual_predictability`` estimator: s is the rollout the frozen anchor best predicts
from the other rollouts of its group.

Source. CaT (Jayalath et al., 2025, arXiv 2509.14234) lists mutual predictability among the
selection baselines synthesis is compared with; the measure is ICM's (Wen et al., 2025,
"Unsupervised Elicitation of Language Models", arXiv 2506.10139): a labelling is coherent when
each label is likely given all the others in context, P(D) = Σ_i log P(y_i | x_i, D \\ {(x_i, y_i)}).
Applied to one group of G answers to one question, each rollout's score is how well the anchor
predicts it given the other G - 1:

    score_i = (1 / |o_i|) Σ_t log π_anchor(o_i,t | others(i), o_i,<t)
    s       = o_argmax_i score_i                 (ties: the lowest index)

where others(i) is one user turn listing the other rollouts (and the question only with
``anchor.include_question``, as for synthesis) and o_i is the assistant's reply. The CaT paper's
text we could read states no formula of its own; what is ours: the per-token mean (ICM's labels
are a word or two; on free text of unequal length a sum would pick the shortest rollout) and the
wording of the context turn.

The log-probs come from the anchor engine in prefill-only requests (SGLang's
``max_new_tokens: 0`` with ``logprob_start_len``, :meth:`catq.engines.client.EngineClient.completion_logprobs`,
as for the KL term), G of them per group, run concurrently. Where the G - 1 others do not fit the
engine's context, each is cut to an equal share of the room left (:func:`fit_context`), keeping
its beginning.
"""

from __future__ import annotations

import asyncio
import math

from catq.config import AnchorConfig
from catq.messages import RolloutGroup
from catq.teacher.estimators import Reference, rollout_reference

CONTEXT_INTRO = "Here are answers to a question, each written independently:"
CONTEXT_ASK = "Write another answer to the same question."
SEAM_TOKENS = 4
"""Context tokens kept free per other rollout when they must be cut (re-tokenization slack)."""


def context_messages(others: list[str], question: str | None = None) -> list[dict[str, str]]:
    """The user turn the anchor reads before predicting one rollout: the other rollouts."""
    parts = [f"Question: {question}"] if question else []
    parts.append(CONTEXT_INTRO)
    parts += [f"Answer {k}:\n{text}" for k, text in enumerate(others, 1)]
    parts.append(CONTEXT_ASK)
    return [{"role": "user", "content": "\n\n".join(parts)}]


def mean_logprob(logprobs: list[float]) -> float:
    """The per-token mean; -inf for a rollout with no tokens (it cannot be chosen over any other)."""
    return sum(logprobs) / len(logprobs) if logprobs else -math.inf


def most_predictable(scores: list[float]) -> int:
    """Index of the highest score; the lowest index on ties."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def fit_context(token_ids: list[list[int]], i: int, context_len: int, overhead: int) -> tuple[list[list[int]], list[int]]:
    """(the others' token ids, rollout i's scored token ids) cut to fit ``context_len`` tokens
    with ``overhead`` tokens of template: rollout i keeps at most half the context, the others
    share what is left equally (each keeps its beginning)."""
    scored = token_ids[i][: context_len // 2]
    others = token_ids[:i] + token_ids[i + 1:]
    if not others:
        return [], scored
    # A cut text is decoded and encoded again inside the template: allow a few tokens of
    # difference at each seam.
    room = max(context_len - overhead - len(scored) - SEAM_TOKENS * len(others), 0)
    if sum(map(len, others)) <= room:
        return others, scored
    share = room // len(others)
    return [ids[:share] for ids in others], scored


async def predictability_scores(group: RolloutGroup, anchor, question: str | None) -> list[float]:
    """score_i of every rollout (see the module docstring), from the anchor engine."""
    tokenizer, client = anchor.tokenizer, getattr(anchor, "client", None)
    if client is None or not hasattr(client, "completion_logprobs"):
        raise ValueError("mutual_predictability needs an engine anchor (prefill log-probs), "
                         "not an OpenAI-compatible endpoint")
    ids = [tokenizer.encode(r.text) for r in group.rollouts]
    context_len = await client.context_length()
    overhead = len(tokenizer.encode_chat(context_messages([""] * (len(ids) - 1), question)))

    texts = [r.text for r in group.rollouts]

    async def score(i: int) -> float:
        others, scored = fit_context(ids, i, context_len, overhead)
        if not scored:
            return -math.inf
        whole = [t for j, t in enumerate(texts) if j != i]
        shown = [t if len(o) == len(ids_j) else tokenizer.decode(o)
                 for t, o, ids_j in zip(whole, others, ids[:i] + ids[i + 1:])]
        prompt = tokenizer.encode_chat(context_messages(shown, question))
        (logprobs,) = await client.completion_logprobs(prompt, [scored])
        return mean_logprob(logprobs)

    return list(await asyncio.gather(*(score(i) for i in range(len(ids)))))


def describe(scores: list[float]) -> str:
    """The scores as one readable line (kept as the reference's ``anchor_output``)."""
    return "mean log-prob given the others: " + ", ".join(f"#{k} {s:.3f}" for k, s in enumerate(scores, 1))


async def estimate(group: RolloutGroup, *, anchor, question: str | None,
                   options: AnchorConfig | None = None, **_) -> Reference:
    if len(group.rollouts) == 1:  # nothing to predict it from: the one rollout is s
        return rollout_reference(group.rollouts[0].text, "mutual_predictability", "", False, group.prompt.task)
    scores = await predictability_scores(group, anchor, question)
    best = most_predictable(scores)
    fallback = math.isinf(scores[best])  # no rollout had a token to score
    return rollout_reference(group.rollouts[best].text, "mutual_predictability", describe(scores),
                             fallback, group.prompt.task)
