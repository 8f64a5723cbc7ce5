"""catq's engine server in-process on a tiny random model, driven through EngineClient/ChatClient
and raw HTTP: response shapes as SGLang's, 400s, weight updates, pause, and batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web

from catq.engines.batching import BatchGenerator
from catq.engines.client import Completion, EngineClient, EngineError
from catq.engines.models import load_causal_lm, load_tokenizer
from catq.engines.openai import ChatClient
from catq.engines.app import build_app
from catq.engines.server import Engine
from tests.helpers.engine_proc import free_port
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401

PROMPT = [1, 9690, 198, 2683, 359]


@pytest.fixture(scope="module")
def generator(tiny_model_path) -> BatchGenerator:  # noqa: F811
    model = load_causal_lm(str(tiny_model_path))
    return BatchGenerator(model, load_tokenizer(str(tiny_model_path)), seed=0)


@pytest.fixture
async def server(generator, tiny_model_path, tmp_path):  # noqa: F811
    """(url, engine, weights_dir) of a fresh in-process engine on the shared tiny model."""
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    engine = Engine(generator, model_path=str(tiny_model_path), served_name="tiny",
                    weights_dir=weights_dir, max_batch=16)
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", engine, weights_dir
    await runner.cleanup()
    load_original(generator.model, tiny_model_path)


def load_original(model, path: Path) -> None:
    from catq.engines.scheduler import load_weights_in_place

    load_weights_in_place(model, path)


async def post(url: str, path: str, body) -> tuple[int, object]:
    async with aiohttp.ClientSession() as http:
        kwargs = {"data": body} if isinstance(body, str) else {"json": body}
        async with http.post(url + path, **kwargs) as resp:
            return resp.status, await resp.json(content_type=None)


async def get(url: str, path: str):
    async with aiohttp.ClientSession() as http, http.get(url + path) as resp:
        return await resp.json(content_type=None)


def assert_sglang_item(item: dict, with_logprobs: bool) -> None:
    """The fields and types SGLang's /generate returns (and EngineClient reads)."""
    assert isinstance(item["text"], str)
    assert all(isinstance(t, int) for t in item["output_ids"])
    meta = item["meta_info"]
    assert isinstance(meta["id"], str)
    assert meta["finish_reason"]["type"] in {"stop", "length", "abort"}
    assert isinstance(meta["prompt_tokens"], int) and isinstance(meta["completion_tokens"], int)
    assert meta["completion_tokens"] == len(item["output_ids"])
    assert isinstance(meta["weight_version"], str)
    if with_logprobs:
        entries = meta["output_token_logprobs"]
        assert len(entries) == len(item["output_ids"])
        for (logprob, token, text), out in zip(entries, item["output_ids"], strict=True):
            assert isinstance(logprob, float) and token == out and text is None
    else:
        assert "output_token_logprobs" not in meta


async def test_generate_shapes_follow_sglang(server):
    url, _, _ = server
    status, single = await post(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3}})
    assert status == 200 and isinstance(single, dict)
    assert_sglang_item(single, with_logprobs=False)
    status, group = await post(url, "/generate", {
        "input_ids": PROMPT, "sampling_params": {"n": 3, "max_new_tokens": 4}, "return_logprob": True})
    assert status == 200 and isinstance(group, list) and len(group) == 3
    for item in group:
        assert_sglang_item(item, with_logprobs=True)
    status, batch = await post(url, "/generate", {
        "input_ids": [PROMPT, [5, 6]], "sampling_params": {"n": 2, "max_new_tokens": 2}})
    assert [item["meta_info"]["prompt_tokens"] for item in batch] == [5, 5, 2, 2]
    status, text = await post(url, "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and text["meta_info"]["prompt_tokens"] >= 1


async def test_client_reads_every_field(server):
    url, _, _ = server
    async with EngineClient(url) as client:
        completions = await client.generate(PROMPT, n=4, max_new_tokens=5, temperature=0.8)
        assert len(completions) == 4
        for c in completions:
            assert isinstance(c, Completion)
            assert len(c.logprobs) == len(c.output_ids) == c.completion_tokens <= 5
            assert c.finish_reason in {"stop", "length"}
            assert c.prompt_tokens == len(PROMPT) and c.weight_version == "default"
        groups = await client.generate_batch([PROMPT, [7, 8, 9]], n=2, max_new_tokens=3, return_logprob=False)
        assert [len(g) for g in groups] == [2, 2]
        assert groups[1][0].prompt_tokens == 3 and groups[1][0].logprobs is None
        assert await client.weight_version() == "default"
        assert (await client.model_info())["is_generation"] is True
        assert await client.health()


@pytest.mark.parametrize("body", [
    "not json",
    {"sampling_params": {"max_new_tokens": 2}},
    {"input_ids": PROMPT, "text": "both"},
    {"input_ids": []},
    {"input_ids": ["a", "b"]},
    {"input_ids": [10 ** 9]},
    {"input_ids": PROMPT, "sampling_params": {"temperature": -1}},
    {"input_ids": PROMPT, "sampling_params": {"top_p": 0}},
    {"input_ids": PROMPT, "sampling_params": {"no_such_param": 1}},
    {"input_ids": PROMPT, "stream": True},
    {"input_ids": [PROMPT, PROMPT], "sampling_params": [{"n": 1}]},
])
async def test_malformed_requests_get_400_and_the_server_keeps_serving(server, body):
    url, _, _ = server
    status, reply = await post(url, "/generate", body)
    assert status == 400
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    status, _ = await post(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert status == 200


async def test_client_raises_4xx_at_once_with_the_server_message(server):
    url, _, _ = server
    async with EngineClient(url, max_attempts=5) as client:
        with pytest.raises(EngineError, match="temperature") as caught:
            await client.generate(PROMPT, temperature=-1.0)
        assert caught.value.status == 400


async def test_weight_update_from_disk_changes_greedy_output_and_version(server, generator):
    url, _, weights_dir = server
    perturbed = weights_dir / "v1"
    save_perturbed(generator, perturbed)
    async with EngineClient(url) as client:
        [before] = await client.generate(PROMPT, max_new_tokens=8, temperature=0)
        reply = await client.update_weights_from_disk(str(perturbed), weight_version="1")
        assert reply["success"] is True and isinstance(reply["num_paused_requests"], int)
        assert isinstance(reply["message"], str)
        [after] = await client.generate(PROMPT, max_new_tokens=8, temperature=0)
        assert await client.weight_version() == "1" and after.weight_version == "1"
        assert before.output_ids != after.output_ids or before.logprobs != after.logprobs


async def test_weight_update_refuses_paths_outside_the_weights_dir(server, tmp_path):
    url, _, weights_dir = server
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    async with EngineClient(url) as client:
        for path in (outside, weights_dir / ".." / "elsewhere", weights_dir / "missing"):
            with pytest.raises(EngineError) as caught:
                await client.update_weights_from_disk(str(path), weight_version="9")
            assert caught.value.status == 400
        assert await client.weight_version() == "default"
    status, reply = await post(url, "/update_weights_from_disk", {"model_path": str(outside)})
    assert status == 400 and reply["success"] is False and "outside" in reply["message"]


async def test_abort_all_requests_aborts_queued_work(server, generator):
    url, engine, weights_dir = server
    save_perturbed(generator, weights_dir / "v2")
    await post(url, "/pause_generation", {})
    pending = asyncio.create_task(post(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 50}}))
    await wait_for_stat(url, "num_waiting", 1)
    status, reply = await post(url, "/update_weights_from_disk", {
        "model_path": str(weights_dir / "v2"), "weight_version": "2", "abort_all_requests": True})
    assert status == 200 and reply["success"]
    status, item = await pending
    assert item["meta_info"]["finish_reason"]["type"] == "abort"
    await post(url, "/continue_generation", {})
    status, item = await post(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert item["meta_info"]["weight_version"] == "2"


async def test_concurrent_clients_are_batched_together(server):
    """Timing-free: requests queued while paused run as one batch, so the forward passes are
    those of one request, and the largest batch holds all four sequences."""
    url, _, _ = server
    await post(url, "/pause_generation", {})
    before = (await get(url, "/get_server_info"))["engine_stats"]
    body = {"input_ids": PROMPT, "sampling_params": {"n": 2, "max_new_tokens": 6, "ignore_eos": True}}
    first = asyncio.create_task(post(url, "/generate", body))
    second = asyncio.create_task(post(url, "/generate", {**body, "input_ids": [3, 4, 5]}))
    await wait_for_stat(url, "num_waiting", 4)
    await post(url, "/continue_generation", {})
    (s1, r1), (s2, r2) = await asyncio.gather(first, second)
    assert s1 == s2 == 200 and len(r1) == len(r2) == 2
    after = (await get(url, "/get_server_info"))["engine_stats"]
    assert after["max_batch_size"] == 4
    assert after["forward_passes"] - before["forward_passes"] == 6  # 1 prefill + 5 decode steps
    assert after["prefills"] - before["prefills"] == 1


async def test_info_health_and_control_routes(server):
    url, _, _ = server
    async with aiohttp.ClientSession() as http:
        for path in ("/health", "/health_generate", "/flush_cache"):
            async with http.get(url + path) as resp:
                assert resp.status == 200, path
    models = await get(url, "/v1/models")
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert (await get(url, "/get_model_info"))["weight_version"] == "default"
    assert (await get(url, "/server_info"))["weight_version"] == "default"
    async with aiohttp.ClientSession() as http, http.get(url + "/get_weight_version") as resp:
        assert resp.status == 404  # not an SGLang route
    for path in ("/pause_generation", "/continue_generation"):
        status, reply = await post(url, path, {})
        assert status == 200 and reply["status"] == "ok"


async def test_chat_completions_openai_shape_and_chat_client(server):
    url, _, _ = server
    status, reply = await post(url, "/v1/chat/completions", {
        "model": "tiny", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 3, "n": 2,
        "logprobs": True})
    assert status == 200 and reply["object"] == "chat.completion"
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["finish_reason"] in {"stop", "length"}
    assert reply["usage"]["total_tokens"] == reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    assert len(reply["choices"][0]["logprobs"]["content"]) <= 3
    for base in (url, url + "/v1"):
        async with ChatClient(base, model="tiny") as chat:
            texts = await chat.complete([{"role": "user", "content": "hi"}], max_tokens=2, n=3)
            assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    status, reply = await post(url, "/v1/chat/completions", {"messages": []})
    assert status == 400 and reply["error"]["message"]


def save_perturbed(generator: BatchGenerator, out: Path, scale: float = 0.5) -> None:
    """A copy of the model's weights with noise added, saved as an HF dir (like the learner's)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    torch.manual_seed(7)
    state = {name: (p.detach() + scale * p.detach().std() * torch.randn_like(p)).contiguous()
             for name, p in generator.model.named_parameters()}
    save_file(state, str(out / "model.safetensors"))


async def wait_for_stat(url: str, key: str, value: int, timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while (await get(url, "/get_server_info"))["engine_stats"][key] != value:
            await asyncio.sleep(0.05)



async def test_weight_group_requests_the_engine_cannot_serve_get_400_with_the_reason(server):
    """(Receiving weights over a group: tests/integration/test_weight_broadcast.py, real processes.)"""
    url, _, _ = server
    update = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]]}
    status, reply = await post(url, "/update_weights_from_distributed", update)
    assert status == 400 and "init_weights_update_group first" in reply["message"]
    join = {"master_address": "127.0.0.1", "master_port": free_port(), "rank_offset": 1, "world_size": 2}
    status, reply = await post(url, "/init_weights_update_group", {**join, "backend": "nccl"})
    assert status == 400 and "use gloo" in reply["message"]
    status, reply = await post(url, "/init_weights_update_group", {**join, "rank_offset": 2, "backend": "gloo"})
    assert status == 400 and "not below world_size" in reply["message"]
    status, reply = await post(url, "/destroy_weights_update_group", {})
    assert status == 400 and reply["success"] is False
    status, _ = await post(url, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert status == 200
