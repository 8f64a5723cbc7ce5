"""The weight syncer: keeps every policy engine on the newest published policy version.

    catq worker syncer --config configs/demo.toml      (or python -m workers.syncer)

It reads every WeightsPublished on ``weights`` (no consumer group: like any reader of that
stream it sees all of them), and brings each engine in ``engines.policy_urls`` to the newest
version with ``POST /update_weights_from_disk {"model_path", "weight_version"}``, then checks
that the engine's ``/model_info`` reports that version. On start it syncs to the newest version
already published. It also re-checks the engines every heartbeat, so an engine that restarted
(back on its initial weights) is brought forward again without waiting for a new version.

A message whose path is not inside ``weights_dir`` is refused and dead-lettered: the stream is
writable by anything that can reach Redis, and an engine must only load what the learner wrote.
(The catq engine enforces the same rule itself with ``--weights-dir``; SGLang does not.)

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

from catq.config import Config
from catq.log import default_worker_id, setup_logging
from catq.messages import DeadLetter, WeightsPublished, encode

ROLE = "syncer"


def parse_version(reported: str | None) -> int:
    """The engine's weight_version as an int: "default", None or anything non-numeric is 0
    (the initial weights)."""
    try:
        return int(reported) if reported is not None else 0
    except ValueError:
        return 0


@dataclass
class Syncer:
    config: Config
    bus: object
    clients: dict
    """policy engine URL -> EngineClient."""
    log: structlog.BoundLogger
    worker_id: str = ROLE
    target: WeightsPublished | None = None
    """The newest valid published version."""
    refused_versions: set = field(default_factory=set)
    """Versions an engine rejected (4xx): never retried."""
    last_id: str = "0"
    target_id: str = ""
    """Stream entry id of the target message."""

    async def start(self) -> None:
        """Sync to the newest version published before we started."""
        last = await self.bus.last("weights", WeightsPublished)
        if last is not None:
            entry_id, message = last
            self.last_id = entry_id
            await self.consider(entry_id, message)

    async def consider(self, entry_id: str, message: WeightsPublished) -> None:
        """Validate a message; refuse (dead-letter) one outside the weights dir, else make it the
        target if it is newer."""
        from catq.learner.publish import is_inside

        if not is_inside(message.path, self.config.weights_dir):
            error = f"refused: path {message.path!r} is outside the weights dir {self.config.weights_dir}"
            await self.dead_letter(entry_id, message, error)
            return
        if self.target is None or message.policy_version > self.target.policy_version:
            self.target, self.target_id = message, entry_id

    async def dead_letter(self, entry_id: str, message: WeightsPublished, error: str) -> None:
        self.log.error("weights refused", entry_id=entry_id, version=message.policy_version, error=error)
        await self.bus.publish(
            "dead",
            DeadLetter(stream="weights", entry_id=entry_id, payload=encode(message), error=error,
                       attempts=1, worker=self.worker_id),
        )

    async def poll(self, block_ms: int) -> None:
        entries = await self.bus.read_all("weights", WeightsPublished, after_id=self.last_id,
                                          block_ms=block_ms)
        for entry_id, message in entries:
            self.last_id = entry_id
            await self.consider(entry_id, message)

    async def sync_all(self) -> None:
        """Bring every engine to the target; failures are logged and retried on the next pass."""
        if self.target is None or self.target.policy_version in self.refused_versions:
            return
        await asyncio.gather(*(self.sync_engine(url, client) for url, client in self.clients.items()))

    async def sync_engine(self, url: str, client) -> None:
        from catq.engines.client import EngineError

        target = self.target
        version = str(target.policy_version)
        log = self.log.bind(engine=url, version=target.policy_version)
        try:
            current = await client.weight_version()
            if parse_version(current) >= target.policy_version:
                return
            if not Path(target.path).is_dir():
                log.warning("published weights gone (pruned?); waiting for a newer version",
                            path=target.path)
                return
            started = time.perf_counter()
            await client.update_weights_from_disk(target.path, weight_version=version)
            reported = await client.weight_version()
        except EngineError as exc:
            if exc.status is not None and 400 <= exc.status < 500:
                self.refused_versions.add(target.policy_version)
                await self.dead_letter(self.target_id, target, f"engine {url} refused the update: {exc}")
            else:
                log.warning("engine update failed; will retry", error=str(exc))
            return
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("engine unreachable; will retry", error=str(exc))
            return
        if reported != version:
            log.error("engine reports another version after update", reported=reported)
            return
        log.info("engine updated", seconds=round(time.perf_counter() - started, 3), path=target.path)

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
    from catq.bus import Bus
    from catq.engines.client import EngineClient
    from catq.runtime import heartbeat_loop, install_stop_signals

    worker_id = default_worker_id(ROLE)
    log = setup_logging(ROLE, worker_id)
    stop = asyncio.Event()
    install_stop_signals(stop)
    bus = Bus(config.redis_url, config.run, config.bus)
    clients = {
        url: EngineClient(url, timeout_s=config.engines.request_timeout_s,
                          max_attempts=config.engines.max_attempts)
        for url in config.engines.policy_urls
    }
    heartbeat = asyncio.create_task(heartbeat_loop(bus, ROLE, worker_id, config.worker.heartbeat_s))
    log.info("syncer started", engines=list(clients), weights_dir=str(config.weights_dir))
    try:
        await Syncer(config, bus, clients, log, worker_id=worker_id).run(stop)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        for client in clients.values():
            await client.close()
        await bus.close()
