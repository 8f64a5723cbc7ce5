"""reward.math_match: math-verify equivalence (default) vs the paper's last-\\boxed{} string match."""

from __future__ import annotations

import pytest

from catq.config import Config, ConfigError, JudgeConfig, load_config
from catq.evaluation.records import is_correct
from catq.evaluation.report import render
from catq.messages import ChatMessage, Prompt, ReferencedGroup, Rollout, RolloutGroup
from catq.teacher.answers import answers_match, response_answer
from catq.teacher.judging import math_reference_answer, score_group

# (rollout text, reference answer, rewarded under "equivalent", under "boxed_exact")
CASES = [
    ("so the answer is \\boxed{1/2}", "0.5", True, False),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", True, True),  # nested braces read whole
    ("\\boxed{ \\frac{1}{2} }", "\\frac {1}{2}", True, True),  # only whitespace normalised
    ("\\boxed{\\frac{1}{2}}", "1/2", True, False),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", True, False),
    ("The answer is 0.5", "0.5", True, False),  # no box: boxed_exact has no answer
    ("first \\boxed{3}, then \\boxed{4}", "4", True, True),  # the last box counts
    ("\\boxed{4}", "5", False, False),
]


@pytest.mark.parametrize("text, reference, equivalent, boxed_exact", CASES)
def test_match_table(text, reference, equivalent, boxed_exact):
    assert answers_match(response_answer(text, "equivalent"), reference, "equivalent") is equivalent
    assert answers_match(response_answer(text, "boxed_exact"), reference, "boxed_exact") is boxed_exact


def test_boxed_exact_reads_only_a_box():
    assert response_answer("\\boxed{\\frac{1}{2}}", "boxed_exact") == "\\frac{1}{2}"
    assert response_answer("the answer is 7", "boxed_exact") is None
    assert response_answer("the answer is 7", "equivalent") == "7"
    assert not answers_match(None, None, "boxed_exact")


def referenced(reference: str, anchor_output: str, reference_answer: str | None, rollouts: list[str]):
    group = RolloutGroup(Prompt("p", "math", [ChatMessage("user", "q")]), [1],
                         [Rollout(t, [1], [-1.0], "stop") for t in rollouts], 0)
    return ReferencedGroup(group, reference, "synthesis", anchor_output, reference_answer=reference_answer)


async def test_the_judge_scores_with_the_configured_match():
    ref = referenced("So \\boxed{\\frac{1}{2}}.", "Summary: ...", "\\frac{1}{2}",
                     ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "it is 1/2"])
    equivalent = await score_group(ref, None, JudgeConfig())
    exact = await score_group(ref, None, JudgeConfig(), "boxed_exact")
    assert equivalent.rewards == [1.0, 1.0, 1.0]
    assert exact.rewards == [0.0, 1.0, 0.0] and exact.rollout_answers == ["0.5", "\\frac{1}{2}", None]


def test_boxed_exact_reference_is_a_box_the_anchor_wrote():
    # A primed or stated answer (catq's additions) is not the paper's reference: no box, no answer.
    assert math_reference_answer("no box here", "Summary: no box", "7", "boxed_exact") is None
    assert math_reference_answer("no box here", "Summary: \\boxed{7}", "7", "boxed_exact") == "7"
    assert math_reference_answer("no box here", "", "7", "equivalent") == "7"


def test_eval_correctness_follows_the_match():
    assert is_correct("0.5", "\\frac{1}{2}") and not is_correct("0.5", "\\frac{1}{2}", "boxed_exact")
    assert is_correct("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}", "boxed_exact")  # a boxed known answer


def test_config_and_report_name_the_match(tmp_path):
    assert Config().reward.math_match == "equivalent"
    path = tmp_path / "c.toml"
    path.write_text('[reward]\nmath_match = "boxed_exact"\n')
    assert load_config(path).reward.math_match == "boxed_exact"
    path.write_text('[reward]\nmath_match = "loose"\n')
    with pytest.raises(ConfigError, match="math_match"):
        load_config(path)
    meta = {"prompts": 1, "data": "d", "group_size": 2, "policy": "p", "anchor": "a", "wall_time_s": 1.0,
            "math_match": "boxed_exact", "synthesis_prompt": "paper"}
    text = render({"meta": meta, "versions": []})
    assert "math_match = boxed_exact" in text and "synthesis prompt: paper" in text
