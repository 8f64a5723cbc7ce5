"""Ingest's pure guards: body decoding limits, the backlog gauge's caching, the bind check."""

from __future__ import annotations

import json
import sys

import pytest

from catq.config import ConfigError, IngestConfig
from catq.ingest import BacklogGauge, check_exposure
from catq.prompt_requests import (
    PromptRequestError,
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


class CountingBus:
    """Answers ``backlog`` with a set value and counts the reads (the gauge's only Bus call)."""

    def __init__(self, backlog: int):
        self.backlog_now, self.reads = backlog, 0

    async def backlog(self, stream: str, group: str, cap: int) -> int:
        assert (stream, group) == ("prompts", "rollout") and cap == 11
        self.reads += 1
        return self.backlog_now


async def test_backlog_gauge_reads_at_most_once_a_second_and_counts_its_own_enqueues():
    clock, bus = Clock(), CountingBus(4)
    gauge = BacklogGauge(bus, limit=10, clock=clock)
    assert await gauge.current() == 4
    gauge.added(3)  # enqueued by this process since the read
    bus.backlog_now = 0  # drained meanwhile, but the read is not a second old yet
    clock.now += 0.9
    assert await gauge.current() == 7 and bus.reads == 1
    clock.now += 0.1
    assert await gauge.current() == 0 and bus.reads == 2
    refusal = gauge.refusal(9, 2)
    assert refusal.status == 429 and refusal.headers == {"Retry-After": "5"}
    assert str(refusal).startswith("backlog full: 9 prompts accepted and not yet rolled out, these 2 "
                                   "prompts would exceed the limit of 10 (ingest.max_backlog)")


def test_max_backlog_below_max_batch_is_a_config_error():
    with pytest.raises(ValueError, match=r"max_backlog \(5\) is below ingest.max_batch \(256\)"):
        IngestConfig(max_backlog=5)
    assert IngestConfig(max_backlog=5, max_batch=5).max_backlog == 5


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


async def test_backlog_gauge_holds_room_for_requests_still_enqueueing():
    clock, bus = Clock(), CountingBus(8)
    gauge = BacklogGauge(bus, limit=10, clock=clock)
    # two concurrent requests of 2: the first takes the last room, the second is refused before
    # the first has enqueued anything
    assert await gauge.reserve(2) is None
    assert await gauge.reserve(2) == 10
    gauge.settle(2, added=1)  # one of its prompts was already there: only one enqueued
    assert await gauge.current() == 9 and await gauge.reserve(1) is None
    gauge.settle(1, added=0)  # failed: nothing enqueued, the room is free again
    assert await gauge.current() == 9 and bus.reads == 1


def test_a_body_nested_past_the_parser_is_too_deep_whatever_the_recursion_limit():
    # Some library (sympy, torch) may have raised the recursion limit earlier in the process;
    # json.loads would then parse 5,000 levels and the answer would change with test order.
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        with pytest.raises(PromptRequestError, match="nested too deeply; the limit is 10 levels"):
            decode_body(b"[" * 5000, IngestConfig())
    finally:
        sys.setrecursionlimit(before)
    body = b'{"text": "[[[[[[[[ in a string \\" [[[[", "task": "math"}'
    assert decode_body(body, IngestConfig())["text"].startswith("[[[[[[[[")
