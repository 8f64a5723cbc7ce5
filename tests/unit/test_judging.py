"""Rewards: math equivalence, strict yes/no judging, concurrency, length penalty (catq.teacher.judging)."""

import asyncio

import pytest

from catq.config import JudgeConfig
from catq.messages import ChatMessage, Prompt, ReferencedGroup, Rollout, RolloutGroup
from catq.teacher.judging import (
    apply_length_penalty,
    parse_yes_no,
    score_group,
    score_math,
)


def rollouts(texts, tokens=3):
    return [Rollout(t, [1] * tokens, [-1.0] * tokens, "stop") for t in texts]


def referenced(texts, task, reference_answer=None, rubric=()):
    prompt = Prompt("p", task, [ChatMessage("user", "How do I sleep better?")])
    group = RolloutGroup(prompt, [1], rollouts(texts), policy_version=0)
    return ReferencedGroup(group, "ref", "synthesis", "out", reference_answer=reference_answer, rubric=list(rubric))


@pytest.mark.parametrize(
    "reply,expected",
    [("yes", True), ("No", False), (" Yes.", True), ("**No**", False), ('"yes"', True),
     ("No, it does not.", False), ("YES\n", True), ("I think yes", None), ("yes/no", None),
     ("Yesterday", None), ("", None), ("nope", None), ("Yes and no", None), ("Not sure", None)],
)
def test_parse_yes_no_is_strict(reply, expected):
    assert parse_yes_no(reply) is expected


def test_score_math():
    rewards, answers = score_math(rollouts(["\\boxed{0.5}", "1/2", "\\boxed{3}", "nothing"]), "\\frac{1}{2}")
    assert rewards == [1.0, 1.0, 0.0, 0.0] and answers == ["0.5", "1/2", "3", None]
    assert score_math(rollouts(["\\boxed{1}"]), None)[0] == [0.0]


class ScriptedJudge:
    """Answers by criterion text; tracks how many calls run at once."""

    def __init__(self, replies):
        self.replies = replies
        self.running = 0
        self.peak = 0
        self.calls = []

    async def __call__(self, messages, *, temperature=None, prefix=""):
        self.running += 1
        self.peak = max(self.peak, self.running)
        await asyncio.sleep(0.01)
        self.running -= 1
        self.calls.append(messages)
        criterion = messages[1]["content"].split("<criterion>\n")[1].split("\n</criterion>")[0]
        response = messages[1]["content"].split("<response>\n")[1].split("\n</response>")[0]
        reply = self.replies[(response, criterion)]
        return reply.pop(0) if isinstance(reply, list) else reply


async def test_open_rewards_are_fractions_with_retries_and_unparsed_verdicts():
    replies = {
        ("r0", "c0"): "yes", ("r0", "c1"): "yes",
        ("r1", "c0"): ["maybe", "Yes."], ("r1", "c1"): "no",
        ("r2", "c0"): "perhaps", ("r2", "c1"): "no",
    }
    judge = ScriptedJudge(replies)
    scored = await score_group(referenced(["r0", "r1", "r2"], "open", rubric=["c0", "c1"]), judge,
                               JudgeConfig(attempts=2, concurrency=2))
    assert scored.rewards == [1.0, 0.5, 0.0]
    by_pair = {(v.rollout_index, v.criterion_index): v for v in scored.verdicts}
    assert by_pair[(1, 0)].satisfied and by_pair[(1, 0)].parsed
    assert not by_pair[(2, 0)].satisfied and not by_pair[(2, 0)].parsed and by_pair[(2, 0)].raw == "perhaps"
    assert len(scored.verdicts) == 6 and len(judge.calls) == 8
    retry = [m for m in judge.calls if len(m) == 4]
    assert retry and retry[0][2] == {"role": "assistant", "content": "maybe"}
    assert judge.peak == 2


async def test_judge_calls_run_concurrently_up_to_the_limit():
    texts = [f"r{i}" for i in range(4)]
    rubric = [f"c{j}" for j in range(5)]
    judge = ScriptedJudge({(t, c): "yes" for t in texts for c in rubric})
    scored = await score_group(referenced(texts, "open", rubric=rubric), judge, JudgeConfig(concurrency=6))
    assert scored.rewards == [1.0] * 4 and judge.peak == 6


async def test_math_scoring_needs_no_judge():
    scored = await score_group(referenced(["\\boxed{2}", "\\boxed{3}"], "math", "2"), None, JudgeConfig())
    assert scored.rewards == [1.0, 0.0] and scored.rollout_answers == ["2", "3"] and scored.verdicts == []


def test_length_penalty():
    group = [Rollout("a", [1] * 10, [0.0] * 10, "stop"), Rollout("b", [1] * 3, [0.0] * 3, "stop")]
    assert apply_length_penalty([0.5, 0.5], group, 0) == [0.5, 0.5]
    assert apply_length_penalty([0.5, 0.5], group, 5) == [-1.0, 0.5]
