"""`catq demo` end to end in a shortened mode: the whole stack on the default model trains at least
3 learner steps on the training questions, then v0 and the final policy are measured on held-out
problems, and the open question comes back with a rubric and rewards."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers.engine_proc import free_port

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # training alone may take its 8-minute cap


def short_demo_config(tmp_path) -> str:
    """configs/demo.toml on free ports, in tmp_path, with G=4 so CI's two cores finish quickly."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    policy, anchor = free_port(), free_port()
    text = text.replace("30000", str(policy)).replace("30001", str(anchor))
    text = text.replace('run_dir = "runs/{run}"', f'run_dir = "{tmp_path / "run"}"')
    text = text.replace("group_size = 8", "group_size = 4")
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return str(path)


def test_short_demo_trains_and_measures_before_and_after(tmp_path):
    config = short_demo_config(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "catq", "demo", "--config", config, "--run", f"demotest-{free_port()}",
         "--steps", "3", "--train-minutes", "8", "--held-out", "4", "--estimators", "majority",
         "--open", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]

    steps = int(re.search(r"learner steps (\d+)", out).group(1))
    assert steps >= 3
    assert "learner step 1/3" in out or "learner step 2/3" in out or "learner step 3/3" in out  # live progress
    assert re.search(r"held-out single-sample accuracy v0 \d\.\d\d \[.*\] -> v\d+ \d\.\d\d", out)

    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    first, last = results["versions"]
    assert first["label"] == "v0" and last["policy_version"] >= 3
    assert len(first["prompts"]) == len(last["prompts"]) == 4
    held_out = {json.loads(line)["text"] for line in (tmp_path / "run" / "held_out.jsonl").read_text().splitlines()}
    trained_on = {json.loads(line)["text"] for line in (tmp_path / "run" / "train.jsonl").read_text().splitlines()}
    assert {p["question"] for p in last["prompts"]} == held_out and not held_out & trained_on
    assert (tmp_path / "run" / "eval" / "training.png").stat().st_size > 10_000

    open_part = out[out.index("open: "):]
    assert "rubric, " in open_part and "    - " in open_part, open_part[:2000]
