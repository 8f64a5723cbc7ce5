"""The syncer's decisions with a fake bus and fake engine clients (no Redis, no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from catq.config import load_config
from catq.engines.client import EngineError
from catq.learner.syncer import Syncer, parse_version
from catq.messages import DeadLetter, WeightsPublished


@dataclass
class FakeBus:
    entries: list = field(default_factory=list)
    published: list = field(default_factory=list)

    async def last(self, stream, message_type):
        return self.entries[-1] if self.entries else None

    async def read_all(self, stream, message_type, after_id="0", block_ms=None, count=100):
        return [(i, m) for i, m in self.entries if int(i.split("-")[0]) > int(after_id.split("-")[0])]

    async def publish(self, stream, message, source=None):
        self.published.append((stream, message))
        return "x-0"


@dataclass
class FakeEngine:
    version: str | None = "default"
    updates: list = field(default_factory=list)
    fail_with: int | None = None

    async def weight_version(self):
        return self.version

    async def update_weights_from_disk(self, path, weight_version=None):
        if self.fail_with:
            raise EngineError("nope", self.fail_with)
        self.updates.append((path, weight_version))
        self.version = weight_version


def make(tmp_path, *engines):
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    clients = {f"http://e{i}": e for i, e in enumerate(engines)}
    return Syncer(config, FakeBus(), clients, structlog.get_logger())


def published(tmp_path, version, entry):
    path = tmp_path / "weights" / f"v{version}"
    path.mkdir(parents=True, exist_ok=True)
    return (f"{entry}-0", WeightsPublished(policy_version=version, path=str(path), step=version))


def test_parse_version():
    assert [parse_version(v) for v in (None, "default", "0", "7")] == [0, 0, 0, 7]


async def test_start_syncs_every_engine_to_the_newest_version(tmp_path):
    a, b = FakeEngine(), FakeEngine(version="2")
    syncer = make(tmp_path, a, b)
    syncer.bus.entries = [published(tmp_path, 1, 1), published(tmp_path, 2, 2)]
    await syncer.start()
    await syncer.sync_all()
    assert a.updates == [(str(tmp_path / "weights" / "v2"), "2")]
    assert b.updates == []  # already there


async def test_newer_messages_win_and_outside_paths_are_dead_lettered(tmp_path):
    engine = FakeEngine()
    syncer = make(tmp_path, engine)
    syncer.bus.entries = [published(tmp_path, 1, 1),
                          ("2-0", WeightsPublished(policy_version=5, path="/etc", step=5)),
                          published(tmp_path, 3, 3)]
    await syncer.poll(block_ms=1)
    await syncer.sync_all()
    assert engine.version == "3"
    (stream, letter), = syncer.bus.published
    assert stream == "dead" and isinstance(letter, DeadLetter) and letter.entry_id == "2-0"
    assert "outside the weights dir" in letter.error


async def test_engine_refusal_is_dead_lettered_once_and_not_retried(tmp_path):
    engine = FakeEngine(fail_with=400)
    syncer = make(tmp_path, engine)
    syncer.bus.entries = [published(tmp_path, 1, 1)]
    await syncer.start()
    await syncer.sync_all()
    await syncer.sync_all()
    assert len(syncer.bus.published) == 1 and syncer.refused_versions == {1}


async def test_transport_errors_are_retried(tmp_path):
    engine = FakeEngine(fail_with=None)
    engine.fail_with = 0
    syncer = make(tmp_path, engine)
    syncer.bus.entries = [published(tmp_path, 1, 1)]
    await syncer.start()

    async def down(path, weight_version=None):
        raise EngineError("connection refused", None)

    real = engine.update_weights_from_disk
    engine.update_weights_from_disk = down
    await syncer.sync_all()
    assert engine.version == "default" and syncer.bus.published == []
    engine.update_weights_from_disk = real
    await syncer.sync_all()
    assert engine.version == "1"
