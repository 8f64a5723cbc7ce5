"""The learner's integrity guards on real Redis, real files and real learner processes: the lease
and its fencing token, one training per (prompt, policy version), resuming past an unreadable
checkpoint, and a learner at max_steps that reads nothing."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from catq.bus import Bus, LeaseLost
from catq.learner import checkpoint
from catq.messages import DeadLetter, WeightsPublished
from catq.results import ResultStore
from tests.integration.test_learner_restart import (
    make_scored,
    metrics,
    start_learner,
    wait_for,
    write_config,
)
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (fixture: one tiny model a session)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def events(log: Path, event: str) -> list[dict]:
    """The JSON log lines of ``log`` whose event is ``event``."""
    found = []
    for line in log.read_text().splitlines() if log.exists() else []:
        if line.startswith("{") and f'"{event}' in line:
            record = json.loads(line)
            if record.get("event", "").startswith(event):
                found.append(record)
    return found


def config_with(tmp_path: Path, run: str, redis_url: str, model: Path, bus: str = "", **learner) -> Path:
    path = write_config(tmp_path, run, redis_url, model, **learner)
    path.write_text(path.read_text().replace("[bus]\n", f"[bus]\n{bus}\n"))
    return path


async def published_versions(bus: Bus) -> list[int]:
    return [m.policy_version for _, m in await bus.read_all("weights", WeightsPublished)]


async def test_a_stale_fencing_token_publishes_nothing(bus):
    old = await bus.acquire_lease("learner", "old", ttl_ms=200)
    assert old and await bus.acquire_lease("learner", "new", ttl_ms=200) == 0
    assert await bus.lease_holder("learner") == "old"
    await bus.publish_policy_version("learner", old, 1, WeightsPublished(policy_version=1, path="/w/v1", step=1))
    await asyncio.sleep(0.3)  # the old holder stalls past its lease; a new one takes it
    new = await bus.acquire_lease("learner", "new", ttl_ms=5000)
    assert new > old
    with pytest.raises(LeaseLost, match="no longer current"):
        await bus.publish_policy_version("learner", old, 2, WeightsPublished(policy_version=2, path="/w/v2", step=2))
    assert not await bus.renew_lease("learner", old, "old", 200) and not await bus.release_lease("learner", old)
    assert await published_versions(bus) == [1] and await bus.get_policy_version() == 1
    await bus.publish_policy_version("learner", new, 2, WeightsPublished(policy_version=2, path="/w/v2", step=2))
    assert await published_versions(bus) == [1, 2] and await bus.get_policy_version() == 2
    assert await bus.release_lease("learner", new) and await bus.lease_holder("learner") is None


async def test_a_second_learner_waits_for_the_lease_and_the_one_it_replaced_stops(
    tmp_path, run_name, redis_url, tiny_model_path  # noqa: F811
):
    config = config_with(tmp_path, run_name, redis_url, tiny_model_path)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    bus = Bus(redis_url, run_name)
    first = start_learner(config, first_log)
    second = None
    try:
        await wait_for(lambda: events(first_log, "learner ready"), 120, "first learner ready", first)
        second = start_learner(config, second_log)
        await wait_for(lambda: events(second_log, "waiting for the learner lease"), 60, "second waits", second)
        assert not events(second_log, "learner ready")
        first.send_signal(signal.SIGSTOP)  # stalls past its lease (3 heartbeats of 1 s)
        await wait_for(lambda: events(second_log, "learner ready"), 120, "second takes over", second)
        first.send_signal(signal.SIGCONT)
        assert await asyncio.to_thread(first.wait, 60) == 1
        last_line = first_log.read_text().strip().splitlines()[-1]
        assert last_line.startswith("catq learner: learner lease lost (fencing token 1 is stale")
        assert not events(first_log, "published")

        for i in range(2):  # the new holder trains and publishes
            await bus.publish("scored", make_scored(i, [1.0, 0.0]))
        await wait_for(lambda: events(second_log, "published"), 120, "second publishes", second)
        assert await published_versions(bus) == [1] and await bus.get_policy_version() == 1
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        assert second is None or second.wait(timeout=60) == 0, second_log.read_text()[-3000:]
        first.wait(timeout=60)
        await bus.close()


async def test_the_same_group_published_twice_is_trained_once_across_a_restart(
    tmp_path, run_name, redis_url, tiny_model_path  # noqa: F811
):
    config = config_with(tmp_path, run_name, redis_url, tiny_model_path)
    run_dir, log = tmp_path / "runs" / run_name, tmp_path / "learner.log"
    bus = Bus(redis_url, run_name)
    twice = make_scored(0, [1.0, 0.0, 0.5])
    try:
        original = await bus.publish("scored", twice)
        await bus.publish("scored", twice)
        kept = [original, await bus.publish("scored", make_scored(1, [0.0, 1.0]))]
        proc = start_learner(config, log)
        await wait_for(lambda: len(metrics(run_dir)) >= 1, 120, "step 1", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]

        await bus.publish("scored", twice)  # again, to a restarted learner: known from Redis
        kept += [await bus.publish("scored", make_scored(i, [1.0, 0.0])) for i in (2, 3)]
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 2, 120, "step 2", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]

        lines = metrics(run_dir)
        assert [e for m in lines for e in m["entry_ids"]] == kept
        assert sum(m["groups_skipped_duplicate"] for m in lines) == 2
        assert len(events(log, "duplicate group skipped")) == 2
        result = await ResultStore(bus, 60).get("p0")
        assert (result["status"], result["trained_step"]) == ("trained", 1)
        assert (await bus.stats(("scored",)))["scored"]["groups"][0]["pending"] == 0
    finally:
        await bus.close()


async def test_resume_skips_a_truncated_newest_checkpoint_and_never_reuses_a_version(
    tmp_path, run_name, redis_url, tiny_model_path  # noqa: F811
):
    config = config_with(tmp_path, run_name, redis_url, tiny_model_path)
    run_dir, log = tmp_path / "runs" / run_name, tmp_path / "learner.log"
    bus = Bus(redis_url, run_name)
    try:
        for i in range(4):
            await bus.publish("scored", make_scored(i, [1.0, 0.0]))
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 2, 120, "two steps", proc)
            await wait_for(lambda: events(log, "published") and len(events(log, "published")) >= 2, 60,
                           "version 2 published", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        newest = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1][1]
        assert newest.name == "step-00000002.pt"
        newest.write_bytes(newest.read_bytes()[:1000])  # a partial file

        proc = start_learner(config, log)
        try:
            ready = await wait_for(lambda: events(log, "learner ready")[1:], 120, "restart", proc)
            assert (ready[0]["step"], ready[0]["version"]) == (1, 1)
            (skipped,) = events(log, "unreadable checkpoint skipped")
            assert skipped["checkpoint"] == str(newest) and skipped["level"] == "warning"
            for i in range(4, 6):
                await bus.publish("scored", make_scored(i, [0.0, 1.0]))
            await wait_for(lambda: len(events(log, "published")) >= 3, 120, "a version after the restart", proc)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert await published_versions(bus) == [1, 2, 3]  # 2 is not announced again
        assert await bus.get_policy_version() == 3
    finally:
        await bus.close()


async def test_a_learner_restarted_at_max_steps_reads_nothing(
    tmp_path, run_name, redis_url, tiny_model_path  # noqa: F811
):
    # max_attempts = 1: a second delivery of anything would dead-letter it
    config = config_with(tmp_path, run_name, redis_url, tiny_model_path, bus="max_attempts = 1", max_steps=1)
    run_dir, log = tmp_path / "runs" / run_name, tmp_path / "learner.log"
    bus = Bus(redis_url, run_name)
    try:
        for i in range(3):
            await bus.publish("scored", make_scored(i, [1.0, 0.0]))
        for _ in range(3):  # the first run trains its one step; two supervisor-style restarts
            proc = start_learner(config, log)
            assert await asyncio.to_thread(proc.wait, 120) == 0, log.read_text()[-3000:]
        assert [m["step"] for m in metrics(run_dir)] == [1]
        assert len(events(log, "max_steps reached: reading nothing")) == 2
        assert await bus.read_all("dead", DeadLetter) == []
        # the group the first run read but had no step left for stays pending, once delivered
        assert (await bus.stats(("scored",)))["scored"]["groups"][0]["pending"] == 1
    finally:
        await bus.close()
