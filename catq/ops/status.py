"""`catq status`: each stream's length and groups, role liveness, starved stages, dead letters
and Redis memory, in one screen."""

from __future__ import annotations

import argparse
import asyncio

from catq.bus import RedisAuthError, RedisMemory, StreamStats
from catq.config import Config
from catq.log import redact
from catq.ops.common import _bus, _fail
from catq.topology import DEAD


def status_command(args: argparse.Namespace, config: Config) -> int:
    try:
        stats, health, memory, dropped = asyncio.run(_stats(config))
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"cannot read run {config.run!r} at {redact(config.redis_url)}: {exc}")
    print(render_status(config.run, stats, health, memory, dropped))
    return 0


async def _stats(config: Config) -> tuple[dict[str, StreamStats], list, RedisMemory | None, int]:
    from catq.ops.health import role_health

    bus = _bus(config)
    try:
        return (await bus.stream_stats(), await role_health(bus, config), await bus.memory(),
                await bus.dead_letters_dropped())
    finally:
        await bus.close()


def render_status(run: str, stats: dict[str, StreamStats], health: list | None = None,
                  memory: RedisMemory | None = None, dead_dropped: int = 0) -> str:
    from catq.ops.health import starved

    lines = [f"run {run}"]
    if health is not None:
        lines.append("roles (alive/expected from heartbeats; restarts by catq up):")
        lines += [h.line() for h in health]
    for stream, info in stats.items():
        lines.append(f"  {stream:<11} length {info.length}")
        for g in info.groups:
            lag = "" if g.lag is None else f", lag {g.lag}"
            lines.append(f"    group {g.group}: pending {g.pending}{lag}, "
                         f"{len(g.consumers)} consumer(s)")
            for c in g.consumers:
                lines.append(f"      {c.name}: pending {c.pending}, idle {c.idle_ms / 1000:.1f}s")
    if health is not None:
        lines += [f"  STARVED {line}" for line in starved(stats, health)]
    dead = stats[DEAD.name].length if DEAD.name in stats else 0
    lines.append(f"  dead letters: {dead}" + ("  (catq tail dead)" if dead else "")
                 + (f"; {dead_dropped} dropped over [bus] max_dead_letters" if dead_dropped else ""))
    if memory is not None:
        lines.append(f"  {memory.line()}")
    return "\n".join(lines)
