"""The syncer moving a LoRA policy's replica with SGLang's load/unload API: a real catq engine
in-process (tiny model, real HTTP) and EngineClient, a fake bus (no Redis)."""

from __future__ import annotations

import argparse

import pytest
import structlog
from aiohttp import web

from catq.config import LoraConfig, load_config
from catq.engines.client import EngineClient
from catq.engines.lora import add_server_args
from catq.engines.replicas import ReplicaPicker
from catq.engines.app import build_app, load_engine
from catq.engines import adapters
from catq.learner.syncer import Syncer
from catq.messages import WeightsPublished
from tests.helpers.engine_proc import free_port
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.unit.test_grpo_syncer import FakeBus


def write_adapter(model_path, out, rank=4, seed=0) -> None:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from catq.engines.models import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(str(model_path)),
                           PeftLoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    model.save_pretrained(str(out))


@pytest.fixture
async def engine_url(tmp_path, tiny_model_path):  # noqa: F811
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    args = parser.parse_args(["--enable-lora", "--max-lora-rank", "8", "--lora-target-modules", "q_proj", "v_proj"])
    weights = tmp_path / "weights"
    weights.mkdir()
    engine = load_engine(str(tiny_model_path), device="cpu", weights_dir=str(weights), max_batch=8, lora_args=args)
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", engine
    await runner.cleanup()


def publish(tmp_path, model_path, version: int, **adapter) -> tuple[str, WeightsPublished]:
    path = tmp_path / "weights" / f"v{version}"
    write_adapter(model_path, path, seed=version, **adapter)
    return f"{version}-0", WeightsPublished(policy_version=version, path=str(path), step=version)


async def test_the_syncer_moves_a_replica_to_the_newest_adapter_and_lists_its_name(
        tmp_path, tiny_model_path, engine_url):  # noqa: F811
    url, engine = engine_url
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"lora": LoraConfig(enabled=True, rank=4)})
    client = EngineClient(url, timeout_s=30)
    syncer = Syncer(config, FakeBus(), {url: client}, structlog.get_logger())
    try:
        await syncer.sync_all()  # nothing published: the base model, listed without an adapter
        assert syncer.bus.listed[url]["weight_version"] == 0 and syncer.bus.listed[url]["model"] is None

        syncer.bus.entries = [publish(tmp_path, tiny_model_path, 1)]
        await syncer.poll(block_ms=1)
        await syncer.sync_all()
        assert syncer.bus.listed[url]["weight_version"] == 1 and syncer.bus.listed[url]["model"] == "v1"
        assert await client.weight_version() == "1"
        picker = ReplicaPicker(None, [url], 1.0, make_client=None)
        picker.listed = dict(syncer.bus.listed)
        assert picker.adapter(url) == "v1"
        [completion] = await client.generate([1, 2, 3], max_new_tokens=2, lora_path=picker.adapter(url))
        assert completion.weight_version == "1"

        syncer.bus.entries += [publish(tmp_path, tiny_model_path, 2), publish(tmp_path, tiny_model_path, 3)]
        await syncer.poll(block_ms=1)
        await syncer.sync_all()
        assert syncer.bus.listed[url]["model"] == "v3" and await client.weight_version() == "3"
        # v2 was skipped (v3 was already out); v1 is older than the newest two: unloaded
        assert await adapters.loaded_adapters(client) == ["v3"]

        # A mismatched adapter (rank 16 > --max-lora-rank 8) is refused: dead-lettered, never
        # retried, and the replica keeps serving v3, listed.
        syncer.bus.entries += [publish(tmp_path, tiny_model_path, 4, rank=16)]
        await syncer.poll(block_ms=1)
        await syncer.sync_all()
        await syncer.sync_all()
        assert syncer.refused_versions == {4}
        [(stream, letter)] = [p for p in syncer.bus.published if p[0] == "dead"]
        assert "max-lora-rank" in letter.error
        assert await client.weight_version() == "3" and syncer.bus.listed[url]["model"] == "v3"
        [completion] = await client.generate([1, 2, 3], max_new_tokens=2, lora_path="v3")
        assert completion.weight_version == "3"
    finally:
        await client.close()


async def test_a_replica_ahead_of_the_target_is_never_moved_back(tmp_path, tiny_model_path, engine_url):  # noqa: F811
    url, engine = engine_url
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"lora": LoraConfig(enabled=True, rank=4)})
    client = EngineClient(url, timeout_s=30)
    await client.update_weight_version("5")
    syncer = Syncer(config, FakeBus(), {url: client}, structlog.get_logger())
    try:
        syncer.bus.entries = [publish(tmp_path, tiny_model_path, 2)]
        await syncer.start()
        await syncer.sync_all()
        assert await client.weight_version() == "5" and await adapters.loaded_adapters(client) == []
    finally:
        await client.close()


async def test_catq_up_starts_a_lora_policy_engine_on_the_base_with_the_newest_adapter(tmp_path):
    from catq.config import EngineSpec
    from catq.launcher import Stack

    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"lora": LoraConfig(enabled=True, rank=4,
                                                                          target_modules=["q_proj", "v_proj"])})
    policy, anchor = EngineSpec(name="policy", policy=True), EngineSpec(name="anchor", port=30001)
    stack = Stack(config, None)
    argv = await stack._engine_argv(policy)
    assert argv[argv.index("--model") + 1] == "default" and argv[argv.index("--weight-version") + 1] == "default"
    assert argv[argv.index("--max-lora-rank") + 1] == "4" and "--enable-lora" in argv
    assert argv[argv.index("--lora-target-modules") + 1:][:2] == ["q_proj", "v_proj"]
    assert "--lora-paths" not in argv
    assert "--enable-lora" not in await stack._engine_argv(anchor)  # the anchor serves the base

    for version in (1, 2):
        (tmp_path / "weights" / f"v{version}").mkdir(parents=True, exist_ok=True)
    argv = await stack._engine_argv(policy)
    assert argv[argv.index("--model") + 1] == "default" and argv[argv.index("--weight-version") + 1] == "2"
    assert argv[argv.index("--lora-paths") + 1] == f"v2={(tmp_path / 'weights' / 'v2').resolve()}"
