"""Policy replicas: discovery, the registry the syncer keeps, and how rollout picks a replica
(fake bus and engines; tests/integration/test_replicas.py runs real ones)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import structlog

from catq.config import load_config
from catq.engines.client import EngineError
from catq.engines.replicas import REGISTRY_FRESH_BEATS, NoReplicaReady, ReplicaPicker, discover, registry_entry
from catq.learner.syncer import Syncer
from catq.messages import DeadLetter, WeightsPublished, encode


@dataclass
class FakeBus:
    listed: dict = field(default_factory=dict)
    syncers: list = field(default_factory=lambda: ["syncer-1"])
    entries: list = field(default_factory=list)
    published: list = field(default_factory=list)

    async def live_workers(self, role):
        return self.syncers if role == "syncer" else []

    async def replicas(self, pool):
        return dict(self.listed)

    async def list_replica(self, pool, url, entry):
        self.listed[url] = entry

    async def unlist_replica(self, pool, url):
        self.listed.pop(url, None)

    async def last(self, stream, message_type):
        return self.entries[-1] if self.entries else None

    async def publish(self, stream, message, source=None):
        self.published.append((stream, message))
        return "x-0"

    async def dead_letter_entry(self, stream, entry_id, message, error, *, worker=""):
        letter = DeadLetter(stream=stream, entry_id=entry_id, payload=encode(message), error=error, attempts=1,
                            worker=worker)
        return await self.publish("dead", letter)


@dataclass
class FakeEngine:
    version: str | None = "default"
    down: bool = False
    refuse: bool = False
    updates: list = field(default_factory=list)
    closed: bool = False
    listed_during_update: bool | None = None
    bus: FakeBus | None = None
    url: str = ""

    async def weight_version(self):
        if self.down:
            raise EngineError("connection refused")
        return self.version

    async def update_weights_from_disk(self, path, weight_version=None):
        if self.bus is not None:
            self.listed_during_update = self.url in self.bus.listed
        if self.refuse:
            raise EngineError("bad weights", 400)
        self.updates.append(path)
        self.version = weight_version

    async def close(self):
        self.closed = True


# -- discovery -----------------------------------------------------------------------------------

async def test_a_host_name_is_one_replica_per_address_and_ips_and_https_stay_as_given():
    assert await discover(["http://localhost:30000"]) == ["http://127.0.0.1:30000"]
    assert await discover(["http://localhost:30000"], resolve=False) == ["http://localhost:30000"]
    assert await discover(["http://10.0.0.2:1", "https://localhost:2", "http://10.0.0.2:1"]) == [
        "http://10.0.0.2:1", "https://localhost:2"]
    assert await discover(["http://no-such-host.invalid:3"]) == ["http://no-such-host.invalid:3"]


# -- picking -------------------------------------------------------------------------------------

def picker(bus, static=("http://a", "http://b")) -> ReplicaPicker:
    return ReplicaPicker(bus, list(static), heartbeat_s=1.0, make_client=lambda url: FakeEngine(url=url))


async def test_without_a_syncer_rollout_uses_the_configured_urls():
    bus = FakeBus(syncers=[], listed={"http://c": registry_entry(3)})
    assert await picker(bus).urls() == ["http://a", "http://b"]


async def test_with_a_syncer_only_fresh_listed_replicas_get_requests():
    stale = {**registry_entry(3), "seen_at": time.time() - REGISTRY_FRESH_BEATS - 1}
    bus = FakeBus(listed={"http://c": registry_entry(3), "http://d": stale})
    replicas = picker(bus)
    assert await replicas.urls() == ["http://c"]
    assert await replicas.versions() == [3]
    async with replicas.use() as (url, client):
        assert url == "http://c" and client.url == "http://c"


async def test_no_replica_listed_while_a_syncer_runs_is_a_transient_wait():
    with pytest.raises(NoReplicaReady) as waiting:
        async with picker(FakeBus()).use():
            pass
    assert not waiting.value.refused  # retried with backoff, never counted against the prompt


async def test_requests_go_to_the_least_busy_replica_and_round_robin_on_ties():
    bus = FakeBus(listed={u: registry_entry(1) for u in ("http://a", "http://b", "http://c")})
    replicas = picker(bus)
    async with replicas.use() as (first, _), replicas.use() as (second, _):
        async with replicas.use() as (third, _):
            assert sorted([first, second, third]) == ["http://a", "http://b", "http://c"]
        async with replicas.use() as (fourth, _):
            assert fourth == third  # the only one with nothing outstanding
    fresh_picker, order = picker(bus), []
    for _ in range(6):  # one at a time: every replica idle, so the least used goes next
        async with fresh_picker.use() as (url, _):
            order.append(url)
    assert order == ["http://a", "http://b", "http://c"] * 2


# -- the syncer's registry -----------------------------------------------------------------------

def syncer(tmp_path, bus, engines: dict) -> Syncer:
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.engines.policy_urls = list(engines)
    config.engines.resolve_replicas = False
    for url, engine in engines.items():
        engine.bus, engine.url = bus, url
    return Syncer(config, bus, {}, structlog.get_logger(), make_client=lambda url: engines[url])


def target(tmp_path, bus, version: int) -> None:
    path = tmp_path / "weights" / f"v{version}"
    path.mkdir(parents=True, exist_ok=True)
    bus.entries.append((f"{version}-0", WeightsPublished(policy_version=version, path=str(path), step=version)))


async def test_a_replica_is_listed_only_once_it_serves_the_newest_version(tmp_path):
    bus = FakeBus()
    a, b = FakeEngine(version="1"), FakeEngine(version="2")
    s = syncer(tmp_path, bus, {"http://a": a, "http://b": b})
    await s.sync_all()  # nothing published yet: every answering replica is current
    assert {u: e["weight_version"] for u, e in bus.listed.items()} == {"http://a": 1, "http://b": 2}
    target(tmp_path, bus, 2)
    await s.start()
    await s.sync_all()
    assert a.listed_during_update is False  # taken off before it loads
    assert {u: e["weight_version"] for u, e in bus.listed.items()} == {"http://a": 2, "http://b": 2}


async def test_a_replica_that_stops_answering_or_goes_away_is_unlisted(tmp_path):
    bus = FakeBus()
    a, b = FakeEngine(), FakeEngine()
    s = syncer(tmp_path, bus, {"http://a": a, "http://b": b})
    await s.sync_all()
    b.down = True
    await s.sync_all()
    assert list(bus.listed) == ["http://a"]
    s.config.engines.policy_urls = ["http://b"]  # a scaled down: gone from discovery
    await s.sync_all()
    assert "http://a" not in bus.listed and a.closed


async def test_a_replica_joining_behind_is_brought_to_the_newest_version_before_it_is_listed(tmp_path):
    bus = FakeBus()
    target(tmp_path, bus, 3)
    engines = {"http://a": FakeEngine(version="3"), "http://late": FakeEngine(version="default")}
    s = syncer(tmp_path, bus, {"http://a": engines["http://a"]})
    s.make_client = lambda url: engines[url]
    engines["http://late"].bus, engines["http://late"].url = bus, "http://late"
    await s.start()
    await s.sync_all()
    s.config.engines.policy_urls = ["http://a", "http://late"]
    await s.sync_all()
    assert engines["http://late"].listed_during_update is False
    assert bus.listed["http://late"]["weight_version"] == 3


async def test_a_version_every_replica_refuses_leaves_them_listed_on_the_last_good_one(tmp_path):
    bus = FakeBus()
    a = FakeEngine(version="1", refuse=True)
    s = syncer(tmp_path, bus, {"http://a": a})
    target(tmp_path, bus, 2)
    await s.start()
    await s.sync_all()
    assert bus.listed["http://a"]["weight_version"] == 1
    assert [stream for stream, _ in bus.published] == ["dead"]
