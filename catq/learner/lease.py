"""The learner's lease: at most one learner of a run trains and publishes at a time.

A learner takes the lease before it loads its checkpoint (so it resumes from what the previous
holder last wrote) and keeps it by renewing it every ``worker.heartbeat_s``; the lease expires
``LEASE_TTL_BEATS`` heartbeats after the last renewal. A second learner waits, logging once that
it waits, until the lease is released (clean stop) or expires (crash), then takes over: that is
how a supervisor's restart after a crash proceeds.

Each acquisition comes with a fencing token (a counter in Redis, incremented per acquisition).
Announcing a version — the WeightsPublished on ``weights`` and the run's policy version — is one
Redis script that writes only while the caller's token is the newest (:meth:`Bus.publish_policy_version`),
and a checkpoint commit first checks the token. So a learner that stalled past its lease (a long
pause, a partition) and was replaced cannot publish over its successor: it finds its token stale,
raises :class:`~catq.bus.LeaseLost` and stops. All Redis access is the Bus's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from catq.bus import LeaseLost
from catq.messages import Message

NAME = "learner"
LEASE_TTL_BEATS = 3
"""The lease outlives its last renewal by this many heartbeat intervals (like heartbeat keys)."""


@dataclass
class Lease:
    bus: object
    holder: str
    """Who holds it (the worker id), shown to a learner waiting for it."""
    ttl_ms: int = 15_000
    token: int = 0
    """This holder's fencing token; 0 until acquired (a token Redis never hands out)."""
    lost: bool = False
    name: str = NAME

    @classmethod
    def for_learner(cls, bus, holder: str, heartbeat_s: float) -> Lease:
        return cls(bus, holder, ttl_ms=max(int(heartbeat_s * LEASE_TTL_BEATS * 1000), 1))

    async def acquire(self, stop: asyncio.Event, log: structlog.BoundLogger, poll_s: float) -> bool:
        """Wait until the lease is ours (True) or ``stop`` is set (False)."""
        said = False
        while not stop.is_set():
            self.token = await self.bus.acquire_lease(self.name, self.holder, self.ttl_ms)
            if self.token:
                log.info("learner lease acquired", fencing_token=self.token)
                return True
            if not said:
                log.info("waiting for the learner lease: another learner holds it",
                         holder=await self.bus.lease_holder(self.name), expires_within_s=self.ttl_ms / 1000)
                said = True
            await _wait(stop, poll_s)
        return False

    async def keep(self, interval_s: float, on_lost: Callable[[], None], log: structlog.BoundLogger,
                   done: asyncio.Event) -> None:
        """Renew every ``interval_s`` until ``done`` is set; once another holder has the lease,
        mark it lost and call ``on_lost`` (the learner stops). Ended by an event, not by
        cancellation: redis-py can swallow a cancel that lands mid-command."""
        while not done.is_set():
            await _wait(done, interval_s)
            if done.is_set():
                return
            try:
                renewed = await self.bus.renew_lease(self.name, self.token, self.holder, self.ttl_ms)
            except Exception as exc:  # Redis away: publishing and commits check the token anyway
                log.warning("lease renewal failed", error=str(exc) or type(exc).__name__)
                continue
            if not renewed:
                self.lost = True
                log.error("learner lease lost: another learner took over; stopping", fencing_token=self.token)
                on_lost()
                return

    async def check(self) -> None:
        """Raise :class:`LeaseLost` unless our token is still the newest."""
        if not await self.bus.holds_lease(self.name, self.token):
            self.lost = True
            raise LeaseLost(self.lost_message())

    async def publish(self, version: int, message: Message | None = None) -> None:
        """Set the run's policy version (and announce ``message``), fenced by our token."""
        try:
            await self.bus.publish_policy_version(self.name, self.token, version, message)
        except LeaseLost:
            self.lost = True
            raise LeaseLost(self.lost_message()) from None

    async def release(self) -> None:
        if self.token and not self.lost:
            await self.bus.release_lease(self.name, self.token)

    def lost_message(self) -> str:
        return (f"learner lease lost (fencing token {self.token} is stale: another learner took "
                f"over); stopped without publishing or checkpointing")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass
