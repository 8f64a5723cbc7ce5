"""The syncer's decisions with a fake bus and fake engine clients (no Redis, no engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog

from catq.config import load_config
from catq.engines.client import EngineError, parse_version
from catq.learner.syncer import Syncer
from catq.messages import DeadLetter, WeightsPublished, encode


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

    async def dead_letter_entry(self, stream, entry_id, message, error, *, worker=""):
        letter = DeadLetter(stream=stream, entry_id=entry_id, payload=encode(message), error=error, attempts=1,
                            worker=worker)
        return await self.publish("dead", letter)

    listed: dict = field(default_factory=dict)

    async def list_replica(self, pool, url, entry):
        self.listed[url] = entry

    async def unlist_replica(self, pool, url):
        self.listed.pop(url, None)


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


async def test_a_forged_version_number_neither_loads_nor_freezes_later_versions(tmp_path):
    """A message claiming v99 with the path of v1 is refused (the directory says 1); v2 and v3
    published afterwards still reach the engine."""
    engine = FakeEngine()
    syncer = make(tmp_path, engine)
    v1_path = published(tmp_path, 1, 1)[1].path
    syncer.bus.entries = [published(tmp_path, 1, 1),
                          ("2-0", WeightsPublished(policy_version=99, path=v1_path, step=99)),
                          published(tmp_path, 2, 3)]
    await syncer.poll(block_ms=1)
    await syncer.sync_all()
    assert engine.version == "2" and syncer.target.version == 2
    (stream, letter), = syncer.bus.published
    assert letter.entry_id == "2-0" and "claims version 99" in letter.error
    syncer.bus.entries.append(published(tmp_path, 3, 4))
    await syncer.poll(block_ms=1)
    await syncer.sync_all()
    assert [v for _, v in engine.updates] == ["2", "3"]


async def test_only_version_directories_of_the_weights_dir_are_loaded(tmp_path):
    engine = FakeEngine()
    syncer = make(tmp_path, engine)
    inner = tmp_path / "weights" / "v1" / "v7"
    inner.mkdir(parents=True)
    odd = tmp_path / "weights" / "latest"
    odd.mkdir()
    syncer.bus.entries = [("1-0", WeightsPublished(policy_version=7, path=str(inner), step=7)),
                          ("2-0", WeightsPublished(policy_version=8, path=str(odd), step=8))]
    await syncer.poll(block_ms=1)
    await syncer.sync_all()
    assert syncer.target is None and engine.updates == []
    assert all("no v<N> version directory" in letter.error for _, letter in syncer.bus.published)


async def test_a_symlinked_version_dir_counts_as_the_version_it_points_at(tmp_path):
    engine = FakeEngine()
    syncer = make(tmp_path, engine)
    _, v2 = published(tmp_path, 2, 1)
    (tmp_path / "weights" / "v9").symlink_to(v2.path)
    syncer.bus.entries = [("1-0", v2),
                          ("2-0", WeightsPublished(policy_version=9, path=str(tmp_path / "weights" / "v9"), step=9))]
    await syncer.poll(block_ms=1)
    assert syncer.target.version == 2 and len(syncer.bus.published) == 1


async def test_an_engine_ahead_of_the_target_is_never_moved_back(tmp_path):
    engine = FakeEngine(version="5")
    syncer = make(tmp_path, engine)
    syncer.bus.entries = [published(tmp_path, 3, 1)]
    await syncer.start()
    await syncer.sync_all()
    assert engine.updates == [] and engine.version == "5"
