"""What `catq demo` prints: progress, the open questions with their rubrics, and the before/after
summary taken from `catq eval`'s results."""

from catq.demo import DemoPrompt, Progress, open_report, summary
from catq.evaluation.datasets import training_split
from catq.evaluation.stats import interval

OPEN = [DemoPrompt("Is tea healthy?", "open", None), DemoPrompt("How do I sleep better?", "open", None),
        DemoPrompt("What helps a cold?", "open", None)]


def test_progress_line_names_steps_version_reward_and_open_questions():
    line = Progress(65.0, 7, 20, 7, 0.6875, 0.5, 2, 4).line()
    assert "learner step 7/20" in line and "policy v7" in line
    assert "reward 0.69" in line and "groups with signal 0.50" in line and "open questions 2/4" in line
    assert "reward -" in Progress(5.0, 0, 20, 0, None, None, 0, 4).line()


def test_progress_line_without_a_step_target_or_open_questions_leaves_them_out():
    line = Progress(30.0, 3, None, 3, 0.5, 1.0, 0, 0).line()
    assert "learner step 3  " in line and "/" not in line.split("policy")[0] and "open questions" not in line


def test_open_report_prints_each_rubric_and_says_why_a_question_has_none():
    results = [{"status": "scored", "rubric": ["Mentions caffeine", "Is short"], "reward_mean": 0.5,
                "rubric_short": True, "cat_answer": "Yes,\nin moderation."},
               {"status": "dead", "error": "no criteria in 4 drafts"},
               {"status": "rolled_out"}]
    text = "\n".join(open_report(OPEN, results))
    assert "rubric, 2 criteria (short rubric); mean reward 0.50" in text
    assert "    - Mentions caffeine" in text and "    - Is short" in text
    assert "CaT answer: Yes, in moderation." in text
    assert "failed: no criteria in 4 drafts" in text
    assert "not finished when training ended (rolled_out)" in text


def test_summary_reports_the_paired_difference_steps_and_versions():
    results = {"meta": {"prompts": 40}, "differences": [{
        "from": "v0", "to": "v20", "single_from": interval(0.53, 0.43, 0.62, 40),
        "single_to": interval(0.71, 0.62, 0.79, 40), "difference": interval(0.18, 0.09, 0.27, 40)}]}
    metrics = [{"step": s, "policy_version": s, "signal_frac": 0.5 if s % 2 else 0.0} for s in range(1, 21)]
    text = summary(results, metrics, 840.0)
    assert "learner steps 20 (10 with signal), policy versions published 20, demo wall time 840s" in text
    assert "v0 0.53 [0.43, 0.62] -> v20 0.71 [0.62, 0.79]: +0.18 [+0.09, +0.27]" in text


def test_the_training_and_held_out_splits_never_share_a_question():
    train, held_out = training_split(40)
    assert len(held_out) == 40 and len(train) == 162 - 40
    assert not {p["text"] for p in train} & {p["text"] for p in held_out}
    assert training_split(40) == (train, held_out)  # seeded: the same split every run


def test_open_report_says_when_a_question_got_no_usable_rubric_instead_of_a_reward():
    results = [{"status": "dead", "cat_answer": "Drink water.", "error": "no valid rubric after 3 attempts: "
                "draft 1: no usable <criterion> elements (2 about the rubric or its instructions)"}]
    text = "\n".join(open_report(OPEN[:1], results))
    assert "no usable rubric, so no reward" in text and "mean reward" not in text
    assert "CaT answer: Drink water." in text


def test_v0_is_measured_on_the_anchor_engine_only_where_it_serves_the_initial_policy():
    from catq.config import load_config
    from catq.demo import DEFAULT_CONFIG
    from catq.demo_measure import anchor_serves_initial_policy, later_estimators

    config = load_config(DEFAULT_CONFIG, run="x")
    assert anchor_serves_initial_policy(config)
    other = config.model_copy(update={"model": config.model.model_copy(update={"anchor": "/models/other"})})
    assert not anchor_serves_initial_policy(other)
    assert later_estimators("synthesis,majority") == ["majority"] and later_estimators("synthesis") is None
