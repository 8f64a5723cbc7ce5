"""bench/soak.py --smoke: a `catq up` stack on the default model under a minute of overload from
concurrent HTTP clients, with admission control on; the JSON holds the samples and the summary,
every accepted prompt is answered by the end, and every refusal was a 429."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .procs import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a stack start, a minute of load, up to 240 s of drain

SAMPLE_FIELDS = {"t_s", "sent", "accepted", "refused_429", "other_status", "backlog", "referenced", "answered",
                 "latency_p50_s", "latency_p95_s", "latency_p99_s", "rss_bytes", "redis_used_bytes",
                 "redis_keys", "dead_letters", "error_lines"}
TARGETS = {"backlog_within_max", "every_accepted_answered", "no_dead_letters", "no_errors", "rss_flat",
           "redis_memory_flat"}


def test_soak_smoke_refuses_with_429_and_answers_every_accepted_prompt(tmp_path):
    result = subprocess.run([sys.executable, "bench/soak.py", "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((tmp_path / "soak.json").read_text())
    assert (tmp_path / "soak.png").read_bytes().startswith(b"\x89PNG")
    samples, summary = report["samples"], report["summary"]
    assert len(samples) >= 5 and all(SAMPLE_FIELDS <= set(s) for s in samples)
    measured = set().union(*(s["rss_bytes"] for s in samples))
    assert {"ingest.0", "rollout.0", "learner.0", "engine.policy"} <= measured, measured
    assert all(s["redis_keys"] > 0 and s["redis_used_bytes"] > 0 for s in samples)

    # overload: some prompts admitted, the rest refused by admission control and nothing else
    assert summary["accepted"] > 0 and summary["refused_429"] > 0, summary
    assert summary["other_status"] == {}, summary
    assert summary["accepted"] + summary["refused_429"] == summary["sent"]
    assert summary["max_backlog_seen"] <= summary["max_backlog"] == 4
    # every accepted prompt was answered (scored) before the stack stopped, none dead-lettered
    assert summary["answered"] == summary["accepted"] and summary["dead"] == 0, summary
    assert summary["latency_p99_s"] is not None and summary["latency_p99_s"] > 0
    assert set(summary["targets"]) == TARGETS
    assert summary["targets"]["every_accepted_answered"] and summary["targets"]["backlog_within_max"]
    assert "target every_accepted_answered: held" in result.stdout
