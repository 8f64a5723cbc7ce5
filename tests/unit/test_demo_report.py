"""The demo's closing table is computed by `catq eval`'s code, with intervals."""

from catq.config import load_config
from catq.demo import DemoPrompt, Progress, demo_records, report


def finished(reference, majority, answers, rewards):
    return {"status": "scored", "reference_answer": reference, "majority_answer": majority,
            "rollout_answers": answers, "rewards": rewards, "estimator": "synthesis",
            "rollouts": [f"\\boxed{{{a}}}" for a in answers], "cat_answer": f"\\boxed{{{reference}}}"}


PROMPTS = [DemoPrompt("What is 2 + 3?", "math", "5"), DemoPrompt("What is 2 * 3?", "math", "6"),
           DemoPrompt("Is tea healthy?", "open", None), DemoPrompt("What is 1 + 1?", "math", "2")]
RESULTS = [finished("5", "5", ["5", "5", "4", "5"], [1.0, 1.0, 0.0, 1.0]),
           finished(None, "5", ["5", "5", "6", "6"], [0.0, 0.0, 0.0, 0.0]),
           {"status": "scored", "rubric": ["a"], "reward_mean": 0.5, "cat_answer": "Yes."},
           {"status": "dead", "error": "boom"}]


def test_records_hold_only_finished_math_prompts_with_both_references():
    records, estimators = demo_records(PROMPTS, RESULTS)
    assert [r.known for r in records] == ["5", "6"]
    assert estimators == ["synthesis", "majority"]
    assert records[1].references[4]["synthesis"].present is False
    assert records[1].references[4]["majority"].rewards == [1.0, 1.0, 0.0, 0.0]


def test_the_table_has_intervals_and_eval_figures():
    config = load_config(None)
    config.rollout.group_size = 4
    text = report(PROMPTS, RESULTS, config, Progress(3, 1, 4, 1, 2, 0.5, 60.0))
    table = text[text.index("math accuracy over 2 prompts"):]
    assert "single sample  0.62 [" in table  # (3/4 + 2/4) / 2
    assert "synthesis      0.50 [0.09, 0.91]" in table  # Wilson 1/2
    assert "majority       0.50 [0.09, 0.91]" in table
    assert "pass@4         1.00" in table
