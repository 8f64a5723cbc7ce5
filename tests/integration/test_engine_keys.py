"""Engine API keys across processes: a rollout worker that lacks the key of a keyed engine stops
at start with a configuration error (exit 2) and takes no prompt; with the key it works."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from catq.bus import run_key
import redis

from tests.helpers.engine_proc import EngineProcess
from tests.integration.procs import stop_process

pytestmark = pytest.mark.slow

KEY = "rollout-test-key"


def config_text(run: str, redis_url: str, url: str) -> str:
    return f"""
run = "{run}"
redis_url = "{redis_url}"

[engines]
policy_urls = ["{url}"]
api_key_env = "TEST_POLICY_KEY"
"""


def test_rollout_without_the_engine_key_exits_2_and_leaves_prompts_alone(tmp_path, redis_url, run_name):
    with EngineProcess("default", env={"CATQ_ENGINE_API_KEY": KEY}) as engine:
        config = tmp_path / "keys.toml"
        config.write_text(config_text(run_name, redis_url, engine.url))
        submit = subprocess.run([sys.executable, "-m", "catq", "submit", "What is 2 + 2?", "--config", str(config)],
                                capture_output=True, text=True, check=True)
        assert submit.stdout.strip()
        env = {k: v for k, v in os.environ.items() if k != "TEST_POLICY_KEY"}
        run = subprocess.run([sys.executable, "-m", "catq", "worker", "rollout", "--config", str(config)],
                             capture_output=True, text=True, timeout=240, env=env)
        client = redis.Redis.from_url(redis_url)
        assert run.returncode == 2, run.stderr[-2000:]
        assert "HTTP 401" in run.stderr and "api_key_env" in run.stderr
        assert client.xlen(run_key(run_name, "dead")) == 0
        assert client.xlen(run_key(run_name, "groups")) == 0
        keyed = subprocess.Popen([sys.executable, "-m", "catq", "worker", "rollout", "--config", str(config)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env={**env, "TEST_POLICY_KEY": KEY})
        try:
            deadline = time.monotonic() + 240
            while client.xlen(run_key(run_name, "groups")) == 0 and time.monotonic() < deadline:
                assert keyed.poll() is None, "the rollout worker with the key exited"
                time.sleep(0.5)
        finally:
            stop_process(keyed)
    assert client.xlen(run_key(run_name, "groups")) == 1
    assert client.xlen(run_key(run_name, "dead")) == 0
