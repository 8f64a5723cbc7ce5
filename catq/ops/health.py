"""Liveness per role and stalled stages, read from Redis alone (heartbeats, consumer groups and
the restart counts `catq up` records), so `catq status`, `catq health` and `catq up` agree; and
`catq health ROLE` itself (exit 1 when the role has no live worker).

A stage is *starved* when its stream has work waiting (unread or pending in the consuming role's
group) and no live worker of that role exists; it is *stalled* when live workers exist but the
group has made no progress (nothing delivered, nothing acknowledged) for
``supervise.stall_after_s``. Both are named with the stream and the role that should consume it:
``references: 13 waiting, no live judge``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from catq.bus import Bus, RedisAuthError, StreamStats
from catq.config import Config
from catq.log import redact
from catq.ops.common import _bus, _fail
from catq.topology import CONSUMER_ROLE, ROLES


@dataclass
class RoleHealth:
    role: str
    expected: int
    """Copies the config asks `catq up` to run (``[roles]``)."""
    live: list[str]
    """Worker ids with a fresh heartbeat."""
    newest_beat_age_s: float | None
    restarts: int

    @property
    def down(self) -> bool:
        return self.expected > 0 and not self.live

    def line(self) -> str:
        age = "no heartbeat" if self.newest_beat_age_s is None else f"newest heartbeat {self.newest_beat_age_s:.1f}s ago"
        state = "DOWN" if self.down else "ok"
        return (f"  {self.role:<8} {len(self.live)}/{self.expected} alive, {age}, "
                f"restarts {self.restarts}  {state if self.expected else ''}").rstrip()


async def role_health(bus: Bus, config: Config) -> list[RoleHealth]:
    restarts = await bus.restart_counts()
    now = time.time()
    out = []
    for role in ROLES:
        beats = await bus.heartbeats(role)
        ats = [float(b["at"]) for b in beats.values() if isinstance(b.get("at"), (int, float))]
        out.append(RoleHealth(
            role=role, expected=getattr(config.roles, role), live=sorted(beats),
            newest_beat_age_s=(now - max(ats)) if ats else None,
            restarts=sum(n for child, n in restarts.items() if child.split(".")[0] == role),
        ))
    return out


def waiting_work(stats: dict[str, StreamStats]) -> dict[str, tuple[int, str | None]]:
    """Per pipeline stream: (entries unread or pending for its consumer role, the group's progress
    marker). A stream whose group does not exist yet has its whole length waiting."""
    out = {}
    for stream, role in CONSUMER_ROLE.items():
        info = stats.get(stream) or StreamStats(0)
        group = info.group(role)
        out[stream] = (info.length, None) if group is None else (group.waiting, group.progress)
    return out


def starved(stats: dict[str, StreamStats], health: list[RoleHealth]) -> list[str]:
    """Stages with waiting work and no live consumer, one line each."""
    live = {h.role: len(h.live) for h in health}
    return [f"{stream}: {count} waiting, no live {CONSUMER_ROLE[stream]}"
            for stream, (count, _) in waiting_work(stats).items()
            if count > 0 and live.get(CONSUMER_ROLE[stream], 0) == 0]


@dataclass
class StallWatch:
    """Remembers when each stream's consumer last made progress; says each stall once."""

    stall_after_s: float
    _since: dict[str, tuple[str | None, float]] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)

    def check(self, stats: dict[str, StreamStats], health: list[RoleHealth], now: float | None = None) -> list[str]:
        """New stall lines (starved or no progress for stall_after_s); cleared stalls may recur."""
        now = time.monotonic() if now is None else now
        lines = {line.split(":")[0]: line for line in starved(stats, health)}
        for stream, (count, marker) in waiting_work(stats).items():
            previous = self._since.get(stream)
            if previous is None or previous[0] != marker or count == 0:
                self._since[stream] = (marker, now)
            elif stream not in lines and now - previous[1] >= self.stall_after_s:
                lines[stream] = (f"{stream}: {count} waiting, no progress by {CONSUMER_ROLE[stream]} "
                                 f"for {now - previous[1]:.0f}s")
        fresh = [line for stream, line in lines.items() if stream not in self._reported]
        self._reported = set(lines)
        return fresh


# -- catq health ROLE ----------------------------------------------------------------------------

def health_command(args: argparse.Namespace, config: Config) -> int:
    try:
        live = asyncio.run(live_workers(config, args.role))
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"{args.role}: cannot reach Redis at {redact(config.redis_url)}: {exc}")
    if not live:
        return _fail(f"{args.role}: no live worker (no fresh heartbeat in run {config.run!r})")
    print(f"{args.role}: {len(live)} live worker(s): {', '.join(sorted(live))}")
    return 0


async def live_workers(config: Config, role: str) -> list[str]:
    """Worker ids of ``role`` whose heartbeat key has not expired."""
    bus = _bus(config)
    try:
        return await bus.live_workers(role)
    finally:
        await bus.close()
