"""Bus semantics against a real Redis: groups, complete/ack, reclaim, dead letters, trimming."""

from __future__ import annotations

import asyncio
import random

import pytest

from catq.bus import Bus, Output
from catq.config import BusConfig
from catq.messages import (
    ChatMessage,
    DeadLetter,
    Prompt,
    WeightsPublished,
    decode,
    encode,
)


def prompt(text: str = "q", pid: str | None = None) -> Prompt:
    return Prompt(prompt_id=pid or text, task="math", messages=[ChatMessage("user", text)])


async def outputs_of(bus: Bus, stream: str) -> list[tuple[str, Prompt]]:
    """(source id, message) of every entry in an output stream."""
    entries = await bus.redis.xrange(bus.key(stream))
    return [(f[b"source"].decode(), decode(f[b"message"])) for _, f in entries]


async def test_group_created_from_start_sees_earlier_entries(bus):
    first = await bus.publish("prompts", prompt("before"))
    await bus.ensure_group("prompts", "g")
    await bus.ensure_group("prompts", "g")  # idempotent
    bus._groups.clear()
    await bus.ensure_group("prompts", "g")  # BUSYGROUP tolerated
    got = await bus.read("prompts", "g", "c", count=10, message_type=Prompt)
    assert [d.entry_id for d in got] == [first]
    assert got[0].message.prompt_id == "before" and got[0].attempts == 1


async def test_complete_writes_outputs_marker_and_ack_once(bus):
    await bus.publish("prompts", prompt("a"))
    (d,) = await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
    await bus.complete(d, "g", [Output("echoed", d.message), Output("other", d.message)])
    await bus.complete(d, "g", [Output("echoed", d.message)])  # a second completion writes nothing
    assert [s for s, _ in await outputs_of(bus, "echoed")] == [d.entry_id]
    assert len(await outputs_of(bus, "other")) == 1
    assert (await bus.redis.xpending(bus.key("prompts"), "g"))["pending"] == 0
    ttl = await bus.redis.ttl(bus.done_key("prompts", "g", d.entry_id))
    assert 0 < ttl <= bus.config.result_ttl_s


async def test_racing_consumers_produce_one_output(bus):
    await bus.publish("prompts", prompt("a"))
    (slow,) = await bus.read("prompts", "g", "slow", count=1, message_type=Prompt)
    await asyncio.sleep(0.3)  # > claim_idle_ms: "slow" looks dead
    (fast,) = await bus.read("prompts", "g", "fast", count=1, message_type=Prompt)
    assert fast.entry_id == slow.entry_id and fast.attempts == 2
    await bus.complete(fast, "g", [Output("echoed", fast.message)])
    await bus.complete(slow, "g", [Output("echoed", slow.message)])
    assert len(await outputs_of(bus, "echoed")) == 1


async def test_redelivered_done_entry_is_acked_not_returned(bus):
    entry = await bus.publish("prompts", prompt("a"))
    await bus.read("prompts", "g", "c1", count=1, message_type=Prompt)
    await bus.redis.set(bus.done_key("prompts", "g", entry), "x")  # output exists already
    await asyncio.sleep(0.3)
    assert await bus.read("prompts", "g", "c2", count=1, message_type=Prompt) == []
    assert (await bus.redis.xpending(bus.key("prompts"), "g"))["pending"] == 0


async def test_a_duplicate_entry_of_done_work_is_acked_where_it_arrives(bus):
    first = await bus.publish("prompts", prompt("a"))
    (d,) = await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
    await bus.complete(d, "g", [Output("echoed", d.message)])
    await bus.publish("prompts", prompt("a"))  # a retried XADD whose first reply was lost
    other = await bus.publish("prompts", prompt("b"))
    got = await bus.read("prompts", "g", "c", count=10, message_type=Prompt)
    assert [x.entry_id for x in got] == [other]
    assert [s for s, _ in await outputs_of(bus, "echoed")] == [first]
    assert (await bus.redis.xpending(bus.key("prompts"), "g"))["pending"] == 1  # only "b"


async def test_duplicates_in_flight_together_produce_one_output(bus):
    await bus.publish("prompts", prompt("a"))
    await bus.publish("prompts", prompt("a"))
    one, two = await bus.read("prompts", "g", "c", count=10, message_type=Prompt)
    await bus.complete(one, "g", [Output("echoed", one.message)])
    await bus.complete(two, "g", [Output("echoed", two.message)])
    assert len(await outputs_of(bus, "echoed")) == 1
    assert (await bus.redis.xpending(bus.key("prompts"), "g"))["pending"] == 0


async def test_undecodable_entry_goes_to_dead_at_once(bus):
    await bus.ensure_group("prompts", "g")
    await bus.redis.xadd(bus.key("prompts"), {"message": b"\xc1garbage"})
    good = await bus.publish("prompts", prompt("fine"))
    got = await bus.read("prompts", "g", "c", count=10, message_type=Prompt)
    assert [d.entry_id for d in got] == [good]
    (_, letter) = await bus.last("dead", DeadLetter)
    assert letter.stream == "prompts" and letter.payload == b"\xc1garbage"
    assert "undecodable" in letter.error and letter.attempts == 1


async def test_wrong_message_type_is_dead_lettered(bus):
    await bus.publish("prompts", WeightsPublished(policy_version=1, path="/x", step=1))
    assert await bus.read("prompts", "g", "c", count=10, message_type=Prompt) == []
    (_, letter) = await bus.last("dead", DeadLetter)
    assert "expected Prompt" in letter.error


async def test_entry_dead_lettered_at_its_max_attempts_th_failure_not_at_a_redelivery(bus):
    entry = await bus.publish("prompts", prompt("a"))
    failures = []
    for _ in range(bus.config.max_attempts):
        (d,) = await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
        failures.append(d.failures)
        await bus.record_failure(d, "g")
        await asyncio.sleep(0.3)  # never completed: reclaimed
    assert failures == [0, 1, 2]
    assert await bus.read("prompts", "g", "c", count=1, message_type=Prompt) == []
    (_, letter) = await bus.last("dead", DeadLetter)
    assert letter.entry_id == entry and "failed 3 times (max_attempts=3)" in letter.error
    assert (await bus.redis.xpending(bus.key("prompts"), "g"))["pending"] == 0


async def test_redeliveries_without_failures_are_capped_by_max_deliveries(run_name, redis_url):
    bus = Bus(redis_url, run_name, BusConfig(claim_idle_ms=100, block_ms=50, max_deliveries=4))
    try:
        entry = await bus.publish("prompts", prompt("a"))
        attempts = []
        for _ in range(4):  # a worker that dies on it each time: deliveries, no failures counted
            (d,) = await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
            attempts.append(d.attempts)
            await asyncio.sleep(0.2)
        assert attempts == [1, 2, 3, 4]
        assert await bus.read("prompts", "g", "c", count=1, message_type=Prompt) == []
        (_, letter) = await bus.last("dead", DeadLetter)
        assert letter.entry_id == entry and "max_deliveries=4" in letter.error
    finally:
        await bus.close()


async def test_keep_alive_stops_reclaim(bus):
    await bus.publish("prompts", prompt("a"))
    (d,) = await bus.read("prompts", "g", "worker", count=1, message_type=Prompt)
    for _ in range(4):
        await asyncio.sleep(0.1)
        await bus.keep_alive("prompts", "g", "worker", [d.entry_id])
        assert await bus.read("prompts", "g", "thief", count=1, message_type=Prompt, block_ms=1) == []


async def test_read_all_last_and_policy_version(bus):
    assert await bus.last("weights", WeightsPublished) is None
    ids = [await bus.publish("weights", WeightsPublished(policy_version=v, path=f"/w/v{v}", step=v))
           for v in (1, 2, 3)]
    got = await bus.read_all("weights", WeightsPublished)
    assert [m.policy_version for _, m in got] == [1, 2, 3]
    assert [m.policy_version for _, m in await bus.read_all("weights", WeightsPublished, after_id=ids[1])] == [3]
    assert (await bus.last("weights", WeightsPublished))[1].policy_version == 3
    assert await bus.get_policy_version() == 0
    await bus.set_policy_version(7)
    assert await bus.get_policy_version() == 7


async def test_trim_keeps_unacked_and_undelivered_entries(bus, run_name, redis_url):
    small = Bus(redis_url, run_name, BusConfig(max_stream_len=10, claim_idle_ms=100_000), trim_interval_s=1e9)
    try:
        ids = [await small.publish("prompts", prompt(str(i))) for i in range(40)]
        assert await small.trim("prompts") == 0  # its consumer group does not exist yet
        await small.ensure_group("prompts", "slow")  # nothing delivered yet: nothing may go
        assert await small.trim("prompts") == 0
        got = await small.read("prompts", "slow", "c", count=20, message_type=Prompt)
        for d in got[5:]:
            await small.ack([d], "slow")  # ids[0:5] stay pending
        assert await small.trim("prompts") == 0
        await small.ack(got[:5], "slow")
        assert await small.trim("prompts") == 19  # below the last delivered entry (kept)
        remaining = [i.decode() for i, _ in await small.redis.xrange(small.key("prompts"))]
        assert remaining == ids[19:]
        # a stream with no group is trimmed by length alone
        for i in range(15):
            await small.publish("weights", WeightsPublished(policy_version=i, path="/w", step=i))
        assert await small.trim("weights") == 5
    finally:
        await small.close()


@pytest.mark.slow
async def test_trimming_under_load_never_drops_unacked(run_name, redis_url):
    """Producers publish fast while the bus trims constantly to max_stream_len=10; consumers
    ack some entries, sit on others (pending) and some crash (entries reclaimed later). Every
    published entry must still be delivered and completed, exactly once."""
    config = BusConfig(max_stream_len=10, claim_idle_ms=150, block_ms=20, max_attempts=100)
    buses = [Bus(redis_url, run_name, config, trim_interval_s=0.0) for _ in range(4)]
    published: list[str] = []
    total = 400

    async def produce(b: Bus, n: int, tag: str) -> None:
        for i in range(n):
            published.append(await b.publish("prompts", prompt(f"{tag}{i}")))
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def consume(b: Bus, name: str, stop: asyncio.Event) -> None:
        rng = random.Random(name)
        while not stop.is_set():
            for d in await b.read("prompts", "g", name, count=5, message_type=Prompt, block_ms=20):
                if rng.random() < 0.2:
                    continue  # "crashed" holding it: stays pending until reclaimed
                await asyncio.sleep(rng.random() * 0.002)
                await b.complete(d, "g", [Output("echoed", d.message)])
            await b.trim("prompts")

    # "echoed" is trimmed too; a collector group that reads nothing until the end keeps it whole
    await buses[0].ensure_group("echoed", "collector")
    stop = asyncio.Event()
    consumers = [asyncio.create_task(consume(buses[i], f"c{i}", stop)) for i in (2, 3)]
    await asyncio.gather(produce(buses[0], total // 2, "a"), produce(buses[1], total // 2, "b"))
    outputs = buses[0].key("echoed")
    for _ in range(300):
        if await buses[0].redis.xlen(outputs) >= total:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*consumers)
    sources = [s for s, _ in await outputs_of(buses[0], "echoed")]
    assert sorted(sources) == sorted(published)  # nothing dropped, nothing done twice
    assert await buses[0].redis.xlen(buses[0].key("dead")) == 0
    assert await buses[0].redis.xlen(buses[0].key("prompts")) <= 15  # and the stream was trimmed
    for b in buses:
        await b.close()


async def test_message_survives_bus_round_trip(bus):
    p = prompt("round")
    await bus.publish("prompts", p, source="1-0")
    (d,) = await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
    assert d.message == p and d.payload == encode(p)


async def test_take_over_claims_every_entry_left_pending_whatever_claim_idle_ms_says(run_name, redis_url):
    holding = Bus(redis_url, run_name, BusConfig(claim_idle_ms=3_600_000, block_ms=50))
    try:
        left = [await holding.publish("prompts", prompt(f"p{i}")) for i in range(3)]
        assert len(await holding.read("prompts", "g", "c", count=3, message_type=Prompt)) == 3
        newer = await holding.publish("prompts", prompt("new"))
        assert await holding.read("prompts", "g", "c", count=10, message_type=Prompt) != []  # "new", read now
        later = await holding.publish("prompts", prompt("later"))
        await asyncio.sleep(0.2)
        # A plain read reclaims nothing (an hour's claim idle time): only the unread entry.
        assert [d.entry_id for d in await holding.read("prompts", "g", "c", count=10, message_type=Prompt)] == [later]
        await asyncio.sleep(0.2)
        got = await holding.take_over("prompts", "g", "c", count=10, message_type=Prompt, idle_ms=100, block_ms=1)
        assert sorted(d.entry_id for d in got) == sorted(left + [newer, later])
        assert all(d.attempts == 2 for d in got)  # each delivered before, now once more
    finally:
        await holding.close()


async def test_an_entry_read_without_a_group_is_dead_lettered_with_its_message_and_reason(bus):
    weights = WeightsPublished(policy_version=2, path="/elsewhere", step=2)
    entry = await bus.publish("weights", weights)
    dead_id = await bus.dead_letter_entry("weights", entry, weights, "refused: outside", worker="syncer-1")
    (listed_id, payload), = await bus.dead_letters()
    letter = decode(payload)
    assert listed_id == dead_id and isinstance(letter, DeadLetter)
    assert (letter.stream, letter.entry_id, letter.error, letter.attempts, letter.worker) == (
        "weights", entry, "refused: outside", 1, "syncer-1")
    assert decode(letter.payload) == weights


async def test_stream_stats_are_typed_and_stats_keeps_its_json_shape(bus):
    await bus.publish("prompts", prompt("a"))
    await bus.publish("prompts", prompt("b"))
    await bus.read("prompts", "g", "c", count=1, message_type=Prompt)
    typed = (await bus.stream_stats(("prompts", "dead")))
    group = typed["prompts"].group("g")
    assert typed["prompts"].length == 2 and typed["dead"].length == 0 and typed["dead"].groups == []
    assert (group.pending, group.lag, group.waiting) == (1, 1, 2)
    assert [(c.name, c.pending) for c in group.consumers] == [("c", 1)]
    plain = await bus.stats(("prompts",))
    (consumer,) = plain["prompts"]["groups"][0].pop("consumers")
    assert plain == {"prompts": {"length": 2, "groups": [
        {"group": "g", "pending": 1, "lag": 1, "last_delivered_id": group.last_delivered_id}]}}
    assert consumer.pop("idle_ms") >= 0 and consumer == {"name": "c", "pending": 1}
