"""`catq up` keeps a stack up, on stacks without engines: a role that dies at start (a bad
setting) is retried with growing delays, then `catq up` exits 1 naming it; a stage whose consumer
role is down is named as starved. (A role killed ten times that comes back every time runs on a
full stack: tests/integration/test_up.py.)"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from catq.bus import run_key
import redis

from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup, encode
from tests.helpers.engine_proc import free_port
from tests.integration.test_up import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def light_config(tmp_path: Path, run: str, redis_url: str, ingest_port: int, roles: str, supervise: str) -> Path:
    """A stack without engines: only the roles named in ``roles`` run."""
    path = tmp_path / "light.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "{redis_url}"
run_dir = "{tmp_path}/runs/{{run}}"

[worker]
heartbeat_s = 1

[ingest]
port = {ingest_port}

[roles]
{roles}

[supervise]
{supervise}
""")
    return path


def catq(*args: str, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catq", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_a_role_that_dies_at_start_is_retried_with_growing_delays_then_up_exits_1_naming_it(
        tmp_path, redis_url, run_name):
    with socket.socket() as taken:  # ingest's port is taken: ingest exits at once, every time
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = light_config(tmp_path, run_name, redis_url, taken.getsockname()[1],
                              "ingest = 1\nrollout = 0\nanchor = 0\njudge = 0\nlearner = 0\nsyncer = 0",
                              # a wide start window: on a loaded 2-core machine a start that
                              # fails at once can still take many seconds to import and die
                              "backoff_initial_s = 0.3\ncrash_loop_starts = 4\nstart_window_s = 120")
        log = tmp_path / "up.log"
        with open(log, "w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "catq", "up", "--config", str(config)],
                                    stdout=sink, stderr=subprocess.PIPE, text=True)
            try:
                _, stderr = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                pytest.fail(f"catq up never gave up; its output ends:\n{log.read_text()[-4000:]}")
    up = subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), stderr)
    out = up.stdout + up.stderr
    assert up.returncode == 1, out[-3000:]
    delays = [float(x.split("restarting in ")[1].split("s")[0]) for x in out.splitlines() if "restarting in" in x]
    assert delays == [0.3, 0.6, 1.2], out[-3000:]
    assert "giving up on ingest.0" in out and "crash loop" in out
    assert "address already in use" in out.lower() or "errno 98" in out.lower()  # its last lines
    assert "catq up: gave up: ingest.0" in up.stderr


def test_a_starved_stage_is_named_when_its_role_is_down(tmp_path, redis_url, run_name):
    config = light_config(tmp_path, run_name, redis_url, free_port(),
                          "ingest = 1\nrollout = 0\nanchor = 0\njudge = 0\nlearner = 0\nsyncer = 0", "")
    log = tmp_path / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "catq", "up", "--config", str(config)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "is up" in log.read_text(), 120, "the stack", proc)
        client = redis.Redis.from_url(redis_url)
        for i in range(3):  # groups waiting for an anchor that is not running
            group = RolloutGroup(Prompt(f"p{i}", "math", [ChatMessage("user", "q")]), [1], [Rollout("2", [3], [-0.1], "stop")], 0)
            client.xadd(run_key(run_name, "groups"), {"message": encode(group)})
        wait_for(lambda: "stalled: groups: 3 waiting, no live anchor" in log.read_text(), 30, "a stall line", proc)
        status = catq("status", config=config)
        assert "STARVED groups: 3 waiting, no live anchor" in status.stdout
        assert "anchor   0/0 alive" in status.stdout and "ingest   1/1 alive" in status.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


