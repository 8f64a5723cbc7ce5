"""bench/cat_rl.py --smoke: both training arms (synthesis and majority rewards) take at least 2
learner steps through `catq up` on the default model, are evaluated on the same held-out
questions, and their reward accuracy is computed from known answers the pipeline never saw."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two arms of >= 2 steps, then three evaluations


def test_smoke_trains_both_arms_and_scores_their_rewards_against_withheld_answers(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run([sys.executable, "bench/cat_rl.py", "--smoke", "--dir", str(tmp_path), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=1700)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"^ratio cat/ttrl \(gain in held-out single-sample accuracy\) (-?\d+\.\d\d|nan)$",
                     result.stdout, re.M)

    summary = json.loads(out.read_text())
    assert set(summary["arms"]) == {"cat", "ttrl", "none"} and "ratio_cat_ttrl" in summary
    for arm in ("cat", "ttrl"):
        row = summary["arms"][arm]
        assert row["steps"] >= 2
        assert 0.0 <= row["reward_accuracy"] <= 1.0 and 0.0 <= row["reference_accuracy"] <= 1.0
        assert row["groups_scored"] >= 2 and set(row) >= {"gain", "gain_ci"}
    assert (tmp_path / "table.png").stat().st_size > 0

    # the same held-out questions for every version evaluated
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [v["label"] for v in results["versions"]] == ["v0", "cat-final", "ttrl-final"]
    questions = [{p["question"] for p in v["prompts"]} for v in results["versions"]]
    assert questions[0] == questions[1] == questions[2] and len(questions[0]) == 3

    # the answers were never submitted: no known answer (nor an "answer" field) reached a
    # training prompt, and no held-out question was trained on
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    for arm in ("cat", "ttrl"):
        groups = [json.loads(line) for line in (tmp_path / arm / "groups.jsonl").read_text().splitlines()]
        assert [g["question"] for g in groups if "question" in g] == \
            [p["text"] for p, g in zip(train, groups) if "question" in g]
        assert all("answer" not in g for g in groups)
    assert not questions[0] & {p["text"] for p in train}
