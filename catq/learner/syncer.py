"""The weight syncer: keeps every policy engine on the newest published policy version.

    catq worker syncer --config configs/demo.toml      (or python -m workers.syncer)

It reads every WeightsPublished on ``weights`` (no consumer group: like any reader of that
stream it sees all of them), and brings each engine in ``engines.policy_urls`` to the newest
version with ``POST /update_weights_from_disk {"model_path", "weight_version"}``, then checks
that the engine's ``/model_info`` reports that version. On start it syncs to the newest version
already published. It also re-checks the engines every heartbeat, so an engine that restarted
(back on its initial weights) is brought forward again without waiting for a new version.

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
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from catq import metrics
from catq.config import Config
from catq.messages import DeadLetter, WeightsPublished, encode
from catq.topology import DEAD, WEIGHTS

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
    """policy engine URL -> EngineClient."""
    log: structlog.BoundLogger
    worker_id: str = ROLE
    target: Target | None = None
    """The newest valid published version."""
    refused_versions: set = field(default_factory=set)
    """Versions an engine rejected (4xx): never retried."""
    last_id: str = "0"

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
        await self.bus.publish(
            DEAD.name,
            DeadLetter(stream=WEIGHTS.name, entry_id=entry_id, payload=encode(message), error=error,
                       attempts=1, worker=self.worker_id),
        )

    async def poll(self, block_ms: int) -> None:
        entries = await self.bus.read_all(WEIGHTS.name, WeightsPublished, after_id=self.last_id,
                                          block_ms=block_ms)
        for entry_id, message in entries:
            self.last_id = entry_id
            await self.consider(entry_id, message)

    async def sync_all(self) -> None:
        """Bring every engine to the target; failures are logged and retried on the next pass."""
        if self.target is None or self.target.version in self.refused_versions:
            return
        await asyncio.gather(*(self.sync_engine(url, client) for url, client in self.clients.items()))

    async def sync_engine(self, url: str, client) -> None:
        from catq.engines.client import EngineError, parse_version

        target = self.target
        version = str(target.version)
        log = self.log.bind(engine=url, version=target.version)
        try:
            current = await client.weight_version()
            metrics.SERVED_VERSION.labels(url).set(parse_version(current))
            if parse_version(current) >= target.version:
                return  # already there, or ahead: never move an engine backwards
            if not Path(target.path).is_dir():
                log.warning("published weights gone (pruned?); waiting for a newer version",
                            path=target.path)
                return
            started = time.perf_counter()
            await client.update_weights_from_disk(target.path, weight_version=version)
            reported = await client.weight_version()
        except EngineError as exc:
            if exc.refused and await self._serves(client, version):
                # SGLang answers 400 when the cache flush after a load fails, the weights loaded
                log.warning("engine reported a failed update but serves the new version", error=str(exc))
                return
            if exc.refused:
                self.refused_versions.add(target.version)
                await self.dead_letter(target.entry_id, target.message, f"engine {url} refused the update: {exc}")
            else:
                log.warning("engine update failed; will retry", error=str(exc))
            return
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("engine unreachable; will retry", error=str(exc))
            return
        if reported != version:
            log.error("engine reports another version after update", reported=reported)
            return
        seconds = time.perf_counter() - started
        metrics.weights_reloaded(url, target.version, seconds)
        log.info("engine updated", seconds=round(seconds, 3), path=target.path)

    @staticmethod
    async def _serves(client, version: str) -> bool:
        from catq.engines.client import EngineError

        try:
            return await client.weight_version() == version
        except (EngineError, OSError, asyncio.TimeoutError):
            return False

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


async def run(config: Config) -> None:
    """Run the syncer until SIGTERM/SIGINT."""
    from catq.runtime import run_role

    await run_role(config, ROLE, serve)


async def serve(ctx) -> None:
    from catq.engines.client import EngineClient

    config = ctx.config
    clients = {url: EngineClient.from_config(config.engines, url) for url in config.engines.policy_urls}
    try:
        ctx.serving()
        ctx.log.info("syncer started", engines=list(clients), weights_dir=str(config.weights_dir))
        await Syncer(config, ctx.bus, clients, ctx.log, worker_id=ctx.worker_id).run(ctx.stop)
    finally:
        for client in clients.values():
            await client.close()
