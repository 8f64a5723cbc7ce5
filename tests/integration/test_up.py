"""`catq up` end to end: real Redis, real engines on the default model, every role as a child.

Math prompts only: open prompts need a rubric in XML, which the 135M default model writes too
unreliably for a test that asserts nothing is dead-lettered. The anchor votes (estimator
"majority") instead of synthesizing: the 135M anchor seldom states an answer, which gives groups
all-equal rewards and the learner nothing to step on, and this test is about the stack, not about
the estimator (tests/integration/test_teacher_pipeline.py runs synthesis).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from catq.bus import Bus
from catq.config import Config, load_config
from catq.messages import ScoredGroup
from catq.results import ResultStore
from tests.helpers.engine_proc import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPTS = ["What is 2 + 3?", "What is 4 * 2?", "What is 6 + 1?", "What is 3 * 3?",
           "What is 7 + 8?", "What is 6 * 7?"]


def write_config(tmp_path: Path, run: str, redis_url: str) -> tuple[Path, str]:
    """A small stack config; returns its path and the policy engine's URL."""
    policy_port, anchor_port, ingest_port = free_port(), free_port(), free_port()
    path = tmp_path / "up.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "{redis_url}"
run_dir = "{tmp_path}/runs/{{run}}"

[engines]
policy_urls = ["http://127.0.0.1:{policy_port}"]
anchor_url = "http://127.0.0.1:{anchor_port}"
judge_url = "http://127.0.0.1:{anchor_port}"

[[engines.launch]]
name = "policy"
port = {policy_port}
policy = true

[[engines.launch]]
name = "anchor"
port = {anchor_port}

[bus]
claim_idle_ms = 3000

[worker]
grace_period_s = 10
heartbeat_s = 1

[ingest]
port = {ingest_port}

[rollout]
group_size = 4

[rollout.math]
temperature = 1.0
max_new_tokens = 24

[anchor]
estimator = "majority"

[learner]
lr = 1e-5
batch_groups = 2
batch_timeout_s = 5
micro_batch_rollouts = 4
""")
    return path, f"http://127.0.0.1:{policy_port}"


def child_pids(parent: int) -> dict[int, str]:
    """Direct children of a process, with their command lines (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent:
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def scored_prompt_ids(config: Config) -> list[str]:
    async def read() -> list[str]:
        bus = Bus(config.redis_url, config.run, config.bus)
        try:
            entries = await bus.read_all("scored", ScoredGroup, count=10_000)
            return [message.group.prompt.prompt_id for _, message in entries]
        finally:
            await bus.close()

    return asyncio.run(read())


def results_of(config: Config, ids: list[str]) -> list[dict | None]:
    async def read() -> list[dict | None]:
        bus = Bus(config.redis_url, config.run, config.bus)
        try:
            store = ResultStore(bus, config.bus.result_ttl_s)
            return [await store.get(prompt_id) for prompt_id in ids]
        finally:
            await bus.close()

    return asyncio.run(read())


def dead_count(config: Config) -> int:
    return redis.Redis.from_url(config.redis_url).xlen(f"catq:{config.run}:dead")


def submit(config: Path, run: str) -> list[str]:
    ids = []
    for text in PROMPTS:
        out = subprocess.run([sys.executable, "-m", "catq", "submit", text, "--task", "math",
                              "--config", str(config)], capture_output=True, text=True, check=True)
        ids += out.stdout.split()
    return ids


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"catq up exited early while waiting for {what}"
        value = predicate()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def start_up(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "catq", "up", "--config", str(config)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def stop_up(proc: subprocess.Popen, children: dict[int, str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: cmd for pid, cmd in children.items() if alive(pid)}
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind after SIGTERM: {left}"


def model_info_version(url: str) -> str | None:
    import urllib.request

    with urllib.request.urlopen(f"{url}/model_info", timeout=5) as response:
        return json.loads(response.read()).get("weight_version")


@dataclass
class RunningStack:
    config: Path
    settings: Config
    policy_url: str
    log: Path
    proc: subprocess.Popen
    children: dict[int, str]
    """The supervisor's children when the stack came up (role and engine processes)."""


@pytest.fixture
def stack(tmp_path, redis_url, run_name):
    """`catq up` on a small config, up and healthy; stopped with SIGTERM afterwards, which must
    leave no child behind."""
    config, policy_url = write_config(tmp_path, run_name, redis_url)
    log = tmp_path / "up.log"
    proc = start_up(config, log)
    children: dict[int, str] = {}
    try:
        wait_for(lambda: "is up" in log.read_text(), 600, "the stack to be up", proc)
        children = child_pids(proc.pid)
        yield RunningStack(config, load_config(config), policy_url, log, proc, children)
    finally:
        stop_up(proc, {**children, **child_pids(proc.pid)})


def test_up_runs_every_role_trains_publishes_and_stops_cleanly(stack, run_name):
    roles = " ".join(stack.children.values())
    for role in ("ingest", "rollout", "anchor", "judge", "learner", "syncer"):
        assert f"worker {role}" in roles, f"no {role} child in {roles}"
    ids = submit(stack.config, run_name)
    settings, proc = stack.settings, stack.proc
    wait_for(lambda: len(scored_prompt_ids(settings)) >= len(ids), 400, "every prompt to be scored", proc)
    assert sorted(scored_prompt_ids(settings)) == sorted(ids), "each prompt scored exactly once"
    for prompt_id, result in zip(ids, results_of(settings, ids)):
        assert result and result.get("cat_answer") is not None, f"no result for {prompt_id}"
        assert len(result["rewards"]) == 4
    wait_for(lambda: list(settings.weights_dir.glob("v*")), 300, "a published version", proc)
    wait_for(lambda: model_info_version(stack.policy_url) not in (None, "default", "0"), 120,
             "the policy engine to serve the new version", proc)
    assert dead_count(settings) == 0


def test_up_restarts_a_killed_child_and_completes_every_prompt_once(stack, run_name):
    ids = submit(stack.config, run_name)
    anchor_pid = next(pid for pid, cmd in stack.children.items() if "worker anchor" in cmd)
    os.kill(anchor_pid, signal.SIGKILL)
    wait_for(lambda: "anchor.0 exited" in stack.log.read_text(), 30, "the death to be reported", stack.proc)
    wait_for(lambda: len(scored_prompt_ids(stack.settings)) >= len(ids), 400,
             "every prompt to be scored", stack.proc)
    assert sorted(scored_prompt_ids(stack.settings)) == sorted(ids), "each prompt scored exactly once"
    assert "restarting" in stack.log.read_text()


def test_sigterm_during_start_stops_what_was_started(tmp_path, redis_url, run_name):
    config, _ = write_config(tmp_path, run_name, redis_url)
    log = tmp_path / "up.log"
    proc = start_up(config, log)
    wait_for(lambda: len(child_pids(proc.pid)) >= 2, 60, "the engines to be spawned", proc)
    children = child_pids(proc.pid)
    assert "is up" not in log.read_text()  # still loading the model
    stop_up(proc, children)
    assert proc.returncode == 0 and "stopped" in log.read_text()
