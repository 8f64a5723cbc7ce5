"""Ingest under load, against a real Redis and real HTTP servers (aiohttp test servers, in
process): admission control on the prompts backlog, one rate limit shared by every ingest
replica, and a Redis out of memory (its own server, a tiny maxmemory, noeviction)."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from catq import redis_server
from catq.bus import Bus
from catq.children import http_ok
from catq.config import IngestConfig
from catq.ingest import make_app
from catq.messages import ChatMessage, Prompt
from catq.results import ResultStore
from catq.topology import PROMPTS

from .procs import ROOT, free_port, start_bus_worker, stop_process, wait_for

LIMITS = IngestConfig(max_text_chars=5000, max_batch=3, redis_deadline_s=2.0)


@pytest.fixture
async def serve():
    """``await serve(bus, limits)`` → a client of a fresh ingest app (its own port, its own
    backlog gauge: a second call is a second replica)."""
    clients = []

    async def make(on: Bus, limits: IngestConfig = LIMITS) -> TestClient:
        client = TestClient(TestServer(make_app(on, ResultStore(on, 60), limits, None)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def post(client: TestClient, body, key: str | None = None):
    response = await client.post("/v1/prompts", json=body, headers={"Idempotency-Key": key} if key else None)
    return response, await response.json()


# -- admission control ----------------------------------------------------------------------------

async def test_a_full_backlog_refuses_new_prompts_but_answers_replays_until_rollout_drains_it(bus, serve):
    limits = LIMITS.model_copy(update={"max_backlog": 5})
    client = await serve(bus, limits)
    accepted = []
    for i in range(5):
        response, body = await post(client, {"text": f"q{i}"}, key=f"k{i}")
        assert response.status == 202
        accepted += body["ids"]

    refused, body = await post(client, {"text": "sixth"}, key="k5")
    assert refused.status == 429 and refused.headers["Retry-After"] == "5"
    assert body["error"]["message"].startswith(
        "backlog full: 5 prompts accepted and not yet rolled out, this prompt would exceed the limit of 5")
    assert await bus.redis.xlen(bus.key("prompts")) == 5  # nothing enqueued
    assert len(await bus.redis.keys(bus.key("result:*"))) == 5

    replay, body = await post(client, {"text": "q0"}, key="k0")
    assert replay.status == 202 and replay.headers["Idempotent-Replayed"] == "true"
    assert body["ids"] == [accepted[0]]
    again, body = await post(client, {"text": "q1", "prompt_id": accepted[1]})
    assert again.status == 200 and body["prompts"] == [{"prompt_id": accepted[1], "status": "queued", "new": False}]

    # Another replica knows nothing of the first one's count: it reads the backlog from Redis.
    other = await serve(bus, limits)
    assert (await post(other, {"text": "sixth"}))[0].status == 429

    # Rollout takes the prompts: delivered but not acknowledged, they are still backlog.
    taken = await bus.read(PROMPTS.name, PROMPTS.consumer, "test-rollout", count=10, message_type=Prompt)
    assert [d.message.prompt_id for d in taken] == accepted
    await asyncio.sleep(1.05)  # the gauges' reads are at most a second old
    assert (await post(other, {"text": "sixth"}))[0].status == 429
    await bus.ack(taken, PROMPTS.consumer)
    await asyncio.sleep(1.05)
    for replica in (client, other):
        response, _ = await post(replica, {"text": "after the drain"})
        assert response.status == 202
    assert await bus.redis.xlen(bus.key("prompts")) == 7


# -- one rate limit for every replica -------------------------------------------------------------

async def test_two_ingest_replicas_share_one_rate_limit(bus, run_name, redis_url, serve):
    per_s, burst = 2.0, 3
    limits = LIMITS.model_copy(update={"rate_limit_per_s": per_s, "rate_limit_burst": burst})
    second_bus = Bus(redis_url, run_name)  # a replica has its own connections
    try:
        replicas = [await serve(bus, limits), await serve(second_bus, limits)]
        started = time.monotonic()
        statuses = []
        for _ in range(5):
            for replica in replicas:
                statuses.append((await post(replica, {"text": "q"}))[0].status)
        elapsed = time.monotonic() - started
        admitted = statuses.count(202)
        # One bucket: the burst plus what refilled meanwhile, never a burst per replica.
        assert burst <= admitted <= burst + math.floor(elapsed * per_s)
        assert set(statuses) == {202, 429} and admitted < 2 * burst
        assert await bus.redis.xlen(bus.key("prompts")) == admitted
        refused = await replicas[1].post("/v1/prompts", json={"text": "q"})
        assert refused.status == 429 and int(refused.headers["Retry-After"]) == 1
        assert "rate limit: 2 requests/s, bursts of 3" in (await refused.json())["error"]["message"]
        bucket = await bus.redis.keys(bus.key("ratelimit:*"))
        assert len(bucket) == 1 and 0 < await bus.redis.pttl(bucket[0]) <= 3000  # expires when full again
        await asyncio.sleep(0.6)  # one request's worth at 2/s
        assert (await post(replicas[1], {"text": "q"}))[0].status == 202
    finally:
        await second_bus.close()


async def test_two_ingest_processes_share_one_rate_limit(bus, run_name, redis_url, tmp_path):
    """The same, with two `catq worker ingest` processes: the bucket lives in Redis, not in either."""
    per_s, burst = 1.0, 4
    ports = [free_port(), free_port()]
    log = tmp_path / "ingest.log"
    procs = []
    for port in ports:
        config = tmp_path / f"ingest-{port}.toml"
        config.write_text(f"[ingest]\nport = {port}\nrate_limit_per_s = {per_s}\nrate_limit_burst = {burst}\n")
        procs.append(start_ingest(config, run_name, redis_url, log))
    try:
        async with aiohttp.ClientSession() as session:
            urls = [f"http://127.0.0.1:{port}" for port in ports]
            for url in urls:
                await wait_for(lambda url=url: http_ok(url + "/healthz"), 60,
                               what=f"ingest at {url}; log: {log}")
            started = time.monotonic()
            statuses = []
            for _ in range(6):
                for url in urls:
                    async with session.post(url + "/v1/prompts", json={"text": "q"}) as response:
                        statuses.append(response.status)
            elapsed = time.monotonic() - started
        admitted = statuses.count(202)
        assert set(statuses) == {202, 429}, statuses
        assert burst <= admitted <= burst + math.floor(elapsed * per_s), (statuses, elapsed)
        assert await bus.redis.xlen(bus.key("prompts")) == admitted
    finally:
        for proc in procs:
            assert stop_process(proc, timeout=30) == 0, log.read_text()[-3000:]


def start_ingest(config, run_name: str, redis_url: str, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "catq", "worker", "ingest", "--config", str(config), "--run", run_name,
         "--redis-url", redis_url],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)


# -- Redis out of memory --------------------------------------------------------------------------

@pytest.fixture
def small_redis(tmp_path):
    """A Redis of our own (never the shared one) that evicts nothing; the test sets its maxmemory."""
    port = free_port()
    proc = redis_server.start_server(redis_server.server_binary(), "127.0.0.1", port, tmp_path)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        redis_server.stop_server(proc)


async def test_redis_out_of_memory_is_503_with_nothing_half_written(small_redis, run_name, serve):
    bus = Bus(small_redis, run_name, reconnect_timeout_s=2)
    try:
        limits = LIMITS.model_copy(update={"max_backlog": 1000})
        client = await serve(bus, limits)
        await bus.redis.config_set("maxmemory-policy", "noeviction")
        used = int((await bus.redis.info("memory"))["used_memory"])
        await bus.redis.config_set("maxmemory", used + 256 * 1024)
        memory = await bus.memory()  # as `catq status` shows it
        assert (memory.maxmemory_bytes, memory.policy) == (used + 256 * 1024, "noeviction")
        text, accepted, statuses = "x" * 4000, [], []
        for i in range(200):  # ~12 KB a request: Redis runs out long before
            response, body = await post(client, {"prompts": [{"text": f"{i} {text}"}] * 3}, key=f"k{i}")
            statuses.append(response.status)
            if response.status != 202:
                break
            accepted += body["ids"]
        assert statuses[-1] == 503 and set(statuses[:-1]) == {202} and accepted
        assert response.headers["Retry-After"] == "5"
        assert body["error"]["message"].startswith("Redis is out of memory (at its maxmemory, evicting nothing) "
                                                   "and refused the write")
        # Nothing half-written: exactly the accepted prompts, each with its result record.
        entries = await bus.redis.xrange(bus.key("prompts"))
        assert len(entries) == len(accepted) == len(await bus.redis.keys(bus.key("result:*")))
        assert (await client.get(f"/v1/prompts/{accepted[0]}")).status == 200  # reads still answer

        await bus.redis.config_set("maxmemory", 0)  # memory freed (the pipeline drained)
        retry, body = await post(client, {"prompts": [{"text": f"{len(statuses) - 1} {text}"}] * 3},
                                 key=f"k{len(statuses) - 1}")
        assert retry.status == 202 and "Idempotent-Replayed" not in retry.headers
        assert await bus.redis.xlen(bus.key("prompts")) == len(accepted) + 3
    finally:
        await bus.close()


# -- the backlog as the Bus reads it --------------------------------------------------------------

async def test_backlog_counts_pending_and_undelivered_entries_even_when_redis_cannot_tell_the_lag(bus):
    prompts = [Prompt(prompt_id=f"p{i}", task="math", messages=[ChatMessage("user", "q")]) for i in range(6)]
    assert await bus.backlog("prompts", "rollout", cap=100) == 0  # no stream yet
    ids = [await bus.publish("prompts", p) for p in prompts]
    assert await bus.backlog("prompts", "rollout", cap=100) == 6  # no group yet: every entry
    taken = await bus.read("prompts", "rollout", "c", count=2, message_type=Prompt)
    await bus.ack(taken[:1], "rollout")
    assert await bus.backlog("prompts", "rollout", cap=100) == 5  # 1 pending + 4 undelivered
    await bus.redis.xdel(bus.key("prompts"), ids[3])  # a hole after the group's position: no lag
    groups = await bus.redis.xinfo_groups(bus.key("prompts"))
    assert groups[0]["lag"] is None
    assert await bus.backlog("prompts", "rollout", cap=100) == 4
    assert await bus.backlog("prompts", "rollout", cap=2) == 3  # counted only as far as needed


@pytest.mark.slow  # a worker process
async def test_a_worker_keeps_its_work_while_redis_is_out_of_memory_and_finishes_it_after(
        small_redis, run_name, tmp_path):
    bus = Bus(small_redis, run_name, reconnect_timeout_s=2)
    worker = start_bus_worker(small_redis, run_name, tmp_path / "worker.log", "--claim-idle-ms", "300")
    try:
        await wait_for(lambda: bus.live_workers("echo"), what="the worker's heartbeat")
        ids = [await bus.publish("prompts", Prompt(prompt_id=f"p{i}", task="math",
                                                   messages=[ChatMessage("user", "sleep:1.5")])) for i in range(3)]
        await wait_for(_pending(bus, 3), what="every prompt in flight")
        await bus.redis.config_set("maxmemory-policy", "noeviction")
        await bus.redis.config_set("maxmemory", int((await bus.redis.info("memory"))["used_memory"]) // 2)
        await asyncio.sleep(2.5)  # the handlers finish; every write of their results is refused
        assert worker.poll() is None
        assert await bus.redis.xlen(bus.key("echoed")) == 0 and await bus.redis.xlen(bus.key("dead")) == 0
        await bus.redis.config_set("maxmemory", 0)  # memory freed
        await wait_for(_pending(bus, 0), what="every prompt done after memory freed")
        echoed = await bus.redis.xrange(bus.key("echoed"))
        assert sorted(f[b"source"].decode() for _, f in echoed) == sorted(ids)  # each once, none lost
        assert await bus.redis.xlen(bus.key("dead")) == 0
        log = (tmp_path / "worker.log").read_text()
        assert "redis out of memory; keeping the result, will retry" in log
        done = [json.loads(line) for line in log.splitlines() if '"event": "done"' in line]
        assert sorted(d["entry_id"] for d in done) == sorted(ids)
        assert {d["attempts"] for d in done} == {1}  # kept, not redone after a reclaim
    finally:
        stop_process(worker)
        await bus.close()


def _pending(bus: Bus, count: int):
    async def check() -> bool:
        group = (await bus.stream_stats(("prompts",)))["prompts"].group("echo")
        return group is not None and group.pending == count and not group.lag
    return check


async def test_key_count_counts_this_runs_keys_only(bus, redis_url):
    other = Bus(redis_url, f"{bus.run}-other")
    try:
        assert await bus.key_count() == 0
        await bus.publish("prompts", Prompt(prompt_id="p0", task="math", messages=[ChatMessage("user", "q")]))
        written = await bus.key_count()
        assert written >= 1  # the stream (and what publishing records with it)
        for i in range(3):  # another run on the same server
            await other.write_hash(f"result:p{i}", {"status": '"queued"'}, ttl_s=60)
        await bus.write_hash("result:p0", {"status": '"queued"'}, ttl_s=60)
        assert await bus.key_count() == written + 1
    finally:
        await other.redis.delete(*(other.key(f"result:p{i}") for i in range(3)))
        await other.close()
