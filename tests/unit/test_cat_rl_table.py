"""bench/cat_rl.py's reading of training groups against the withheld answers, and its config
writer (pure parts; the run itself is tests/integration/test_bench_cat_rl.py)."""

import pytest

from bench.cat_rl import accuracy_by_version, reference_accuracy, reward_accuracy, set_key

KEY = {"p1": "12", "p2": "7"}
GROUPS = [
    # majority wrong (10), reference wrong: rewards 1 on wrong rollouts, 0 on the right one
    {"prompt_id": "p1", "policy_version": 0, "rewards": [1.0, 1.0, 0.0, 0.0],
     "rollout_answers": ["10", "10", "12", None], "reference_answer": "10"},
    # reference right: every reward equals correctness
    {"prompt_id": "p2", "policy_version": 1, "rewards": [1.0, 0.0, 1.0, 0.0],
     "rollout_answers": ["7", "8", "7.0", "9 \\text{ apples}"], "reference_answer": "7"},
    # not scored yet (still in the pipeline): left out
    {"prompt_id": "p2", "policy_version": 1, "status": "rolled_out"},
]


def test_reward_accuracy_compares_each_reward_with_the_true_correctness():
    # p1: rollouts 0, 1 rewarded but wrong, 2 right but unrewarded, 3 neither: 1 of 4 agree
    assert reward_accuracy(GROUPS, KEY)["value"] == pytest.approx(5 / 8)
    assert reward_accuracy(GROUPS, KEY)["n"] == 8


def test_reference_accuracy_is_the_share_of_groups_with_a_right_reference():
    assert reference_accuracy(GROUPS, KEY)["value"] == pytest.approx(0.5)
    no_reference = [{**GROUPS[0], "reference_answer": None}]
    assert reference_accuracy(no_reference, KEY)["value"] == 0.0


def test_accuracy_by_version_uses_the_known_answers():
    assert accuracy_by_version(GROUPS, KEY) == {0: 0.25, 1: 0.5}


def test_set_key_replaces_within_its_section_or_adds_it():
    text = "[a]\nx = 1\n\n[b]\nx = 2  # note\n"
    assert set_key(text, "b", "x", "3") == "[a]\nx = 1\n\n[b]\nx = 3\n"
    assert set_key(text, "a", "y", "true") == "[a]\ny = true\nx = 1\n\n[b]\nx = 2  # note\n"
