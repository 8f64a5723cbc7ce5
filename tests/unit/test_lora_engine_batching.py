"""catq's engine with more adapters in flight than --max-loras-per-batch: requests wait for a
slot instead of sharing a batch beyond the limit, and each row still gets its own adapter (tiny
model, in-process engine, real HTTP)."""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

from catq.engines.lora import add_server_args, fits_batch
from catq.engines.app import build_app, load_engine
from tests.helpers.engine_proc import free_port
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.unit.test_lora_syncer import engine_url, write_adapter  # noqa: F401  (engine_url: pytest fixture)


def test_fits_batch_counts_the_base_model_as_one_adapter():
    class Seq:
        def __init__(self, uid):
            self.lora = None if uid is None else type("A", (), {"uid": uid})()

    running = [Seq(None), Seq(1)]
    assert fits_batch(running, Seq(1), [], 2) and fits_batch(running, Seq(None), [], 2)
    assert not fits_batch(running, Seq(2), [], 2)
    assert fits_batch(running, Seq(2), [], 3) and not fits_batch(running, Seq(3), [Seq(2)], 3)


async def test_more_adapters_than_a_batch_holds_all_complete_each_on_its_own(tmp_path, tiny_model_path):  # noqa: F811
    weights = tmp_path / "weights"
    for version in (1, 2, 3):
        write_adapter(tiny_model_path, weights / f"v{version}", seed=version)
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(["--max-loras-per-batch", "2", "--lora-paths",
                              *(f"v{v}={weights / f'v{v}'}" for v in (1, 2, 3))])
    engine = load_engine(str(tiny_model_path), device="cpu", weights_dir=str(weights), max_batch=8, lora_args=args)
    assert engine.lora.max_lora_rank == 4 and engine.lora.target_modules == {"q_proj", "v_proj"}  # inferred
    seen: list[int] = []  # distinct adapters (the base counting as one) in each forward pass
    real_prefill, real_step = engine.gen.prefill, engine.gen.step

    def prefill(seqs):
        batch = real_prefill(seqs)
        running = engine.scheduler._running.seqs if engine.scheduler._running else []
        seen.append(len({id(s.lora) for s in [*running, *seqs]}))
        return batch

    def step(batch):
        seen.append(len({id(s.lora) for s in batch.seqs}))
        return real_step(batch)

    engine.gen.prefill, engine.gen.step = prefill, step
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"

    async def generate(http, lora_path):
        body = {"input_ids": [1, 2, 3, 4], "return_logprob": True, "lora_path": lora_path,
                "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
        async with http.post(url + "/generate", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    try:
        async with aiohttp.ClientSession() as http:
            alone = {name: await generate(http, name) for name in ("v1", "v2", "v3", None)}
            together = await asyncio.gather(*(generate(http, name) for name in ("v1", "v2", "v3", None)))
        for (name, single), item in zip(alone.items(), together):
            assert item["output_ids"] == single["output_ids"], name
            assert item["meta_info"]["weight_version"] == (name[1:] if name else "default")
            for a, b in zip(item["meta_info"]["output_token_logprobs"], single["meta_info"]["output_token_logprobs"]):
                assert abs(a[0] - b[0]) < 1e-4
        assert len({tuple(alone[n]["meta_info"]["output_token_logprobs"][0][:1]) for n in alone}) > 1
        assert seen and max(seen) <= 2
    finally:
        await runner.cleanup()


async def test_an_unloaded_adapter_named_by_a_request_is_loaded_again_as_sglang_does(engine_url, tmp_path,
                                                                                      tiny_model_path):  # noqa: F811
    """SGLang keeps every adapter name it has loaded: a request naming one unloaded since loads it
    again from its path; a name never loaded, or one whose directory is gone, gets a 400 naming it."""
    import shutil

    url, _ = engine_url
    path = tmp_path / "weights" / "v1"
    write_adapter(tiny_model_path, path, seed=1)

    async def post(http, route, body):
        async with http.post(url + route, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    def generate(name):
        return {"input_ids": [1, 2, 3, 4], "lora_path": name, "return_logprob": True,
                "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}

    async with aiohttp.ClientSession() as http:
        assert (await post(http, "/load_lora_adapter", {"lora_name": "a", "lora_path": str(path)}))[0] == 200
        status, first = await post(http, "/generate", generate("a"))
        assert status == 200
        status, reply = await post(http, "/unload_lora_adapter", {"lora_name": "a"})
        assert status == 200 and reply["loaded_adapters"] == {}
        status, again = await post(http, "/generate", generate("a"))
        assert status == 200 and again["meta_info"]["output_token_logprobs"] == first["meta_info"]["output_token_logprobs"]
        status, reply = await post(http, "/unload_lora_adapter", {"lora_name": "a"})
        assert status == 200 and reply["loaded_adapters"] == {}  # it was loaded again, so it unloads
        status, reply = await post(http, "/generate", generate("b"))
        assert status == 400 and "never been loaded: b" in reply["error"]["message"]
        shutil.rmtree(path)
        status, reply = await post(http, "/generate", generate("a"))
        assert status == 400 and "Failed to implicitly load LoRA adapter a" in reply["error"]["message"]
