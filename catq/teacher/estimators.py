"""Reference estimators: how the anchor turns G rollouts into one pseudo-reference s (DESIGN §1.2).

- ``synthesis`` (CaT, the default): the frozen anchor reads the rollouts — not the question —
  and writes a summary then a unified response; s is the unified response. When the anchor
  ignores the format, s is its whole output and ``format_fallback`` records that.
- ``majority`` (TTRL; math only): the most common final answer, answers grouped by mathematical
  equivalence; ties go to the answer that appeared first (lowest rollout index), so the rule is
  deterministic. s is the first rollout that gave it (rollout 1, flagged as a fallback, when no
  rollout has an answer). Open prompts in a majority run fall back
  to synthesis (``estimator`` records what was used).
- ``self_bon``: the policy reads the question and its rollouts and names the best; s is that
  rollout. An unreadable choice falls back to rollout 1 (``format_fallback``).
- ``min_ppl``: the rollout with the lowest mean token negative log-likelihood under the
  behaviour log-probs; ties go to the lowest index.
- ``mutual_predictability``: the rollout the anchor best predicts from the others
  (:mod:`catq.teacher.mutual_predictability`).

Each is an ``async def ..._estimate(group, *, anchor, policy, question, options)`` registered by
name in :mod:`catq.teacher.registry`, which :func:`estimate_reference` dispatches through.

The pure functions take plain data; :func:`estimate_reference` wires them to chat models given as
async callables (see :mod:`catq.teacher.chat`), so everything here is testable without an engine.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field, fields
from typing import Awaitable, Protocol

from catq.config import AnchorConfig
from catq.messages import ReferencedGroup, Rollout, RolloutGroup
from catq.teacher import prompts, registry
from catq.teacher.answers import (
    _matching_braces,
    answers_equivalent,
    final_answer,
    last_boxed,
    rollout_answer,
)
from catq.teacher.verify_pool import off_loop

ESTIMATORS = registry.ESTIMATORS
"""Every estimator by name (re-exported from :mod:`catq.teacher.registry`)."""


class ChatFn(Protocol):
    """A chat model: messages in, the assistant's reply out. ``prefix`` (where supported) starts
    the reply, which then includes it; ``temperature`` overrides the configured one."""

    def __call__(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                 prefix: str = "", max_new_tokens: int | None = None) -> Awaitable[str]: ...


@dataclass
class Reference:
    reference: str
    """The pseudo-reference s."""
    estimator: str
    """The estimator that produced it."""
    anchor_output: str
    """The raw model output behind it ("" for estimators without a model call)."""
    format_fallback: bool = False
    reference_answer: str | None = None
    """math: the final answer of s."""
    majority_answer: str | None = None
    """math: the majority answer of the rollouts (recorded whatever the estimator)."""
    answer_primed: bool = False
    """synthesis: the answer came from a primed final-answer continuation (s stated none)."""
    synthesis_answers: list[str | None] = field(default_factory=list)
    """synthesis with k > 1 samples: each sample's final answer, in draw order."""

    def referenced(self, group: RolloutGroup, *, rubric: list[str], anchor_version: int) -> ReferencedGroup:
        """The anchor's message for ``group``: this estimate plus the rubric drafted from it."""
        shared = {f.name: getattr(self, f.name) for f in fields(ReferencedGroup) if hasattr(self, f.name)}
        return ReferencedGroup(group=group, rubric=rubric, anchor_version=anchor_version, **shared)


_UNIFIED = re.compile(
    r"^[ \t#>*_-]*(?:\d+\.\s*)?unified[ \t]+response\b[ \t*_]*:?[ \t*_]*|<unified_response>",
    re.IGNORECASE | re.MULTILINE,
)
_UNIFIED_CLOSE = re.compile(r"</unified_response>", re.IGNORECASE)


def parse_unified_response(output: str) -> tuple[str, bool]:
    """(s, format_fallback): the text after the last "Unified response:" heading at the start of
    a line (markdown decorations and a ``<unified_response>`` tag accepted); the whole output,
    flagged, when the heading is missing or nothing but punctuation follows it. Mid-line mentions do not count:
    small models echo the instructions ('under the heading "Unified response:", write ...')."""
    matches = list(_UNIFIED.finditer(output))
    if matches:
        unified = output[matches[-1].end() :]
        unified = _UNIFIED_CLOSE.split(unified, maxsplit=1)[0].strip()
        if re.search(r"\w", unified):  # "Unified response: ..." is a copied template, not s
            return unified, False
    return output.strip(), True


def reference_final_answer(reference: str, anchor_output: str) -> str | None:
    """The reference's final answer: a box in s, else a box anywhere in the anchor's output
    (some models box the answer in the summary), else the usual fallbacks on s, its last number
    included. Tried and reverted (bench/cat_rl.py on Qwen2.5-Coder-0.5B, 29 CaT references): no
    last number when s states several, priming for one instead: right references 25 -> 19, and
    the primed continuation found an answer for 1 of 4 (the README's CaT-RL section)."""
    boxed = last_boxed(reference)
    if boxed is None:
        boxed = last_boxed(anchor_output)
    return final_answer("\\boxed{" + boxed + "}") if boxed is not None else final_answer(reference)


def synthesis_reference(output: str, task: str) -> Reference:
    """s from the anchor's output. Without the format, s is the whole output and its answer is a
    box, a stated answer ("the answer is 5") or a closing equation ("3 + 2 = 5"), but never just
    its last number: unformatted output often echoes the numbered instructions, whose last number
    would be a made-up reference answer; None gives the group no signal instead."""
    reference, fallback = parse_unified_response(output)
    answer = None
    if task == "math":
        answer = (final_answer(output, last_number=False) if fallback
                  else reference_final_answer(reference, output))
    return Reference(reference, "synthesis", output, fallback, reference_answer=answer)


def majority_vote(answers: list[str | None]) -> list[int]:
    """Indices of the rollouts in the winning equivalence class of final answers (most members;
    ties to the class whose first member comes first); [] when no rollout has an answer."""
    classes: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for members in classes:
            if answers_equivalent(answers[members[0]], answer):
                members.append(i)
                break
        else:
            classes.append([i])
    if not classes:
        return []
    return max(classes, key=lambda members: (len(members), -members[0]))


def majority_reference(group: RolloutGroup) -> Reference:
    answers = [rollout_answer(r.text, r.finish_reason) for r in group.rollouts]
    winners = majority_vote(answers)
    if not winners:
        return Reference(group.rollouts[0].text, "majority", "", format_fallback=True)
    answer = answers[winners[0]]
    return Reference(group.rollouts[winners[0]].text, "majority", "",
                     reference_answer=answer, majority_answer=answer)


def mean_nll(rollout: Rollout) -> float:
    """Mean negative log-likelihood per token under the behaviour policy; inf without log-probs."""
    if not rollout.logprobs:
        return math.inf
    return -sum(rollout.logprobs) / len(rollout.logprobs)


def min_ppl_index(rollouts: list[Rollout]) -> int:
    """The rollout with the lowest mean NLL (= lowest perplexity); lowest index on ties."""
    return min(range(len(rollouts)), key=lambda i: (mean_nll(rollouts[i]), i))


def min_ppl_reference(group: RolloutGroup) -> Reference:
    best = group.rollouts[min_ppl_index(group.rollouts)]
    return rollout_reference(best.text, "min_ppl", "", False, group.prompt.task)


def parse_selection(output: str, n: int) -> int | None:
    """0-based index of the response the selector named (the first number 1..n), or None."""
    for number in re.findall(r"\d+", output):
        if 1 <= int(number) <= n:
            return int(number) - 1
    return None


def self_bon_reference(group: RolloutGroup, output: str) -> Reference:
    index = parse_selection(output, len(group.rollouts))
    fallback = index is None
    text = group.rollouts[0 if fallback else index].text
    return rollout_reference(text, "self_bon", output, fallback, group.prompt.task)


def rollout_reference(text: str, estimator: str, output: str, fallback: bool, task: str) -> Reference:
    answer = final_answer(text) if task == "math" else None
    return Reference(text, estimator, output, fallback, reference_answer=answer)


FINAL_ANSWER_TOKENS = 16
"""Enough for any final answer; the primed continuation stops being read at its closing brace."""


def short_synthesis_reference(output: str, task: str) -> Reference:
    """s from the "short" prompt's output: all of it (there are no headings to look for)."""
    answer = final_answer(output, last_number=False) if task == "math" else None
    return Reference(output.strip(), "synthesis", output, False, reference_answer=answer)


def read_primed_answer(continuation: str) -> str | None:
    """What the anchor wrote inside the primed ``\\boxed{``: up to the matching brace, or to the
    end of the line when it never closed it; None when that is empty or too long to be an answer."""
    text = "\\boxed{" + continuation
    end = _matching_braces(text).get(len("\\boxed"))
    content = text[len("\\boxed{"):end] if end is not None else continuation.split("\n", 1)[0]
    content = content.strip().rstrip(".")
    if not content or len(content) > 40:
        return None
    return final_answer("\\boxed{" + content + "}") if end is not None else final_answer(content)


async def primed_final_answer(anchor: ChatFn, messages: list[dict[str, str]], output: str) -> str | None:
    """The final answer the anchor gives when its synthesis is continued with a final-answer
    line (engines), or asked for it in a follow-up turn (chat APIs that cannot continue)."""
    if getattr(anchor, "supports_prefix", True):
        start = output.rstrip() + prompts.FINAL_ANSWER_PRIME
        text = await anchor(messages, prefix=start, temperature=0.0, max_new_tokens=FINAL_ANSWER_TOKENS)
        return read_primed_answer(text[len(start):])
    follow_up = messages + [{"role": "assistant", "content": output},
                            {"role": "user", "content": prompts.FINAL_ANSWER_FOLLOW_UP}]
    return final_answer(await anchor(follow_up, temperature=0.0, max_new_tokens=2 * FINAL_ANSWER_TOKENS))


def synthesis_request(texts: list[str], task: str, question: str | None,
                      prompt: str) -> tuple[list[dict[str, str]], str]:
    """(messages, reply prefix) of the configured synthesis prompt (catq.teacher.prompts)."""
    return prompts.synthesis_request(texts, task, question, prompt)


async def one_synthesis(group: RolloutGroup, anchor: ChatFn, options: AnchorConfig, question: str | None,
                        temperature: float | None) -> Reference:
    task = group.prompt.task
    messages, prefix = synthesis_request([r.text for r in group.rollouts], task, question, options.prompt)
    output = await anchor(messages, prefix=prefix, temperature=temperature)
    ref = synthesis_reference(output, task) if prefix else short_synthesis_reference(output, task)
    if task == "math" and ref.reference_answer is None and options.prime_final_answer:
        ref.reference_answer = await primed_final_answer(anchor, messages, output)
        ref.answer_primed = ref.reference_answer is not None
    return ref


async def synthesize(group: RolloutGroup, anchor: ChatFn, options: AnchorConfig,
                     question: str | None) -> Reference:
    """CaT synthesis; with ``synthesis_samples = k > 1`` the answer most of the k syntheses
    state (ties: the first, drawn with the configured sampling) and a synthesis stating it."""
    temperatures = [None] + [options.synthesis_temperature] * (options.synthesis_samples - 1)
    refs = list(await asyncio.gather(*(one_synthesis(group, anchor, options, question, t) for t in temperatures)))
    if len(refs) == 1:
        return refs[0]
    answers = [r.reference_answer for r in refs]
    winners = await off_loop(majority_vote, answers) if group.prompt.task == "math" else []
    chosen = refs[winners[0]] if winners else refs[0]
    chosen.synthesis_answers = answers
    return chosen


async def synthesis_estimate(group: RolloutGroup, *, anchor: ChatFn, options: AnchorConfig,
                             question: str | None, **_) -> Reference:
    return await synthesize(group, anchor, options, question)


async def majority_estimate(group: RolloutGroup, **_) -> Reference:
    return await off_loop(majority_reference, group)


async def self_bon_estimate(group: RolloutGroup, *, policy: ChatFn, **_) -> Reference:
    # The policy always reads the question: it picks its own best answer to it.
    output = await policy(prompts.selection_messages(group.prompt.question, [r.text for r in group.rollouts]))
    return self_bon_reference(group, output)


async def min_ppl_estimate(group: RolloutGroup, **_) -> Reference:
    return min_ppl_reference(group)


async def estimate_reference(
    group: RolloutGroup,
    estimator: str,
    *,
    anchor: ChatFn,
    policy: ChatFn | None = None,
    include_question: bool = False,
    options: AnchorConfig | None = None,
) -> Reference:
    """The reference for a group with the named estimator (:data:`catq.teacher.registry.ESTIMATORS`;
    one that does not serve the prompt's task falls back to synthesis); for math the majority
    answer is filled in whatever the estimator (it is part of the per-prompt result).
    ``options`` (the run's ``[anchor]`` section) sets the synthesis prompt, priming and
    self-consistency; None keeps the paper's synthesis with priming."""
    task = group.prompt.task
    spec = registry.estimator(estimator)
    if task not in spec.tasks:
        spec = registry.estimator(registry.FALLBACK)
    if spec.needs_policy and policy is None:
        raise ValueError(f"{spec.name} needs the policy model")
    question = group.prompt.question if include_question else None
    ref = await spec.load()(group, anchor=anchor, policy=policy, question=question,
                            options=options or AnchorConfig())
    if task == "math" and ref.majority_answer is None:
        answers = [rollout_answer(r.text, r.finish_reason) for r in group.rollouts]
        winners = await off_loop(majority_vote, answers)
        ref.majority_answer = answers[winners[0]] if winners else None
    return ref
