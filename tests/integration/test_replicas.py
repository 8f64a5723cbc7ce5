"""Policy engine replicas, real processes: two catq engines behind one run, a syncer and a
rollout worker. Each published version reaches both; rollouts are spread over both; a replica
killed and restarted mid-run, and one that joins mid-run, are listed for rollout only once they
serve the newest version."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import urllib.request

import pytest

from catq.bus import Bus
from catq.engines.client import EngineClient
from catq.engines.replicas import POOL
from catq.messages import ChatMessage, Prompt, RolloutGroup, WeightsPublished
from tests.helpers.engine_proc import EngineProcess, engine_factory, free_port  # noqa: F401  (fixture)
from tests.integration.test_learner_restart import start_learner, write_config
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (fixture: one tiny model a session)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def forward_passes(url: str) -> int:
    with urllib.request.urlopen(f"{url}/get_server_info", timeout=5) as reply:
        return json.loads(reply.read())["engine_stats"]["forward_passes"]


class Registry:
    """Watches the replica registry and remembers every (url, version) it ever listed."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.seen: set[tuple[str, int]] = set()
        self.now: dict[str, int] = {}

    async def poll(self) -> dict[str, int]:
        self.now = {url: e["weight_version"] for url, e in (await self.bus.replicas(POOL)).items()}
        self.seen |= set(self.now.items())
        return self.now

    async def wait(self, wanted: dict[str, int], timeout: float = 90) -> None:
        async with asyncio.timeout(timeout):
            while {u: v for u, v in (await self.poll()).items() if u in wanted} != wanted:
                await asyncio.sleep(0.05)


async def test_replicas_serve_every_version_share_the_load_and_join_only_when_current(
    tmp_path, run_name, redis_url, engine_factory, tiny_model_path  # noqa: F811
):
    model = tiny_model_path
    weights = tmp_path / "runs" / run_name / "weights"
    a = engine_factory(model=str(model), weights_dir=weights)
    b = engine_factory(model=str(model), weights_dir=weights)
    late_port = free_port()
    late_url = f"http://127.0.0.1:{late_port}"  # configured, started mid-run
    config = write_config(tmp_path, run_name, redis_url, model, extra=f"""
[engines]
policy_urls = ["{a.url}", "{b.url}", "{late_url}"]

[rollout]
group_size = 2

[rollout.math]
max_new_tokens = 4
""")
    bus = Bus(redis_url, run_name)
    registry = Registry(bus)

    async def publish(version: int) -> None:
        path = weights / f"v{version}"
        shutil.copytree(model, path)
        await bus.publish("weights", WeightsPublished(policy_version=version, path=str(path.resolve()), step=version))

    syncer = start_learner(config, tmp_path / "syncer.log", role="syncer")
    rollout = start_learner(config, tmp_path / "rollout.log", role="rollout")
    late = None
    try:
        await registry.wait({a.url: 0, b.url: 0})
        for version in (1, 2):
            await publish(version)
            await registry.wait({a.url: version, b.url: version})

        before = {url: forward_passes(url) for url in (a.url, b.url)}
        for i in range(8):
            await bus.publish("prompts", Prompt(f"p{i}", "math", [ChatMessage("user", f"What is {i} + 1?")]))
        async with asyncio.timeout(180):
            while len(await bus.read_all("groups", RolloutGroup)) < 8:
                await asyncio.sleep(0.2)
        assert all(forward_passes(url) > before[url] for url in (a.url, b.url)), "rollouts not spread"
        groups = [m for _, m in await bus.read_all("groups", RolloutGroup)]
        assert {g.policy_version for g in groups} == {2}

        # b dies and comes back on its initial weights: listed again only once on v2.
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(timeout=30)
        await registry.wait({a.url: 2})
        registry.seen.clear()
        restarted = EngineProcess(str(model), weights_dir=weights, port=b.port).start()
        late = EngineProcess(str(model), weights_dir=weights, port=late_port).start()  # joins
        try:
            await registry.wait({a.url: 2, b.url: 2, late_url: 2})
            await publish(3)
            await registry.wait({a.url: 3, b.url: 3, late_url: 3})
            assert (b.url, 0) not in registry.seen and (late_url, 0) not in registry.seen
            for url in (a.url, b.url, late_url):
                async with EngineClient(url, timeout_s=30) as client:
                    assert await client.weight_version() == "3"
        finally:
            restarted.stop()
            late.stop()
    finally:
        for proc in (syncer, rollout):
            proc.send_signal(signal.SIGTERM)
        for proc in (syncer, rollout):
            assert proc.wait(timeout=60) == 0
        await bus.close()
