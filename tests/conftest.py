"""Shared fixtures: a real Redis (CATQ_TEST_REDIS_URL, default 127.0.0.1:6379), a run name unique
to each test whose keys are deleted afterwards, and a Bus on that run.

    def test_x(bus, run_name, redis_url): ...
    cfg = make_config(run_name, redis_url, bus={"claim_idle_ms": 200})
"""

from __future__ import annotations

import os
import uuid

import pytest
import redis

from catq.bus import Bus, run_key
from catq.config import BusConfig, Config, load_config

DEFAULT_TEST_REDIS = "redis://127.0.0.1:6379"


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("CATQ_TEST_REDIS_URL", DEFAULT_TEST_REDIS)
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"integration tests need Redis at {url} (set CATQ_TEST_REDIS_URL): {exc}")
    finally:
        client.close()
    return url


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
