"""The mutual_predictability estimator on a hand-computed example (catq.teacher.mutual_predictability),
with a fake anchor whose log-prob of a token is high when the context contains that word: pure logic."""

import math

import pytest

from catq.config import AnchorConfig
from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup
from catq.teacher import mutual_predictability as mp
from catq.teacher.estimators import estimate_reference

SEEN, UNSEEN = -0.1, -2.0


class WordTokenizer:
    """One token per whitespace-separated word."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids):
        return " ".join(self.words_of(ids))

    def words_of(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]

    def encode_chat(self, messages):
        return self.encode(" ".join(m["content"] for m in messages))


class WordClient:
    """completion_logprobs: SEEN for a word the prompt contains, UNSEEN otherwise."""

    def __init__(self, context_len=10_000):
        self.context_len = context_len
        self.prompts: list[list[int]] = []
        self.calls: list[tuple[list[int], list[int]]] = []

    async def context_length(self):
        return self.context_len

    async def completion_logprobs(self, prompt_ids, completions):
        self.prompts.append(prompt_ids)
        self.calls += [(prompt_ids, c) for c in completions]
        assert len(prompt_ids) + max(map(len, completions)) <= self.context_len
        return [[SEEN if t in prompt_ids else UNSEEN for t in c] for c in completions]


class WordAnchor:
    def __init__(self, context_len=10_000):
        self.tokenizer = WordTokenizer()
        self.client = WordClient(context_len)


def make_group(texts, task="math"):
    rollouts = [Rollout(t, [1] * max(len(t.split()), 1), [-1.0] * max(len(t.split()), 1), "stop") for t in texts]
    return RolloutGroup(Prompt("p1", task, [ChatMessage("user", "What is 2 + 2?")]), [1, 2], rollouts, 0)


TEXTS = ["two plus two is \\boxed{4}", "two plus two is \\boxed{4} indeed", "cats purr"]


async def test_scores_by_hand():
    # #1 given #2 and #3: all 5 words seen -> -0.1. #2 given #1 and #3: "indeed" unseen ->
    # (5 * -0.1 - 2) / 6. #3 given #1 and #2: both unseen -> -2.
    scores = await mp.predictability_scores(make_group(TEXTS), WordAnchor(), None)
    assert scores == pytest.approx([-0.1, (5 * SEEN + UNSEEN) / 6, UNSEEN])


async def test_picks_the_most_predictable_rollout():
    ref = await estimate_reference(make_group(TEXTS), "mutual_predictability", anchor=WordAnchor())
    assert ref.estimator == "mutual_predictability"
    assert ref.reference == TEXTS[0] and ref.reference_answer == "4" and not ref.format_fallback
    assert ref.anchor_output.startswith("mean log-prob given the others: #1 -0.100")


async def test_each_rollout_is_predicted_from_the_others_only():
    anchor = WordAnchor()
    await mp.predictability_scores(make_group(["alpha", "beta", "gamma"]), anchor, None)
    context_of = {" ".join(anchor.tokenizer.words_of(c)): set(anchor.tokenizer.words_of(p))
                  for p, c in anchor.client.calls}
    assert context_of.keys() == {"alpha", "beta", "gamma"}
    for own, context in context_of.items():
        assert context & {"alpha", "beta", "gamma"} == {"alpha", "beta", "gamma"} - {own}


async def test_the_question_is_shown_only_when_asked():
    anchor = WordAnchor()
    await mp.predictability_scores(make_group(["a b", "a c"]), anchor, None)
    assert not any("Question:" in anchor.tokenizer.words_of(p) for p in anchor.client.prompts)
    await mp.predictability_scores(make_group(["a b", "a c"]), anchor, "What is 2 + 2?")
    assert "Question:" in anchor.tokenizer.words_of(anchor.client.prompts[-1])


def test_ties_go_to_the_lowest_index_and_empty_rollouts_lose():
    assert mp.most_predictable([-1.0, -0.5, -0.5]) == 1
    assert mp.mean_logprob([]) == -math.inf
    assert mp.most_predictable([-math.inf, -3.0]) == 1


async def test_a_single_rollout_is_the_reference_without_a_request():
    anchor = WordAnchor()
    ref = await estimate_reference(make_group(["\\boxed{4}"]), "mutual_predictability", anchor=anchor)
    assert ref.reference == "\\boxed{4}" and anchor.client.prompts == []


async def test_no_scorable_rollout_is_flagged():
    ref = await estimate_reference(make_group(["", ""]), "mutual_predictability", anchor=WordAnchor())
    assert ref.format_fallback and ref.reference == ""


def test_fit_context_shares_the_room_equally_and_keeps_beginnings():
    ids = [list(range(10)), list(range(100, 140)), list(range(200, 240))]
    others, scored = mp.fit_context(ids, 0, context_len=68, overhead=9)
    assert scored == ids[0]
    assert others == [ids[1][:20], ids[2][:20]]  # room 68 - 9 - 10 - 2 * 4 seams = 41, 20 each
    others, scored = mp.fit_context(ids, 1, context_len=60, overhead=9)
    assert scored == ids[1][:30]  # at most half the context
    assert mp.fit_context(ids, 0, context_len=1000, overhead=9) == ([ids[1], ids[2]], ids[0])


async def test_long_groups_are_cut_to_fit_the_engine_context():
    texts = [" ".join(f"w{k}" for k in range(n)) for n in (30, 40, 50)]
    anchor = WordAnchor(context_len=64)
    scores = await mp.predictability_scores(make_group(texts), anchor, None)  # the client asserts the fit
    assert len(anchor.client.prompts) == 3 and all(math.isfinite(s) for s in scores)


async def test_an_openai_anchor_is_refused_with_a_reason():
    class OpenAIAnchor:
        tokenizer = WordTokenizer()

    with pytest.raises(ValueError, match="needs an engine anchor"):
        await estimate_reference(make_group(TEXTS), "mutual_predictability", anchor=OpenAIAnchor(),
                                 options=AnchorConfig())
