"""Ingest under abuse and failure, against a real Redis and a real HTTP server (aiohttp test
server, in process): malformed bodies, all-or-nothing batches, idempotent enqueue, the rate
limit, Redis down or losing a reply, and refusing an open non-loopback bind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest
from catq.bus import run_key
import redis as sync_redis
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from catq.bus import Bus
from catq.config import IngestConfig
from catq.ingest import make_app
from catq.messages import Prompt, decode
from catq.prompt_requests import enqueue, parse_prompts
from catq.results import ResultStore

from .procs import ROOT, free_port

LIMITS = IngestConfig(max_text_chars=5000, max_batch=3, max_body_bytes=2048, max_nesting=6,
                      redis_deadline_s=0.5)


@pytest.fixture
async def serve(bus):
    """``await serve(limits=..., bus=..., token=...)`` → a client of a fresh ingest server."""
    clients = []

    async def make(limits: IngestConfig = LIMITS, on: Bus | None = None, token: str | None = None) -> TestClient:
        on = on or bus
        client = TestClient(TestServer(make_app(on, ResultStore(on, 60), limits, token)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def enqueued(bus) -> list[Prompt]:
    return [decode(f[b"message"]) for _, f in await bus.redis.xrange(bus.key("prompts"))]


async def assert_nothing_enqueued(bus) -> None:
    assert await enqueued(bus) == []
    assert await bus.redis.keys(bus.key("result:*")) == []


# -- 1. malformed bodies --------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b'{"text": ' + b"[" * (depth - 1) + b'"q"' + b"]" * (depth - 1) + b"}"


MALFORMED = [
    (b'{"prompts": [{"text": "fine"}, {"text": "bad \\ud800 text"}]}', 400,
     "prompts[1].text: lone surrogate U+D800"),
    (b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "content: lone surrogate U+DFFF"),
    (b'{"text": "caf\xe9"}', 400, "not valid UTF-8"),
    (b'{"text": "\xed\xa0\x80"}', 400, "not valid UTF-8"),  # a surrogate encoded as UTF-8 bytes
    (nested(7), 400, "nested too deeply; the limit is 6"),
    (b"[" * 2000, 400, "nested too deeply"),  # beyond the parser's own recursion limit
    (b'{"text": "' + b"x" * 3000 + b'"}', 413, "the limit is 2048"),
    (b'{"prompts": {"text": "q"}}', 400, "'prompts' must be a list"),
    (b'{"text": ["q"]}', 400, "text: must be a string, got list"),
    (b'{"text": "q", "task": 5}', 400, "unknown task 5"),
    (b'{"messages": "hi"}', 400, "non-empty list"),
    (b'{"text": "q", "prompt_id": 7}', 400, "prompt.prompt_id: must be"),
    (b'{"text": "q", "prompt_id": "has space"}', 400, "prompt.prompt_id: must be"),
    (b'[{"text": "a", "prompt_id": "p1"}, {"text": "b", "prompt_id": "p1"}]', 400,
     "prompts[1].prompt_id: 'p1' repeats prompts[0]"),
    (b"null", 400, "body must be"),
]


@pytest.mark.parametrize("body,status,message", MALFORMED, ids=[m for _, _, m in MALFORMED])
async def test_malformed_body_is_4xx_naming_the_problem_and_enqueues_nothing(bus, serve, body, status, message):
    client = await serve()
    response = await client.post("/v1/prompts", data=body, headers={"Content-Type": "application/json"})
    assert response.status == status
    assert message in (await response.json())["error"]["message"]
    await assert_nothing_enqueued(bus)


async def test_body_over_the_limit_without_content_length_is_413(bus, serve):
    client = await serve()

    async def chunks():  # chunked transfer: the size is only known while reading
        for _ in range(4):
            yield b" " * 1000

    response = await client.post("/v1/prompts", data=chunks())
    assert response.status == 413 and "the limit is 2048" in (await response.json())["error"]["message"]
    await assert_nothing_enqueued(bus)


# -- 2. all or nothing ----------------------------------------------------------------------------

async def test_a_batch_that_fails_in_redis_leaves_nothing_queued(bus):
    await bus.redis.set(bus.key("result:p2"), "not a hash")  # the script fails on this record
    prompts = parse_prompts([{"text": "a", "prompt_id": "p1"}, {"text": "b", "prompt_id": "p2"}], LIMITS,
                            default_task="math")
    with pytest.raises(ResponseError):
        await enqueue(bus, ResultStore(bus, 60), prompts)
    assert await enqueued(bus) == []
    assert await bus.redis.exists(bus.key("result:p1")) == 0


# -- 3. idempotent enqueue ------------------------------------------------------------------------

async def test_same_prompt_id_again_returns_its_status_without_a_second_entry(bus, serve):
    client = await serve()
    first = await client.post("/v1/prompts", json={"text": "q", "prompt_id": "p-1"})
    assert first.status == 202
    assert (await first.json())["prompts"] == [{"prompt_id": "p-1", "status": "queued", "new": True}]
    again = await client.post("/v1/prompts", json={"text": "q", "prompt_id": "p-1"})
    assert again.status == 200
    assert await again.json() == {"ids": ["p-1"], "prompts": [{"prompt_id": "p-1", "status": "queued", "new": False}]}
    await ResultStore(bus, 60).update("p-1", status="scored")
    later = await (await client.post("/v1/prompts", json={"text": "q", "prompt_id": "p-1"})).json()
    assert later["prompts"][0]["status"] == "scored"
    mixed = await client.post("/v1/prompts", json=[{"text": "q", "prompt_id": "p-1"}, {"text": "r", "prompt_id": "p-2"}])
    assert mixed.status == 202
    assert [p["new"] for p in (await mixed.json())["prompts"]] == [False, True]
    assert [p.prompt_id for p in await enqueued(bus)] == ["p-1", "p-2"]
    assert (await (await client.get("/v1/prompts/p-1")).json())["status"] == "scored"


async def test_idempotency_key_replays_the_first_answer(bus, serve):
    client = await serve()
    key = {"Idempotency-Key": "order-42"}
    first = await client.post("/v1/prompts", json={"prompts": [{"text": "a"}, {"text": "b"}]}, headers=key)
    assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    body = await first.json()
    again = await client.post("/v1/prompts", json={"prompts": [{"text": "a"}, {"text": "b"}]}, headers=key)
    assert again.status == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == body
    other = await client.post("/v1/prompts", json={"text": "something else"}, headers=key)
    assert other.status == 422 and "different request" in (await other.json())["error"]["message"]
    assert [p.prompt_id for p in await enqueued(bus)] == body["ids"]
    fresh = await client.post("/v1/prompts", json={"text": "a"}, headers={"Idempotency-Key": "order-43"})
    assert fresh.status == 202 and len(await enqueued(bus)) == 3
    bad = await client.post("/v1/prompts", json={"text": "a"}, headers={"Idempotency-Key": "k" * 256})
    assert bad.status == 400 and "Idempotency-Key" in (await bad.json())["error"]["message"]


async def test_concurrent_requests_with_one_key_enqueue_once(bus, serve):
    client = await serve()
    responses = await asyncio.gather(*[
        client.post("/v1/prompts", json={"text": "q"}, headers={"Idempotency-Key": "same"}) for _ in range(8)])
    bodies = [await r.json() for r in responses]
    assert {r.status for r in responses} == {202}
    assert all(b == bodies[0] for b in bodies)
    assert [p.prompt_id for p in await enqueued(bus)] == bodies[0]["ids"]


# -- 4. rate limit --------------------------------------------------------------------------------

async def test_rate_limit_answers_429_with_retry_after_and_refills(bus, serve):
    client = await serve(LIMITS.model_copy(update={"rate_limit_per_s": 4.0, "rate_limit_burst": 2}))
    assert (await client.post("/v1/prompts", json={"text": "q"})).status == 202
    assert (await client.get("/v1/prompts/nope")).status == 404
    limited = await client.post("/v1/prompts", json={"text": "q"})
    assert limited.status == 429 and limited.headers["Retry-After"] == "1"
    assert "rate limit" in (await limited.json())["error"]["message"]
    assert (await client.get("/healthz")).status == 200  # health checks are never limited
    assert len(await enqueued(bus)) == 1
    await asyncio.sleep(0.3)  # one request's worth at 4/s
    assert (await client.post("/v1/prompts", json={"text": "q"})).status == 202


# -- 6. Redis down --------------------------------------------------------------------------------

async def test_redis_down_is_503_within_the_deadline(run_name, serve):
    down = Bus(f"redis://127.0.0.1:{free_port()}", run_name)  # retries forever, as ingest's does
    try:
        client = await serve(on=down)
        started = time.monotonic()
        response = await client.post("/v1/prompts", json={"text": "q"}, headers={"Idempotency-Key": "k"})
        assert time.monotonic() - started < 3
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert "within 0.5 s" in (await response.json())["error"]["message"]
        assert (await client.get("/v1/prompts/x")).status == 503
        assert (await client.get("/metrics")).status == 503
        assert (await client.get("/healthz")).status == 503
    finally:
        await down.close()


class ReplyDroppingProxy:
    """A TCP proxy to Redis that, while ``drop`` is set, swallows Redis's replies: the command
    runs, the client never hears back (a reply lost on the way)."""

    def __init__(self, redis_url: str):
        target = urlparse(redis_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.drop = False

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _connect(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True))

    async def _pipe(self, source, sink, droppable: bool) -> None:
        try:
            while data := await source.read(65536):
                if not (droppable and self.drop):
                    sink.write(data)
                    await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def close(self) -> None:
        self.server.close()


async def test_lost_reply_is_503_and_a_retry_with_the_same_key_adds_nothing(bus, run_name, redis_url, serve):
    proxy = ReplyDroppingProxy(redis_url)
    flaky = Bus(await proxy.start(), run_name)
    try:
        client = await serve(on=flaky)
        assert (await client.post("/v1/prompts", json={"text": "warm-up"})).status == 202  # script loaded
        proxy.drop = True
        key = {"Idempotency-Key": "lost-reply"}
        lost = await client.post("/v1/prompts", json={"text": "q"}, headers=key)
        assert lost.status == 503
        written = await enqueued(bus)
        assert len(written) == 2  # the enqueue ran whole; only its answer was lost
        proxy.drop = False
        retry = await client.post("/v1/prompts", json={"text": "q"}, headers=key)
        assert retry.status == 202 and retry.headers["Idempotent-Replayed"] == "true"
        assert (await retry.json())["ids"] == [written[1].prompt_id]
        assert len(await enqueued(bus)) == 2
    finally:
        await flaky.close()
        await proxy.close()


async def test_catq_submit_retrying_a_lost_reply_adds_each_prompt_once(bus, catq_config, monkeypatch, capsys):
    from catq.evaluation.formats import DataItem
    from catq.ops import submit

    real_bus = submit._bus

    def bus_losing_first_reply(config):
        lossy = real_bus(config)
        script = lossy._publish_once

        async def run_then_lose(**kwargs):
            result = await script(**kwargs)
            if not lossy.lost:
                lossy.lost = True
                raise RedisConnectionError("reply lost")
            return result

        lossy.lost = False
        lossy._publish_once = run_then_lose
        return lossy

    monkeypatch.setattr(submit, "_bus", bus_losing_first_reply)
    prompts = parse_prompts([{"text": "a"}, {"text": "b"}], catq_config.ingest, default_task="math")
    items = [DataItem(prompt, line) for line, prompt in enumerate(prompts, 1)]
    assert await submit._submit(catq_config, items, None, 1.0) == 0
    assert capsys.readouterr().out.split() == [p.prompt_id for p in prompts]
    assert [p.prompt_id for p in await enqueued(bus)] == [p.prompt_id for p in prompts]


def test_catq_submit_of_a_file_with_prompt_ids_twice_adds_them_once(capsys, redis_url, run_name, tmp_path):
    from catq.cli import main

    lines = tmp_path / "p.jsonl"
    lines.write_text('{"text": "a", "prompt_id": "a-1"}\n{"text": "b", "prompt_id": "b-1"}\n')
    common = ["--run", run_name, "--redis-url", redis_url]
    assert main(["submit", "--file", str(lines), *common]) == 0
    assert main(["submit", "--file", str(lines), *common]) == 0
    out, err = capsys.readouterr()
    assert out.split() == ["a-1", "b-1", "a-1", "b-1"]
    assert "a-1 was already submitted (status queued)" in err
    assert sync_redis.Redis.from_url(redis_url).xlen(run_key(run_name, "prompts")) == 2


# -- 5. no open door ------------------------------------------------------------------------------

def test_ingest_refuses_a_non_loopback_host_without_a_token(redis_url, run_name):
    env = {**os.environ, "CATQ_INGEST_HOST": "0.0.0.0", "CATQ_INGEST_TOKEN": ""}
    done = subprocess.run([sys.executable, "-m", "workers.ingest", "--run", run_name, "--redis-url", redis_url],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "catq: ingest: refusing to listen on '0.0.0.0' (not loopback) without a token: "
        "set $CATQ_INGEST_TOKEN, or set ingest.host to 127.0.0.1"]


async def test_with_auth_on_the_rate_limit_counts_per_token(bus, serve):
    client = await serve(LIMITS.model_copy(update={"rate_limit_per_s": 0.1, "rate_limit_burst": 1}), token="s3cret")
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/prompts", json={"text": "q"}, headers=ok)).status == 202
    limited = await client.post("/v1/prompts", json={"text": "q"}, headers=ok)
    assert limited.status == 429 and int(limited.headers["Retry-After"]) == 10
    wrong = await client.post("/v1/prompts", json={"text": "q"}, headers={"Authorization": "Bearer guess"})
    assert wrong.status == 401  # a made-up token is refused, not given a fresh bucket
    assert len(await enqueued(bus)) == 1
