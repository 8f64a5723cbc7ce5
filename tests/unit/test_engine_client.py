"""EngineClient/ChatClient retry rules against a scripted fake server: 5xx and transport errors
are retried within limits, 4xx never."""

from __future__ import annotations

import time

import pytest
from aiohttp import web

from catq.engines.client import EngineClient, EngineError
from catq.engines.openai import ChatClient
from tests.helpers.engine_proc import free_port

ITEM = {"text": "4", "output_ids": [19, 2], "meta_info": {
    "id": "a", "finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 3,
    "completion_tokens": 2, "weight_version": "3", "output_token_logprobs": [[-0.5, 19, None], [-0.1, 2, None]]}}


@pytest.fixture
async def scripted():
    """Serve replies from a script: a list of (status, json body), one per request (but
    /v1/models, which always says the context is 64 tokens)."""
    script: list[tuple[int, object]] = []
    hits: list[str] = []

    async def reply(request: web.Request) -> web.Response:
        if request.path == "/v1/models":  # the client reads the context length once, unscripted
            return web.json_response({"object": "list", "data": [{"id": "m", "max_model_len": 64}]})
        hits.append(request.path)
        status, body = script.pop(0) if script else (500, {"error": {"message": "script empty"}})
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", script, hits
    await runner.cleanup()


async def test_5xx_is_retried_then_succeeds(scripted):
    url, script, hits = scripted
    script += [(503, {"error": {"message": "busy"}}), (500, "oops"), (200, ITEM)]
    async with EngineClient(url, max_attempts=3) as client:
        [completion] = await client.generate([1, 2, 3])
    assert len(hits) == 3
    assert completion.output_ids == [19, 2] and completion.logprobs == [-0.5, -0.1]
    assert completion.finish_reason == "stop" and completion.weight_version == "3"


async def test_4xx_is_not_retried(scripted):
    url, script, hits = scripted
    script += [(400, {"error": {"message": "bad temperature"}}), (200, ITEM)]
    async with EngineClient(url, max_attempts=5) as client:
        with pytest.raises(EngineError, match="bad temperature") as caught:
            await client.generate([1])
    assert caught.value.status == 400 and caught.value.message == "bad temperature"
    assert len(hits) == 1


async def test_attempts_are_bounded(scripted):
    url, script, hits = scripted
    script += [(502, {"error": {"message": "down"}})] * 5
    async with EngineClient(url, max_attempts=2) as client:
        with pytest.raises(EngineError, match="down"):
            await client.generate([1])
    assert len(hits) == 2


async def test_transport_errors_are_retried_within_the_time_limit():
    client = EngineClient(f"http://127.0.0.1:{free_port()}", timeout_s=1.5, max_attempts=100)
    started = time.monotonic()
    with pytest.raises(EngineError, match="failed after retries"):
        await client.generate([1])
    assert time.monotonic() - started < 5
    assert not await client.health()
    await client.close()


async def test_n_mismatch_and_malformed_items_are_errors(scripted):
    url, script, _ = scripted
    script += [(200, [ITEM]), (200, {"text": "x"})]
    async with EngineClient(url) as client:
        with pytest.raises(EngineError, match="returned 1 items"):
            await client.generate([1], n=2)
        with pytest.raises(EngineError, match="malformed"):
            await client.generate([1])


async def test_model_info_falls_back_to_the_older_route(scripted):
    url, script, hits = scripted
    script += [(404, {"detail": "Not Found"}), (200, {"weight_version": "7", "model_path": "m"})]
    async with EngineClient(url) as client:
        assert await client.weight_version() == "7"
    assert hits == ["/model_info", "/get_model_info"]


async def test_weight_update_failure_raises(scripted):
    url, script, _ = scripted
    script += [(400, {"success": False, "message": "outside the weights directory", "num_paused_requests": 0})]
    async with EngineClient(url) as client:
        with pytest.raises(EngineError, match="outside"):
            await client.update_weights_from_disk("/etc", weight_version="1")


async def test_chat_client_sends_the_key_and_retries_429(scripted, monkeypatch):
    url, script, hits = scripted
    monkeypatch.setenv("CATQ_TEST_KEY", "sk-test")
    script += [(429, {"error": {"message": "slow down"}}),
               (200, {"choices": [{"index": 1, "message": {"content": "no"}},
                                  {"index": 0, "message": {"content": "yes"}}]})]
    async with ChatClient(url + "/v1", model="m", api_key_env="CATQ_TEST_KEY") as chat:
        assert chat._headers["Authorization"] == "Bearer sk-test"
        assert await chat.complete([{"role": "user", "content": "?"}], n=2) == ["yes", "no"]
    assert hits == ["/v1/chat/completions"] * 2
