"""bench/demo_seeds.py --smoke: two seeds of a shortened `catq demo`, each seed's held-out gain
with its interval, the median and the minimum, written as JSON; a second call resumes (runs
nothing again)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_smoke_run_of_two_seeds_reports_each_gain_and_resumes(tmp_path):
    out = tmp_path / "seeds.json"
    argv = [sys.executable, "bench/demo_seeds.py", "--smoke", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    body = json.loads(out.read_text())
    assert [s["seed"] for s in body["seeds"]] == [0, 1] and body["seeds_done"] == 2
    for seed in body["seeds"]:
        low, high = seed["gain_ci"]
        assert -1.0 <= low <= seed["gain"] <= high <= 1.0
        assert seed["steps"] >= 1 and seed["wall_s"] > 0
    gains = sorted(s["gain"] for s in body["seeds"])
    assert body["min_gain"] == gains[0] and body["median_gain"] == pytest.approx(sum(gains) / 2)
    assert len(re.findall(r"^seed \d: gain [+-]\d\.\d\d \[[+-]\d\.\d\d, [+-]\d\.\d\d\]", result.stdout, re.M)) == 2
    assert re.search(r"^2 seeds: median gain [+-]\d\.\d\d, minimum [+-]\d\.\d\d$", result.stdout, re.M)

    again = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.count("(from an earlier run)") == 2
    assert json.loads(out.read_text())["seeds"] == body["seeds"]
