"""Weights over a process group (``learner.weight_sync = "distributed"``), real processes: a
learner broadcasts each version it publishes to two catq engine replicas over gloo — with no
syncer running, so the broadcast alone can have moved them — and what a replica then serves is
exactly the published directory; a replica that cannot join the group (nccl asked of a CPU
engine) refuses with a message, and the version reaches it from disk through the syncer."""

from __future__ import annotations

import signal

import pytest

from catq.bus import Bus
from catq.engines.client import EngineClient
from tests.helpers.engine_proc import engine_factory, free_port  # noqa: F401  (fixture)
from tests.integration.test_learner_restart import (
    make_scored,
    start_learner,
    write_config,
)
from tests.integration.test_weight_sync import wait_published, wait_version
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (fixture: one tiny model a session)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKENS = [5, 17, 42, 8, 99, 3, 61, 12]


async def prompt_logprobs(client: EngineClient) -> list[float]:
    """The engine's log-probs of a fixed sequence: a fingerprint of the weights it serves."""
    reply = await client.request("POST", "/generate", {
        "input_ids": TOKENS, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 0, "temperature": 0.0}})
    return [entry[0] for entry in reply["meta_info"]["input_token_logprobs"][1:]]


def broadcast_config(tmp_path, run_name, redis_url, model, engines, backend: str = "gloo"):
    urls = ", ".join(f'"{e.url}"' for e in engines)
    return write_config(tmp_path, run_name, redis_url, model,
                        weight_sync="distributed", broadcast_backend=backend, broadcast_address="127.0.0.1",
                        broadcast_timeout_s=20.0,
                        extra=f"[engines]\npolicy_urls = [{urls}]\nresolve_replicas = false")


def stop(procs) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        assert proc.wait(timeout=60) == 0


async def test_each_version_reaches_both_replicas_over_the_group_and_matches_its_directory(
    tmp_path, run_name, redis_url, engine_factory, tiny_model_path  # noqa: F811
):
    model = tiny_model_path
    weights = tmp_path / "runs" / run_name / "weights"
    engines = [engine_factory(model=str(model), weights_dir=weights) for _ in range(2)]
    config = broadcast_config(tmp_path, run_name, redis_url, model, engines)
    bus = Bus(redis_url, run_name)
    clients = [EngineClient(e.url, timeout_s=30) for e in engines]
    learner = start_learner(config, tmp_path / "learner.log")
    try:
        before = await prompt_logprobs(clients[0])
        for version in (1, 2):
            for i in range(2):
                await bus.publish("scored", make_scored(10 * version + i, [1.0, 0.0]))
            await wait_published(bus, version)
            for client in clients:  # no syncer runs: only the broadcast can have done this
                await wait_version(client, str(version), timeout=30)
        broadcast = await prompt_logprobs(clients[0])
        assert broadcast != before, "the broadcast changed nothing"
        assert await prompt_logprobs(clients[1]) == pytest.approx(broadcast, abs=1e-6)

        # The same version loaded from its directory gives the very same numbers.
        await clients[1].update_weights_from_disk(str(weights / "v2"), weight_version="2")
        assert await prompt_logprobs(clients[1]) == pytest.approx(broadcast, abs=1e-6)
        log = (tmp_path / "learner.log").read_text()
        assert log.count("weights broadcast") >= 2 and "weight broadcast failed" not in log
    finally:
        stop([learner])
        for client in clients:
            await client.close()
        await bus.close()


async def test_a_replica_that_cannot_join_is_refused_clearly_and_gets_the_version_from_disk(
    tmp_path, run_name, redis_url, engine_factory, tiny_model_path  # noqa: F811
):
    model = tiny_model_path
    weights = tmp_path / "runs" / run_name / "weights"
    engine = engine_factory(model=str(model), weights_dir=weights)
    client = EngineClient(engine.url, timeout_s=30)
    try:
        with pytest.raises(Exception, match="nccl needs a CUDA engine"):
            await client.init_weights_update_group(
                master_address="127.0.0.1", master_port=free_port(), rank_offset=1, world_size=2,
                group_name="weight_update_group", backend="nccl", timeout_s=10)
    finally:
        await client.close()

    config = broadcast_config(tmp_path, run_name, redis_url, model, [engine], backend="nccl")
    bus = Bus(redis_url, run_name)
    client = EngineClient(engine.url, timeout_s=30)
    procs = [start_learner(config, tmp_path / "learner.log"), start_learner(config, tmp_path / "syncer.log",
                                                                            role="syncer")]
    try:
        for i in range(2):
            await bus.publish("scored", make_scored(i, [1.0, 0.0]))
        await wait_published(bus, 1)
        await wait_version(client, "1", timeout=60)
        assert "weight broadcast failed" in (tmp_path / "learner.log").read_text()
        assert "engine updated" in (tmp_path / "syncer.log").read_text()
    finally:
        stop(procs)
        await client.close()
        await bus.close()
