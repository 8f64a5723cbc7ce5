"""`catq eval` on benchmark files as published (MATH-500, HealthBench), written by the test, with
the engines it starts itself on the default model: results broken down by subject and level,
HealthBench responses graded by the real judge against their rubrics and scored as HealthBench."""

from __future__ import annotations

import json

import pytest

from catq.evaluation.formats import RubricItem
from catq.evaluation.healthbench import healthbench_score

from .test_eval_cli import catq_eval

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # two engines load in ~20 s alone, minutes on a busy 2-core box

CONFIG = """
run = "evalformats"
run_dir = "{run_dir}"
[rollout.math]
max_new_tokens = 24
[rollout.open]
max_new_tokens = 24
[anchor.sampling]
temperature = 0.0
max_new_tokens = 32
[anchor]
prime_final_answer = false
"""

MATH500 = [
    {"problem": "What is $3 + 4$?", "solution": "$3+4=\\boxed{7}$.", "answer": "7", "subject": "Prealgebra",
     "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Solve $2x = 10$ for $x$.", "solution": "$x=\\boxed{5}$.", "answer": "5", "subject": "Algebra",
     "level": 2, "unique_id": "test/algebra/2.json"},
]
RUBRICS = [{"criterion": "Advises drinking water", "points": 5, "tags": ["axis:accuracy"]},
           {"criterion": "Recommends seeing a doctor if it lasts", "points": 3, "tags": []},
           {"criterion": "Recommends an unproven remedy", "points": -4, "tags": ["axis:safety"]}]
HEALTHBENCH = [
    {"prompt": [{"role": "user", "content": "I have a mild headache. What can I do?"}], "rubrics": RUBRICS,
     "example_tags": ["theme:context_seeking"], "prompt_id": "hb-a"},
    {"prompt": [{"role": "user", "content": "I feel dizzy after running."},
                {"role": "assistant", "content": "How long did you run?"},
                {"role": "user", "content": "An hour, in the sun."}],
     "rubrics": RUBRICS[:2], "example_tags": ["theme:emergency_referrals"], "prompt_id": "hb-b"},
]


def write_files(tmp_path, records: list[dict], name: str) -> tuple[str, str]:
    (tmp_path / "eval.toml").write_text(CONFIG.format(run_dir=tmp_path / "run"))
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(tmp_path / "eval.toml"), str(data)


def test_math500_results_are_broken_down_by_subject_and_level(tmp_path):
    config, data = write_files(tmp_path, MATH500, "math500.jsonl")
    out = tmp_path / "out"
    result = catq_eval("--data", data, "--format", "math500", "--group-size", "2", "--estimators", "majority",
                       "--no-scaling", "--config", config, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["format"] == "math500" and results["meta"]["scoring"] == "answer"
    (version,) = results["versions"]
    prompts = version["prompts"]
    assert [p["label"] for p in prompts] == ["test/prealgebra/1.json", "test/algebra/2.json"]
    assert [p["known"] for p in prompts] == ["7", "5"]
    assert prompts[0]["metadata"] == {"subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}
    by_subject = {row["value"]: row for row in version["by_group"]["subject"]}
    assert set(by_subject) == {"Prealgebra", "Algebra"} and [r["value"] for r in version["by_group"]["level"]] == ["1", "2"]
    for prompt in prompts:  # each subject's row is its one prompt's figures
        row = by_subject[prompt["groups"]["subject"]]
        assert row["n"] == 1 and row["single"]["value"] == pytest.approx(sum(prompt["rollout_correct"]) / 2)
        assert row["estimators"]["majority"]["value"] == float(prompt["references"]["2"]["majority"]["correct"])
    assert "by subject" in result.stdout and "by level" in result.stdout and "Prealgebra" in result.stdout
    assert "by subject" in (out / "report.md").read_text()


def test_healthbench_responses_are_graded_by_the_judge_against_their_rubrics(tmp_path):
    config, data = write_files(tmp_path, HEALTHBENCH, "healthbench.jsonl")
    out = tmp_path / "out"
    result = catq_eval("--data", data, "--group-size", "2", "--estimators", "synthesis,majority,min_ppl",
                       "--no-scaling", "--config", config, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["scoring"] == "rubric" and results["meta"]["estimators"] == ["synthesis", "min_ppl"]
    (version,) = results["versions"]
    prompts = version["prompts"]
    assert [p["label"] for p in prompts] == ["hb-a", "hb-b"]
    for prompt, record in zip(prompts, HEALTHBENCH):
        rubric = [RubricItem(r["criterion"], r["points"], r["tags"]) for r in record["rubrics"]]
        met = prompt["rollout_criteria_met"]
        assert len(met) == 2 and all(len(m) == len(rubric) for m in met)  # one verdict per criterion
        assert prompt["rollout_scores"] == [pytest.approx(healthbench_score(rubric, m)) for m in met]
        for outcome in prompt["references"]["2"].values():
            assert 0.0 <= outcome["score"] <= 1.0
        assert prompt["references"]["2"]["min_ppl"]["reference"] in prompt["rollouts"]
    full = version["by_g"][-1]
    singles = [sum(p["rollout_scores"]) / 2 for p in prompts]
    assert full["single"]["value"] == pytest.approx(sum(singles) / 2)
    assert [r["value"] for r in version["by_group"]["theme"]] == ["context_seeking", "emergency_referrals"]
    assert "HealthBench score" in result.stdout and "by theme" in result.stdout
