"""bench/learning.py in its shortened mode: both arms (catq's pipeline and the minimal synchronous
loop) train at least 2 steps on the default model, then v0 and both final policies are evaluated
on the same held-out problems and the ratio of the gains is printed."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # two arms of up to --budget-s each, then three evaluations


def test_short_learning_benchmark_trains_both_arms_and_compares_them(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/learning.py", "--budget-s", "300", "--max-steps", "2", "--held-out", "3",
         "--group-size", "4", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]

    steps = {arm: int(s) for arm, s in re.findall(r"^(catq|sync)\s+(\d+) steps in", out, re.M)}
    assert steps["catq"] >= 2 and steps["sync"] >= 2, out[-2000:]
    assert re.search(r"^ratio catq/sync \(gain in held-out single-sample accuracy\) (-?\d+\.\d\d|nan)$", out, re.M)

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [v["label"] for v in results["versions"]] == ["v0", "catq-final", "sync-final"]
    questions = [{p["question"] for p in v["prompts"]} for v in results["versions"]]
    assert questions[0] == questions[1] == questions[2] and len(questions[0]) == 3
