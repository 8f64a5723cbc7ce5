"""catq's engine serving LoRA adapters with SGLang's dynamic LoRA API, over real HTTP, on the
default model: load/unload, refusals that name the mismatch (and keep the previous adapter
serving), adapters in one batch, weight_version, and log-probs equal to the merged model's."""

from __future__ import annotations

import argparse
import contextlib

import aiohttp
import pytest
from aiohttp import web

from catq.engines.lora import add_server_args
from catq.engines.app import build_app, load_engine
from catq.learner import grpo
from tests.helpers.engine_proc import free_port
from tests.helpers.lora_adapter import make_adapter

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    return parser.parse_args(list(flags))


@pytest.fixture(scope="module")
def base():
    from catq.engines.models import load_causal_lm

    return load_causal_lm("default")


@contextlib.asynccontextmanager
async def serving(engine):
    """``engine`` over real HTTP on a free local port; yields its URL."""
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    engine = load_engine("default", device="cpu", weights_dir=str(weights), max_batch=16,
                         lora_args=lora_args("--enable-lora", "--max-lora-rank", "8", "--lora-target-modules",
                                             *TARGETS, "--max-loras-per-batch", "3"))
    async with serving(engine) as url:
        yield url, engine, weights


async def post(url, path, body):
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def get(url, path):
    async with aiohttp.ClientSession() as http, http.get(url + path) as resp:
        return await resp.json(content_type=None)


def prompt_ids(engine) -> list[int]:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],
                                                add_generation_prompt=True, tokenize=True, return_dict=False)


async def generate(url, ids, lora_path=None, max_new_tokens=8):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0},
            "return_logprob": True, "logprob_start_len": 0}
    if lora_path is not None:
        body["lora_path"] = lora_path
    return await post(url, "/generate", body)


def merged_logprobs(model, prompt: list[int], item: dict) -> list[float]:
    """The completion tokens' and the prompt's log-probs under ``model``, one forward pass."""
    sample = grpo.TrainSample(prompt[:1], prompt[1:] + item["output_ids"], [0.0], 0.0)
    [logp] = grpo.sequence_logprobs(model, [sample])
    return logp.tolist()


def served_logprobs(item: dict) -> list[float]:
    meta = item["meta_info"]
    return [lp for lp, _, _ in meta["input_token_logprobs"][1:]] + [lp for lp, _, _ in meta["output_token_logprobs"]]


async def test_load_serve_unload_and_the_served_adapter_equals_the_merged_model(server, base):
    url, engine, weights = server
    peft_model = make_adapter(base, weights / "v3")
    ids = prompt_ids(engine)

    status, reply = await post(url, "/load_lora_adapter", {"lora_name": "v3", "lora_path": str(weights / "v3")})
    assert status == 200, reply
    assert reply["success"] is True and reply["error_message"] == ""
    assert reply["loaded_adapters"] == {"v3": str(weights / "v3")}

    status, on_base = await generate(url, ids)
    status_a, on_adapter = await generate(url, ids, "v3")
    assert status == status_a == 200
    assert on_adapter["meta_info"]["weight_version"] == "3"  # the adapter's v<N>
    assert on_base["meta_info"]["weight_version"] == "default"

    merged = peft_model.merge_and_unload().eval()
    served, expected = served_logprobs(on_adapter), merged_logprobs(merged, ids, on_adapter)
    assert len(served) == len(expected)
    assert max(abs(a - b) for a, b in zip(served, expected)) < 1e-4
    base_served, base_expected = served_logprobs(on_base), merged_logprobs(base, ids, on_base)
    assert max(abs(a - b) for a, b in zip(base_served, base_expected)) < 1e-4
    assert max(abs(a - b) for a, b in zip(served_logprobs(on_adapter), merged_logprobs(base, ids, on_adapter))) > 1e-3

    # One request, one prompt on the adapter and the same on the base: each row its own.
    status, mixed = await post(url, "/generate", {
        "input_ids": [ids, ids], "lora_path": ["v3", None], "return_logprob": True,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert status == 200
    assert mixed[0]["output_ids"] == on_adapter["output_ids"] and mixed[1]["output_ids"] == on_base["output_ids"]
    for row, single in ((mixed[0], on_adapter), (mixed[1], on_base)):
        pairs = zip(row["meta_info"]["output_token_logprobs"], single["meta_info"]["output_token_logprobs"])
        assert max(abs(a[0] - b[0]) for a, b in pairs) < 1e-4

    # OpenAI route: model = "<base>:<adapter>".
    status, chat = await post(url, "/v1/chat/completions", {
        "model": "default:v3", "messages": [{"role": "user", "content": "What is 7 + 5?"}],
        "max_tokens": 8, "temperature": 0})
    assert status == 200 and chat["metadata"]["weight_version"] == "3"
    models = await get(url, "/v1/models")
    assert [m["id"] for m in models["data"]] == ["default", "v3"]

    status, reply = await post(url, "/update_weight_version", {"new_version": "3", "abort_all_requests": False})
    assert status == 200 and reply["success"] and reply["new_version"] == "3"
    assert (await get(url, "/model_info"))["weight_version"] == "3"

    status, reply = await post(url, "/unload_lora_adapter", {"lora_name": "v3"})
    assert status == 200 and reply["success"] and reply["loaded_adapters"] == {}
    status, reply = await post(url, "/unload_lora_adapter", {"lora_name": "v3"})
    assert status == 400 and reply["success"] is False and "does not exist" in reply["error_message"]
    # As SGLang: a request naming an adapter unloaded since loads it again from its path...
    status, again = await generate(url, ids, "v3")
    assert status == 200 and again["output_ids"] == on_adapter["output_ids"]
    assert [m["id"] for m in (await get(url, "/v1/models"))["data"]] == ["default", "v3"]
    # ... and one never loaded is refused, by name.
    status, reply = await generate(url, ids, "v9")
    assert status == 400 and "never been loaded: v9" in reply["error"]["message"]


async def test_a_mismatched_adapter_gets_a_400_naming_it_and_the_previous_one_keeps_serving(server, base):
    url, engine, weights = server
    make_adapter(base, weights / "v1")
    ids = prompt_ids(engine)
    status, _ = await post(url, "/load_lora_adapter", {"lora_name": "v1", "lora_path": str(weights / "v1")})
    assert status == 200
    _, before = await generate(url, ids, "v1")

    cases = {
        "rank": make_adapter(base, weights / "v2", rank=16) and "exceeds --max-lora-rank 8",
        "targets": make_adapter(base, weights / "v3", targets=("q_proj", "gate_proj")) and "gate_proj",
        "base": make_adapter(base, weights / "v4", base_name="Qwen/Qwen2.5-Coder-0.5B-Instruct") and "base model",
    }
    for version, (what, needle) in zip((2, 3, 4), cases.items()):
        status, reply = await post(url, "/load_lora_adapter",
                                   {"lora_name": f"v{version}", "lora_path": str(weights / f"v{version}")})
        assert status == 400, (what, reply)
        assert reply["success"] is False and needle in reply["error_message"], (what, reply)
        assert reply["loaded_adapters"] == {"v1": str(weights / "v1")}
    status, reply = await post(url, "/load_lora_adapter", {"lora_name": "v1", "lora_path": str(weights / "v1")})
    assert status == 400 and "already loaded" in reply["error_message"]
    status, reply = await post(url, "/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"})
    assert status == 400 and "outside the weights directory" in reply["error_message"]

    status, after = await generate(url, ids, "v1")
    assert status == 200 and after["output_ids"] == before["output_ids"]
    assert after["meta_info"]["output_token_logprobs"] == before["meta_info"]["output_token_logprobs"]


async def test_an_engine_without_enable_lora_refuses_lora_requests(tmp_path):
    engine = load_engine("default", device="cpu", weights_dir=str(tmp_path), max_batch=4, lora_args=lora_args())
    assert engine.lora is None
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        status, reply = await post(url, "/load_lora_adapter", {"lora_name": "a", "lora_path": str(tmp_path)})
        assert status == 400 and "--enable-lora" in reply["error_message"]
        status, reply = await generate(url, prompt_ids(engine), "a")
        assert status == 400 and "--enable-lora" in reply["error"]["message"]
    finally:
        await runner.cleanup()
