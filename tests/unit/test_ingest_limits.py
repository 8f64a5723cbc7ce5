"""Ingest's pure guards: body decoding limits, the rate limiter's buckets, the bind check."""

from __future__ import annotations

import json

import pytest

from catq.config import ConfigError, IngestConfig
from catq.ingest import (
    PromptRequestError,
    RateLimiter,
    check_exposure,
    decode_body,
    fingerprint_of,
    idempotency_record,
    parse_prompts,
)

LIMITS = IngestConfig(max_nesting=5)


def test_a_chat_batch_fits_the_smallest_nesting_limit_and_one_more_level_does_not():
    batch = {"prompts": [{"messages": [{"role": "user", "content": "q"}]}]}
    body = decode_body(json.dumps(batch).encode(), LIMITS)
    assert parse_prompts(body, LIMITS, default_task="math")[0].question == "q"
    with pytest.raises(PromptRequestError, match="the limit is 5 levels"):
        decode_body(b'{"prompts": [{"messages": [{"role": "user", "content": ["q"]}]}]}', LIMITS)


def test_scalars_do_not_count_as_nesting():
    assert decode_body(b'[[[[["deep enough", 1, null]]]]]', LIMITS) == [[[[["deep enough", 1, None]]]]]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_burst_then_paces_each_client_separately():
    clock = Clock()
    limiter = RateLimiter(per_s=2.0, burst=3, clock=clock)
    assert [limiter.wait_s("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.wait_s("a") == pytest.approx(0.5)
    assert limiter.wait_s("b") == 0.0  # another client has its own bucket
    clock.now += 0.25
    assert limiter.wait_s("a") == pytest.approx(0.25)  # refused requests take nothing
    clock.now += 0.25
    assert limiter.wait_s("a") == 0.0
    clock.now += 60
    assert [limiter.wait_s("a") for _ in range(4)][-1] > 0  # refills only up to the burst


def test_rate_limiter_forgets_idle_clients_when_it_holds_too_many(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(RateLimiter, "MAX_CLIENTS", 3)
    limiter = RateLimiter(per_s=1.0, burst=2, clock=clock)
    for client in "abc":
        limiter.wait_s(client)
    clock.now += 10  # a, b, c are full again: idle
    limiter.wait_s("d")
    limiter.wait_s("d")
    limiter.wait_s("e")
    assert set(limiter.buckets) == {"d", "e"}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_need_no_token(host):
    check_exposure(IngestConfig(host=host), None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.5", "ingest.example.com"])
def test_other_hosts_need_a_token(host):
    check_exposure(IngestConfig(host=host), "s3cret")
    with pytest.raises(ConfigError, match="refusing to listen on .* without a token: set \\$CATQ_INGEST_TOKEN"):
        check_exposure(IngestConfig(host=host), None)


def test_fingerprint_ignores_key_order_and_idempotency_keys_are_per_client():
    assert fingerprint_of({"text": "q", "task": "math"}) == fingerprint_of({"task": "math", "text": "q"})
    assert fingerprint_of({"text": "q"}) != fingerprint_of({"text": "r"})
    assert idempotency_record("addr:1.2.3.4", "k") != idempotency_record("addr:5.6.7.8", "k")
    assert idempotency_record("addr:1.2.3.4", "k") == idempotency_record("addr:1.2.3.4", "k")
