"""catq's engine as a real process on the default model (SmolLM2-135M-Instruct), through the
client: n samples with log-probs, weight updates from disk, refusals, and batching."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

from catq.engines.client import EngineClient, EngineError
from catq.engines.models import load_causal_lm
from catq.engines.tokenizer import ChatTokenizer
from tests.helpers.engine_proc import EngineProcess

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-3
"""Server log-probs (batched, KV-cached, fp32 CPU) vs one plain forward pass over prompt+output
on the 30-layer model: float rounding only (measured ~1e-5)."""


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("weights")


@pytest.fixture(scope="module")
def engine(weights_dir):
    with EngineProcess("default", weights_dir=weights_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return ChatTokenizer("default").encode_chat([{"role": "user", "content": "What is 7 + 5?"}])


async def server_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url + "/get_server_info") as resp:
        return (await resp.json())["engine_stats"]


async def test_n4_returns_four_samples_with_logprobs_matching_a_forward_pass(engine, prompt_ids):
    async with EngineClient(engine.url) as client:
        completions = await client.generate(prompt_ids, n=4, max_new_tokens=16, temperature=0.7)
    assert len(completions) == 4
    for c in completions:
        assert len(c.logprobs) == len(c.output_ids) == c.completion_tokens > 0
        assert c.prompt_tokens == len(prompt_ids) and c.weight_version == "default"
    model = load_causal_lm("default")
    best = completions[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + best.output_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    start = len(prompt_ids) - 1
    expected = [logprobs[start + i, t].item() for i, t in enumerate(best.output_ids)]
    assert best.logprobs == pytest.approx(expected, abs=LOGPROB_ATOL)


async def test_every_field_the_client_reads_is_present_and_typed_as_sglang(engine, prompt_ids):
    body = {"input_ids": prompt_ids, "sampling_params": {"n": 2, "max_new_tokens": 4}, "return_logprob": True}
    async with aiohttp.ClientSession() as http, http.post(engine.url + "/generate", json=body) as resp:
        items = await resp.json()
    assert resp.status == 200 and isinstance(items, list) and len(items) == 2
    for item in items:
        meta = item["meta_info"]
        assert isinstance(item["text"], str) and all(isinstance(t, int) for t in item["output_ids"])
        assert isinstance(meta["id"], str) and meta["finish_reason"]["type"] in {"stop", "length"}
        assert isinstance(meta["prompt_tokens"], int) and isinstance(meta["completion_tokens"], int)
        assert isinstance(meta["weight_version"], str)
        assert all(isinstance(lp, float) and isinstance(t, int) and x is None
                   for lp, t, x in meta["output_token_logprobs"])


async def test_malformed_and_outside_paths_get_400_and_the_server_keeps_serving(engine, tmp_path, prompt_ids):
    async with aiohttp.ClientSession() as http:
        for body in ({"input_ids": "nope"}, {"input_ids": prompt_ids, "sampling_params": {"top_p": 2}}):
            async with http.post(engine.url + "/generate", json=body) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["message"]
        async with http.post(engine.url + "/generate", data=b"{broken") as resp:
            assert resp.status == 400
    async with EngineClient(engine.url) as client:
        with pytest.raises(EngineError) as caught:
            await client.update_weights_from_disk(str(tmp_path), weight_version="99")
        assert caught.value.status == 400 and "outside" in caught.value.message
        [ok] = await client.generate(prompt_ids, max_new_tokens=2, temperature=0)
        assert ok.completion_tokens >= 1 and await client.weight_version() == "default"


async def test_two_concurrent_clients_are_batched(engine, prompt_ids):
    """Timing-free: both requests are queued while generation is paused, then decoded together."""
    async with EngineClient(engine.url) as a, EngineClient(engine.url) as b, aiohttp.ClientSession() as http:
        async with http.post(engine.url + "/pause_generation") as resp:
            assert resp.status == 200
        before = await server_stats(engine.url)
        first = asyncio.create_task(a.generate(prompt_ids, n=2, max_new_tokens=8))
        second = asyncio.create_task(b.generate(prompt_ids[:-3], n=2, max_new_tokens=8))
        async with asyncio.timeout(30):
            while (await server_stats(engine.url))["num_waiting"] < 4:
                await asyncio.sleep(0.05)
        async with http.post(engine.url + "/continue_generation") as resp:
            assert resp.status == 200
        results = await asyncio.gather(first, second)
    after = await server_stats(engine.url)
    assert [len(r) for r in results] == [2, 2]
    assert after["max_batch_size"] >= 4
    assert after["prefills"] - before["prefills"] == 1
    assert after["forward_passes"] - before["forward_passes"] <= 8  # one request's worth, not two


async def test_weight_update_to_a_perturbed_checkpoint_changes_greedy_output(engine, weights_dir, prompt_ids):
    model = load_causal_lm("default")
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * param.std() * torch.randn_like(param))
    model.save_pretrained(str(weights_dir / "v1"))
    async with EngineClient(engine.url) as client:
        [before] = await client.generate(prompt_ids, max_new_tokens=12, temperature=0)
        reply = await client.update_weights_from_disk(str(weights_dir / "v1"), weight_version="1")
        assert reply["success"] is True and isinstance(reply["num_paused_requests"], int)
        [after] = await client.generate(prompt_ids, max_new_tokens=12, temperature=0)
        assert await client.weight_version() == "1"
    assert after.weight_version == "1" and before.weight_version == "default"
    assert after.output_ids != before.output_ids
