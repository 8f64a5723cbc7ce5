"""`catq demo` end to end in a shortened mode, on the default model: trained on 4 training
questions it keeps resubmitting them past their first use and stops at its step target, measuring
v0 (on the anchor engine, while it trains) and the final policy on held-out problems; and a run
where no group can give signal (greedy sampling: every answer alike) says so and stops at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.helpers.engine_proc import free_port

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def short_demo_config(tmp_path, *, greedy: bool = False) -> str:
    """configs/demo.toml on free ports, in tmp_path, with G=4 so CI's two cores finish quickly
    (greedy: every rollout of a group is the same answer, so no group has signal)."""
    text = (ROOT / "configs" / "demo.toml").read_text()
    policy, anchor = free_port(), free_port()
    text = text.replace("30000", str(policy)).replace("30001", str(anchor))
    text = text.replace('run_dir = "runs/{run}"', f'run_dir = "{tmp_path / "run"}"')
    text = text.replace("group_size = 8", "group_size = 4")
    text += f"\n[ingest]\nport = {free_port()}\n"  # another stack may hold the default 8000
    if greedy:
        text = text.replace("[rollout.math]\ntemperature = 0.7", "[rollout.math]\ntemperature = 0.0")
        assert "temperature = 0.0\ntop_p" in text
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return str(path)


def run_demo(tmp_path, *flags: str, greedy: bool = False) -> subprocess.CompletedProcess:
    config = short_demo_config(tmp_path, greedy=greedy)
    return subprocess.run(
        [sys.executable, "-m", "catq", "demo", "--config", config, "--run", f"demotest-{free_port()}",
         "--held-out", "4", "--estimators", "majority", "--train-questions", "4", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=1500)


def test_short_demo_resubmits_trains_to_its_target_and_measures_before_and_after(tmp_path):
    result = run_demo(tmp_path, "--steps", "3", "--train-minutes", "20", "--open", "1")
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]

    assert re.search(r"training ends after \d+s: reached 3 learner steps", out)
    record = json.loads((tmp_path / "run" / "demo.json").read_text())
    assert record["steps"] >= 3 and record["questions"] == 4
    assert record["resubmissions"] > 0  # 3 steps x 2 groups with signal need more than 4 questions give once
    assert re.search(r"training questions: 4, submitted \d+ times \([1-9]\d* resubmissions\)", out)
    assert re.search(r"^\[ *\d+s\] learner step [12]/3  policy v", out, re.M)  # a line per learner step
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
    assert "rubric, " in open_part or "no usable rubric" in open_part, open_part[:2000]


def test_a_demo_where_nothing_can_give_signal_says_so_and_stops_at_once(tmp_path):
    result = run_demo(tmp_path, "--steps", "20", "--train-minutes", "15", "--open", "0",
                      "--retire-after", "1", greedy=True)
    out = result.stdout
    ended = re.search(r"training ends after (\d+)s: nothing can give signal any more", out)
    assert ended, out[-3000:] + result.stderr[-3000:]
    assert int(ended.group(1)) < 450  # 4 groups of 4 rollouts; not the 15-minute cap (~200 s on a busy 2-core machine)
    assert result.returncode == 1 and "the learner took no step" in out
