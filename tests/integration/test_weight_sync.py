"""Weight sync end to end: the learner publishes, the syncer (a real process) updates a real catq
engine server, /model_info and the following generate report the new version; a
WeightsPublished pointing outside the weights dir is refused and dead-lettered, and one whose
claimed version is not its directory's (a forged "v99" pointing at v1) is refused without
freezing later genuine versions."""

from __future__ import annotations

import asyncio
import shutil
import signal

import pytest

from catq.bus import Bus
from catq.engines.client import EngineClient
from catq.messages import DeadLetter, WeightsPublished, decode
from tests.helpers.engine_proc import engine_factory  # noqa: F401  (fixture)
from tests.integration.test_learner_restart import (
    make_scored,
    start_learner,
    write_config,
)
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (fixture: one tiny model a session)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def wait_version(client: EngineClient, version: str, timeout: float = 90.0) -> None:
    for _ in range(int(timeout * 4)):
        if await client.weight_version() == version:
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"engine never reported weight_version {version!r} "
                         f"(last {await client.weight_version()!r})")


async def wait_published(bus: Bus, version: int, timeout: float = 90.0) -> WeightsPublished:
    for _ in range(int(timeout * 4)):
        last = await bus.last("weights", WeightsPublished)
        if last and last[1].policy_version >= version:
            return last[1]
        await asyncio.sleep(0.25)
    raise AssertionError(f"version {version} never published")


async def test_learner_publishes_syncer_updates_engine_and_refuses_outside_paths(
    tmp_path, run_name, redis_url, engine_factory, tiny_model_path  # noqa: F811
):
    model = tiny_model_path
    run_dir = tmp_path / "runs" / run_name
    engine = engine_factory(model=str(model), weights_dir=run_dir / "weights")
    config = write_config(tmp_path, run_name, redis_url, model,
                          extra=f'[engines]\npolicy_urls = ["{engine.url}"]')
    bus = Bus(redis_url, run_name)
    client = EngineClient(engine.url, timeout_s=30)
    procs = []
    try:
        assert await client.weight_version() in (None, "default", "0")
        procs.append(start_learner(config, tmp_path / "learner.log"))
        for i in range(2):
            await bus.publish("scored", make_scored(i, [1.0, 0.0]))
        v1 = await wait_published(bus, 1)
        assert v1.path == str((run_dir / "weights" / "v1").resolve())

        # A syncer started after v1 was published brings the engine to it at once.
        procs.append(start_learner(config, tmp_path / "syncer.log", role="syncer"))
        await wait_version(client, "1")
        (completion,) = await client.generate([1, 2, 3], max_new_tokens=2, temperature=0.0)
        assert completion.weight_version == "1"

        # The next published version reaches the running engine.
        for i in range(2, 4):
            await bus.publish("scored", make_scored(i, [0.0, 1.0]))
        await wait_published(bus, 2)
        await wait_version(client, "2")
        (completion,) = await client.generate([4, 5, 6], max_new_tokens=2, temperature=0.0)
        assert completion.weight_version == "2"

        # A message pointing outside the weights dir is refused and dead-lettered.
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        bad_id = await bus.publish("weights", WeightsPublished(policy_version=99, path=str(outside), step=99))
        sneaky_id = await bus.publish("weights", WeightsPublished(
            policy_version=98, path=str(run_dir / "weights" / ".." / ".." / "x"), step=98))
        letters = []
        for _ in range(120):
            letters = [decode(p, expected=DeadLetter) for _, p in await bus.tail_raw("dead", 10)]
            if len(letters) >= 2:
                break
            await asyncio.sleep(0.25)
        refused = {d.entry_id: d for d in letters if d.stream == "weights"}
        assert set(refused) == {bad_id, sneaky_id}
        assert "outside the weights dir" in refused[bad_id].error
        assert decode(refused[bad_id].payload, expected=WeightsPublished).policy_version == 99
        await asyncio.sleep(1.0)
        assert await client.weight_version() == "2"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=60) == 0
        await client.close()
        await bus.close()


async def wait_dead_letter(bus: Bus, entry_id: str, timeout: float = 30.0) -> DeadLetter:
    for _ in range(int(timeout * 4)):
        for _, payload in await bus.tail_raw("dead", 10):
            letter = decode(payload, expected=DeadLetter)
            if letter.entry_id == entry_id:
                return letter
        await asyncio.sleep(0.25)
    raise AssertionError(f"entry {entry_id} was never dead-lettered")


async def test_a_forged_version_number_is_refused_and_later_versions_still_apply(
    tmp_path, run_name, redis_url, engine_factory, tiny_model_path  # noqa: F811
):
    """The syncer takes the version from the v<N> directory, not from the message: "v99" with
    v1's path is refused, the engine stays on v2, and v3 published afterwards is applied."""
    model = tiny_model_path
    run_dir = tmp_path / "runs" / run_name
    weights = run_dir / "weights"
    engine = engine_factory(model=str(model), weights_dir=weights)
    config = write_config(tmp_path, run_name, redis_url, model,
                          extra=f'[engines]\npolicy_urls = ["{engine.url}"]')
    bus = Bus(redis_url, run_name)
    client = EngineClient(engine.url, timeout_s=30)

    async def publish_version(version: int, claimed: int | None = None, of: int | None = None) -> str:
        path = weights / f"v{of or version}"
        if not path.exists():
            shutil.copytree(model, path)
        return await bus.publish("weights", WeightsPublished(
            policy_version=claimed or version, path=str(path.resolve()), step=version))

    syncer = start_learner(config, tmp_path / "syncer.log", role="syncer")
    try:
        await publish_version(1)
        await wait_version(client, "1")
        await publish_version(2)
        await wait_version(client, "2")

        forged_id = await publish_version(99, of=1)
        letter = await wait_dead_letter(bus, forged_id)
        assert "claims version 99" in letter.error and "holds version 1" in letter.error
        await asyncio.sleep(1.0)
        assert await client.weight_version() == "2"  # neither moved back to v1 nor called v99

        await publish_version(3)
        await wait_version(client, "3")
        (completion,) = await client.generate([1, 2, 3], max_new_tokens=2, temperature=0.0)
        assert completion.weight_version == "3"
    finally:
        syncer.send_signal(signal.SIGTERM)
        assert syncer.wait(timeout=60) == 0
        await client.close()
        await bus.close()
