"""Past one Redis: every key of a run shares one hash tag (``catq:{<run>}:…``), so each of the
Bus's scripts runs on one node of a Redis Cluster; a run made before the hash tags is carried
over with `catq migrate-keys`. The cluster is real: three masters started here
(tests/helpers/redis_cluster.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from redis.crc import key_slot

from catq.bus import Bus, Output, legacy_run_key, run_key
from catq.config import BusConfig
from catq.messages import ChatMessage, Prompt, RolloutGroup, encode
from tests.helpers.redis_cluster import RedisCluster
from tests.integration.test_up import PROMPTS, results_of, running_stack, scored_prompt_ids, submit, wait_for


def prompt(prompt_id: str) -> Prompt:
    return Prompt(prompt_id=prompt_id, task="math", messages=[ChatMessage("user", "What is 2 + 2?")])


async def test_every_key_of_a_run_hashes_to_one_slot(bus, run_name, redis_url):
    await bus.ensure_group("prompts", "rollout")
    await bus.publish("prompts", prompt("p1"))
    (delivery,) = await bus.read("prompts", "rollout", "c1", count=1, message_type=Prompt)
    group = RolloutGroup(prompt=delivery.message, prompt_token_ids=[1, 2], rollouts=[], policy_version=0)
    await bus.complete(delivery, "rollout", [Output("groups", group)])
    await bus.beat("rollout", "w1", {"pid": 1}, ttl_ms=30_000)
    keys = [k.decode() for k in redis.Redis.from_url(redis_url).scan_iter(match=run_key(run_name, "*"))]
    assert len(keys) >= 5, keys  # streams, done markers, trace, heartbeat
    assert all(k.startswith(f"catq:{{{run_name}}}:") for k in keys)
    assert len({key_slot(k.encode()) for k in keys}) == 1


def test_migrate_keys_moves_a_stopped_runs_keys_and_their_pending_work(run_name, redis_url, tmp_path):
    client = redis.Redis.from_url(redis_url)
    old_stream = legacy_run_key(run_name, "prompts")
    client.xadd(old_stream, {"message": encode(prompt("p1"))})
    client.xgroup_create(old_stream, "rollout", id="0")
    client.xreadgroup("rollout", "c1", {old_stream: ">"}, count=1)  # pending on a consumer
    client.hset(legacy_run_key(run_name, "result:p1"), mapping={"status": '"queued"'})
    config = tmp_path / "run.toml"
    config.write_text(f'run = "{run_name}"\nredis_url = "{redis_url}"\n')
    try:
        out = subprocess.run([sys.executable, "-m", "catq", "migrate-keys", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert f"moved 2 keys to catq:{{{run_name}}}:" in out.stdout
        assert not client.exists(old_stream, legacy_run_key(run_name, "result:p1"))
        (group,) = client.xinfo_groups(run_key(run_name, "prompts"))
        assert group["pending"] == 1
        assert client.hget(run_key(run_name, "result:p1"), "status") == b'"queued"'
        again = subprocess.run([sys.executable, "-m", "catq", "migrate-keys", "--config", str(config)],
                               capture_output=True, text=True, timeout=60)
        assert "moved 0 keys" in again.stdout
    finally:
        client.delete(old_stream, legacy_run_key(run_name, "result:p1"))


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster() as running:
        yield running


@pytest.mark.slow  # starts processes
async def test_the_bus_protocol_on_a_redis_cluster(cluster):
    """Publish, read, complete (a script over two streams, a marker and a trace), reclaim and
    dead-letter, on a cluster whose three masters each own a third of the slots."""
    bus = Bus(cluster.url, "cluster-bus", BusConfig(cluster=True, claim_idle_ms=100, block_ms=100))
    try:
        await bus.ensure_group("prompts", "rollout")
        await bus.publish("prompts", prompt("p1"))
        await bus.publish("prompts", prompt("p2"))
        first, second = await bus.read("prompts", "rollout", "c1", count=2, message_type=Prompt)
        group = RolloutGroup(prompt=first.message, prompt_token_ids=[1], rollouts=[], policy_version=0)
        await bus.complete(first, "rollout", [Output("groups", group)])
        await bus.complete(first, "rollout", [Output("groups", group)])  # a redelivery: acked, not redone
        stats = await bus.stats()
        assert stats["groups"]["length"] == 1 and stats["prompts"]["groups"][0]["pending"] == 1
        await bus.dead_letter(second, "rollout", "poison", worker="c1")
        assert (await bus.stats())["dead"]["length"] == 1
    finally:
        await bus.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_whole_pipeline_runs_on_a_redis_cluster(cluster, tmp_path):
    """8 prompts through every role (`catq up` with `bus.cluster`), against the cluster: each
    is scored once and the learner publishes a version."""
    run = "cluster-pipeline"
    with running_stack(tmp_path, cluster.url, run, bus_extra="cluster = true\n") as stack:
        ids = submit(stack.config, run, (PROMPTS * 2)[:8])
        wait_for(lambda: len(scored_prompt_ids(stack.settings)) >= len(ids), 600, "every prompt to be scored", stack.proc)
        assert sorted(scored_prompt_ids(stack.settings)) == sorted(ids)
        assert all(r and r.get("cat_answer") is not None for r in results_of(stack.settings, ids))
        wait_for(lambda: list(stack.settings.weights_dir.glob("v*")), 300, "a published version", stack.proc)
