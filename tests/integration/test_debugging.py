"""Debugging a real run as a user does: `catq trace`, `catq tail`, `catq top --once` and a role's
Prometheus /metrics, against rollout, anchor and judge workers (separate processes) on a real
catq engine with the default model (the setup of test_teacher_pipeline.py).

One math prompt is scored; one prompt longer than the model's context is dead-lettered by rollout.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from catq.messages import DeadLetter, ScoredGroup
from tests.helpers.engine_proc import free_port
from tests.integration import test_teacher_pipeline as pipeline
from tests.integration.procs import ROOT, wait_for
from tests.integration.test_debug_views import tail_in_pty
from tests.integration.test_teacher_pipeline import MATH, G, make_prompt, scored_groups

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TOO_LONG = "count the words in this sentence please " * 1500


engine = pipeline.engine  # one engine for the module, as in test_teacher_pipeline


@pytest.fixture
def metrics_port() -> int:
    return free_port()


@pytest.fixture
def workers(tmp_path, run_name, redis_url, engine, metrics_port):
    """test_teacher_pipeline's worker processes, with the judge serving /metrics."""
    config = pipeline.write_config(tmp_path / "catq.toml", run_name, redis_url, engine.url)
    config.write_text(config.read_text() + f"\n[metrics]\nports = {{ judge = {metrics_port} }}\n")
    w = pipeline.Workers(config, tmp_path)
    yield w
    w.stop_all()
    print(w.logs())


def catq(config, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catq", *argv, "--config", str(config)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)


def scrape(port: int) -> dict[tuple[str, str], float]:
    """Samples of the judge's /metrics by (name, role label)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, s.labels.get("role", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def metrics_up(port: int) -> bool:
    try:
        await asyncio.to_thread(scrape, port)
        return True
    except OSError:
        return False


async def test_trace_tail_top_and_metrics_on_a_real_run(bus, workers, metrics_port):
    config_path = workers.config
    for role in ("rollout", "anchor", "judge"):
        workers.start(role)
    await wait_for(lambda: metrics_up(metrics_port), timeout=120, interval=0.5, what="judge /metrics")
    before = await asyncio.to_thread(scrape, metrics_port)
    scored_prompt, long_prompt = make_prompt("math", MATH), make_prompt("math", TOO_LONG)
    await bus.publish("prompts", scored_prompt)
    await bus.publish("prompts", long_prompt)

    async def both_done():
        return await scored_groups(bus) and await bus.read_all("dead", DeadLetter)

    await wait_for(both_done, timeout=780, interval=1.0, what="one scored group and one dead letter")
    (scored,) = [s for s in await scored_groups(bus) if s.group.prompt.prompt_id == scored_prompt.prompt_id]

    check_trace_of_scored(config_path, scored)
    check_trace_of_dead(config_path, long_prompt.prompt_id)
    check_tail(config_path, scored)
    check_top(config_path)
    after = await asyncio.to_thread(scrape, metrics_port)
    handled = ("catq_messages_handled_total", "judge")
    assert before.get(handled, 0) == 0 and after[handled] >= 1
    assert after[("catq_handler_seconds_count", "judge")] >= 1


def check_trace_of_scored(config, scored: ScoredGroup) -> None:
    pid = scored.group.prompt.prompt_id
    shown = catq(config, "trace", pid)
    assert shown.returncode == 0, shown.stderr
    for words in ("ingest", "rollout", "anchor", "judge", f"answer {G - 1}", "rewards", "estimator", "ref answer"):
        assert words in shown.stdout, (words, shown.stdout)
    as_json = catq(config, "trace", pid, "--json")
    trace = json.loads(as_json.stdout)
    stages = {s["stage"]: s for s in trace["stages"]}
    assert list(stages) == ["ingest", "rollout", "anchor", "judge"]
    assert stages["judge"]["rewards"] == scored.rewards
    assert [a["final_answer"] for a in stages["rollout"]["answers"]] == scored.rollout_answers
    assert stages["rollout"]["policy_version"] == scored.group.policy_version
    assert stages["anchor"]["reference_answer"] == scored.referenced.reference_answer
    assert all(s["latency_s"] >= 0 for s in trace["stages"][1:])


def check_trace_of_dead(config, prompt_id: str) -> None:
    trace = json.loads(catq(config, "trace", prompt_id, "--json").stdout)
    dead = trace["stages"][-1]
    assert trace["status"] == "dead" and dead["stage"] == "dead" and dead["from_stream"] == "prompts"
    assert "refused the prompt" in dead["error"]
    shown = catq(config, "trace", prompt_id).stdout
    assert "reason" in shown and "refused the prompt" in shown


def check_tail(config, scored: ScoredGroup) -> None:
    width = 72
    out = tail_in_pty(width, "scored", "--config", str(config))
    assert "rewards" in out and max(len(line) for line in out.replace("\r\n", "\n").splitlines()) <= width, out
    line = json.loads(catq(config, "tail", "scored", "--json", "--count", "1").stdout)
    assert line["rewards"] == scored.rewards


def check_top(config) -> None:
    frame = catq(config, "top", "--once")
    assert frame.returncode == 0, frame.stderr
    assert "scored" in frame.stdout and "dead letters: 1" in frame.stdout
    assert re.search(r"judge\s+│\s+1/1\s+│\s+[1-9]", frame.stdout), frame.stdout
