"""The weight syncer: keeps every policy engine on the newest published policy version.

    catq worker syncer --config configs/demo.toml      (or python -m workers.syncer)

It reads every WeightsPublished on ``weights`` (no consumer group: like any reader of that
stream it sees all of them), and brings each policy engine replica to the newest version with
``POST /update_weights_from_disk {"model_path", "weight_version"}``, then checks that the
engine's ``/model_info`` reports that version. On start it syncs to the newest version already
published. Every heartbeat it finds the replicas again (each URL of ``engines.policy_urls``, one
per address its host name resolves to: catq/engines/replicas.py) and re-checks them, so a
replica that joined, or restarted back on its initial weights, is brought forward without
waiting for a new version.

It also keeps the run's replica registry, which rollout reads to spread its requests: a replica
is listed (with the version it serves) only while it answers and serves the newest version, and
is taken off the list before an update and whenever it stops answering. So rollout never sends
a request to a replica that is loading weights or still on old ones.

An engine that refuses our key (HTTP 401/403) stops the syncer with a ConfigError: no version
is refused for it. An update answered 400 after which the engine reports the new version anyway
(SGLang does this when the cache flush after a load fails) counts as done.

A message whose path is not inside ``weights_dir`` is refused and dead-lettered: the stream is
writable by anything that can reach Redis, and an engine must only load what the learner wrote.
(The catq engine enforces the same rule itself with ``--weights-dir``; SGLang does not.)
For the same reason the version is taken from the ``v<N>`` directory the path names
(catq/learner/publish.py), never from the number the message claims: a message whose path is no
``v<N>`` directory of the weights dir, or whose claimed version differs from it, is refused too.
So a forged "v99" pointing at v1 cannot make every later genuine version look old. An engine is
never moved backwards: it is updated only when it reports an older version than the target.

Why its own process rather than a task inside each rollout worker:
- rollout scales to many copies over the same engines; one syncer per run updates each engine
  once per version, where N rollout workers would race to reload the same engine N times;
- an engine that restarts, or a version published while no prompts flow, is still brought up to
  date: syncing does not depend on rollout traffic, and rollout stays stateless;
- a weight reload can take long for a big model; it never stalls rollout's own event loop,
  heartbeat or shutdown, and each role keeps one job (DESIGN §2: roles are separate processes).
Rollout needs no coupling to it: every completion carries the engine's ``weight_version``.

A LoRA policy (``learner.lora``): each version is an adapter directory, and a replica is moved
to it with SGLang's ``/load_lora_adapter`` + ``/update_weight_version`` instead
(catq/engines/adapters.py), under the same rules (never backwards, unlisted while it moves,
a refusal dead-lettered); the registry lists the adapter's name, which rollout sends as
``lora_path``, and adapters older than the last two are unloaded after listing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from catq import metrics
from catq.config import Config
from catq.engines.replicas import POOL, discover, registry_entry
from catq.messages import WeightsPublished
from catq.topology import WEIGHTS

ROLE = "syncer"


@dataclass(frozen=True)
class Target:
    """A version to bring engines to: its number (from its directory name) and where it is."""

    version: int
    path: str
    entry_id: str
    message: WeightsPublished
    """The message as published, for a dead letter."""


@dataclass
class Syncer:
    config: Config
    bus: object
    clients: dict
    """policy engine replica URL -> EngineClient."""
    log: structlog.BoundLogger
    worker_id: str = ROLE
    target: Target | None = None
    """The newest valid published version."""
    refused_versions: set = field(default_factory=set)
    """Versions an engine rejected (4xx): never retried."""
    last_id: str = "0"
    make_client: Callable[[str], object] | None = None
    """Builds a client for a replica found on a pass; None keeps ``clients`` fixed."""
    down: set = field(default_factory=set)
    """Replicas that did not answer on the last pass (logged once, when they go down)."""
    pruned: dict = field(default_factory=dict)
    """LoRA policy: the version each replica's old adapters were last unloaded at."""

    async def start(self) -> None:
        """Sync to the newest version published before we started."""
        last = await self.bus.last(WEIGHTS.name, WeightsPublished)
        if last is not None:
            entry_id, message = last
            self.last_id = entry_id
            await self.consider(entry_id, message)

    async def consider(self, entry_id: str, message: WeightsPublished) -> None:
        """Validate a message; refuse (dead-letter) one that names no published version
        directory, else make it the target if its directory's version is newer."""
        error, version = self.check(message)
        if error:
            await self.dead_letter(entry_id, message, f"refused: {error}")
            return
        if self.target is None or version > self.target.version:
            path = str(Path(message.path).resolve())
            self.target = Target(version, path, entry_id, message)

    def check(self, message: WeightsPublished) -> tuple[str, int]:
        """(why the message is refused or "", the version its directory holds)."""
        from catq.learner.publish import is_inside, version_of_dir

        weights_dir = self.config.weights_dir
        if not is_inside(message.path, weights_dir):
            return f"path {message.path!r} is outside the weights dir {weights_dir}", 0
        version = version_of_dir(message.path, weights_dir)
        if version is None:
            return f"path {message.path!r} is no v<N> version directory of {weights_dir}", 0
        if version != message.policy_version:
            return (f"message claims version {message.policy_version} but its path "
                    f"{message.path!r} holds version {version}"), version
        return "", version

    async def dead_letter(self, entry_id: str, message: WeightsPublished, error: str) -> None:
        self.log.error("weights refused", entry_id=entry_id, version=message.policy_version, error=error)
        await self.bus.dead_letter_entry(WEIGHTS.name, entry_id, message, error, worker=self.worker_id)

    async def poll(self, block_ms: int) -> None:
        entries = await self.bus.read_all(WEIGHTS.name, WeightsPublished, after_id=self.last_id,
                                          block_ms=block_ms)
        for entry_id, message in entries:
            self.last_id = entry_id
            await self.consider(entry_id, message)

    async def sync_all(self) -> None:
        """Find the replicas, bring each to the target and list those that serve it; failures
        are logged and retried on the next pass."""
        await self.refresh_replicas()
        await asyncio.gather(*(self.sync_and_list(url, client) for url, client in self.clients.items()))

    async def refresh_replicas(self) -> None:
        """Clients for replicas that appeared; close and unlist those that are gone."""
        if self.make_client is None:
            return
        engines = self.config.engines
        urls = await discover(engines.policy_urls, engines.resolve_replicas)
        for url in urls:
            if url not in self.clients:
                self.log.info("policy replica found", engine=url)
                self.clients[url] = self.make_client(url)
        for url in [u for u in self.clients if u not in urls]:
            self.log.info("policy replica gone", engine=url)
            await self.clients.pop(url).close()
            await self.bus.unlist_replica(POOL, url)

    async def sync_and_list(self, url: str, client) -> None:
        """Sync one replica, then list it if it serves what it should, else unlist it."""
        serving = await self.sync_engine(url, client)
        self._note_answering(url, serving is not None)
        target = self.target
        current = (serving is not None and (target is None or serving >= target.version
                                            or target.version in self.refused_versions))
        try:
            if current:
                await self.bus.list_replica(POOL, url, registry_entry(serving, self._adapter(serving)))
            else:
                await self.bus.unlist_replica(POOL, url)
        except Exception as exc:  # Redis away: the entry ages out, and the next pass writes it
            self.log.warning("could not update the replica registry", engine=url, error=str(exc))
        if current and self.lora and self.pruned.get(url) != serving:
            from catq.engines import adapters

            if await adapters.prune(client, serving, self.log.bind(engine=url)):
                self.pruned[url] = serving

    @property
    def lora(self) -> bool:
        """A LoRA policy: versions are adapters (catq/engines/adapters.py)."""
        return self.config.learner.lora.enabled

    def _adapter(self, version: int) -> str | None:
        from catq.engines.adapters import adapter_name

        return adapter_name(version) if self.lora else None

    def _note_answering(self, url: str, answering: bool) -> None:
        if not answering and url not in self.down:
            self.log.warning("policy replica not answering; unlisted until it is back", engine=url)
            self.down.add(url)
        elif answering and url in self.down:
            self.log.info("policy replica answering again", engine=url)
            self.down.discard(url)

    async def sync_engine(self, url: str, client) -> int | None:
        """Bring one replica to the target; return the version it serves afterwards (None when
        it does not answer)."""
        from catq.engines.client import EngineError, parse_version

        target = self.target
        log = self.log.bind(engine=url, version=target.version if target else None)
        current = await self._serving(client)
        if current is None:
            return None
        metrics.SERVED_VERSION.labels(url).set(current)
        try:
            if target is None or target.version in self.refused_versions or current >= target.version:
                return current  # already there, or ahead: never move an engine backwards
            if not Path(target.path).is_dir():
                log.warning("published weights gone (pruned?); waiting for a newer version",
                            path=target.path)
                return current
            await self.bus.unlist_replica(POOL, url)  # no rollout traffic while it loads
            started = time.perf_counter()
            if self.lora:
                from catq.engines import adapters

                await adapters.move(client, target.version, target.path)
            else:
                await client.update_weights_from_disk(target.path, weight_version=str(target.version))
            reported = parse_version(await client.weight_version())
        except EngineError as exc:
            return await self._after_failed_update(url, client, exc, log)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("engine unreachable; will retry", error=str(exc))
            return None
        if reported != target.version:
            log.error("engine reports another version after update", reported=reported)
            return reported
        seconds = time.perf_counter() - started
        metrics.weights_reloaded(url, target.version, seconds)
        log.info("engine updated", seconds=round(seconds, 3), path=target.path)
        return target.version

    async def _after_failed_update(self, url: str, client, exc, log) -> int | None:
        target = self.target
        serving = await self._serving(client)
        if exc.refused and serving == target.version:
            # SGLang answers 400 when the cache flush after a load fails, the weights loaded
            log.warning("engine reported a failed update but serves the new version", error=str(exc))
        elif exc.refused:
            self.refused_versions.add(target.version)
            await self.dead_letter(target.entry_id, target.message, f"engine {url} refused the update: {exc}")
        else:
            log.warning("engine update failed; will retry", error=str(exc))
        return serving

    @staticmethod
    async def _serving(client) -> int | None:
        from catq.engines.client import EngineError, parse_version

        try:
            return parse_version(await client.weight_version())
        except (EngineError, OSError, asyncio.TimeoutError):
            return None

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        recheck_s = self.config.worker.heartbeat_s
        synced = None
        next_check = 0.0
        while not stop.is_set():
            if self.target is not synced or time.monotonic() >= next_check:
                await self.sync_all()
                synced, next_check = self.target, time.monotonic() + recheck_s
            await self.poll(self.config.bus.block_ms)


async def serve(ctx) -> None:
    from catq.engines.client import EngineClient

    config = ctx.config
    clients: dict = {}
    try:
        ctx.serving()
        ctx.log.info("syncer started", engines=config.engines.policy_urls, weights_dir=str(config.weights_dir))
        await Syncer(config, ctx.bus, clients, ctx.log, worker_id=ctx.worker_id,
                     make_client=lambda url: EngineClient.from_config(config.engines, url)).run(ctx.stop)
    finally:
        for client in clients.values():
            await client.close()
