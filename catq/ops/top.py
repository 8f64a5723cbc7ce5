"""`catq top`: a live view of a run (rich Live; ``q`` or Ctrl-C quits; plain text over SSH).

One frame: per stream its length, lag and pending; per role its live workers (heartbeats),
throughput and p50/p95 handler latency (the samples the worker loop keeps in Redis:
:meth:`catq.bus.Bus.record_handled`); the learner's last step (reward, signal fraction, KL:
from Redis, written by the learner each step); the version each policy engine serves; the dead
letters. ``--once`` prints one frame and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Group
from rich.table import Table

from catq.bus import Bus, RedisMemory, StreamStats
from catq.config import Config
from catq.topology import DEAD, ROLES, WORK_STREAMS

WORKER_LOOP_ROLES = tuple(s.consumer for s in WORK_STREAMS if s.consumer != "learner")
"""Roles whose messages the runtime's worker loop counts (the learner reports steps instead)."""
THROUGHPUT_WINDOW_S = 60.0
"""Throughput is messages handled in the last minute, per second."""
LEARNER_FIELDS = ("step", "policy_version", "reward_mean", "signal_frac", "kl", "loss", "step_time_s", "time")


@dataclass
class RoleWork:
    counts: dict[str, int] = field(default_factory=dict)
    per_s: float = 0.0
    p50_s: float | None = None
    p95_s: float | None = None


@dataclass
class Frame:
    run: str
    stats: dict[str, StreamStats]
    health: list
    work: dict[str, RoleWork]
    learner: dict[str, Any]
    engines: dict[str, str]
    memory: RedisMemory | None = None
    at: float = field(default_factory=time.time)


def top_command(args: argparse.Namespace, config: Config) -> int:
    from catq.ops.common import _run

    if args.once:
        return _run(config, _once(config))
    try:
        return _run(config, _live(config, args.interval))
    except KeyboardInterrupt:
        return 0


async def _once(config: Config) -> int:
    from catq.ops.common import _bus
    from catq.ops.readable import console

    bus = _bus(config)
    try:
        console().print(render(await read_frame(bus, config)), crop=True)
        return 0
    finally:
        await bus.close()


async def _live(config: Config, interval: float) -> int:
    from rich.live import Live

    from catq.ops.common import _bus
    from catq.ops.readable import console

    bus, out = _bus(config), console()
    try:
        if not out.is_terminal:  # piped or logged: a plain frame every interval, no redrawing
            while True:
                out.print(render(await read_frame(bus, config)), crop=True)
                out.file.flush()
                await asyncio.sleep(interval)
        with Live(render(await read_frame(bus, config)), console=out, auto_refresh=False,
                  screen=False) as live, _Keys() as keys:
            while not keys.quit_within(interval):
                live.update(render(await read_frame(bus, config)), refresh=True)
        return 0
    finally:
        await bus.close()


class _Keys:
    """Reads ``q`` from a terminal's stdin without waiting for Enter (cbreak mode); without a
    terminal only Ctrl-C quits."""

    def __enter__(self) -> _Keys:
        self.saved = None
        if sys.stdin.isatty():
            import termios
            import tty

            self.saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin.fileno())
        return self

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self.saved)

    def quit_within(self, seconds: float) -> bool:
        if self.saved is None:
            time.sleep(seconds)
            return False
        ready, _, _ = select.select([sys.stdin], [], [], seconds)
        return bool(ready) and sys.stdin.read(1) in ("q", "Q")


# -- reading --------------------------------------------------------------------------------------

async def read_frame(bus: Bus, config: Config) -> Frame:
    from catq.ops.health import role_health

    work = {}
    for role in WORKER_LOOP_ROLES:
        work[role] = role_work(*await bus.role_stats(role))
    return Frame(config.run, await bus.stream_stats(), await role_health(bus, config), work,
                 await learner_status(bus), await engine_versions(config), await bus.memory())


def role_work(counts: dict[str, int], samples: list[tuple[float, float, str]],
              now: float | None = None) -> RoleWork:
    """Throughput over the last minute and latency percentiles of the kept samples."""
    now = time.time() if now is None else now
    recent = [s for s in samples if now - s[0] <= THROUGHPUT_WINDOW_S and s[2] == "handled"]
    latencies = sorted(s[1] for s in samples)
    return RoleWork(counts, len(recent) / THROUGHPUT_WINDOW_S,
                    percentile(latencies, 0.50), percentile(latencies, 0.95))


def percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def learner_status(bus: Bus) -> dict[str, Any]:
    status = await bus.learner_step()
    status.setdefault("policy_version", await bus.get_policy_version())
    return status


async def engine_versions(config: Config) -> dict[str, str]:
    """Each policy engine's served weight_version, or why it is unknown (never blocks > 2 s)."""
    from catq.engines.client import EngineClient

    async def one(url: str) -> str:
        client = EngineClient(url, timeout_s=2, max_attempts=1, api_key=config.engines.api_key())
        try:
            return str(await client.weight_version())
        except Exception as exc:
            return f"unreachable ({type(exc).__name__})"
        finally:
            await client.close()

    urls = config.engines.policy_urls
    return dict(zip(urls, await asyncio.gather(*(one(u) for u in urls))))


# -- rendering ------------------------------------------------------------------------------------

def render(frame: Frame) -> Group:
    title = f"catq top — run {frame.run} — {time.strftime('%H:%M:%S', time.localtime(frame.at))}  (q quits)"
    memory = [frame.memory.line()] if frame.memory is not None else []
    return Group(title, *memory, streams_table(frame), roles_table(frame), learner_table(frame), engines_table(frame))


def streams_table(frame: Frame) -> Table:
    table = Table("stream", "length", "group", "lag", "pending", "consumers", title="streams", title_justify="left")
    for stream, info in frame.stats.items():
        for g in info.groups:
            lag = "—" if g.lag is None else str(g.lag)
            table.add_row(stream, str(info.length), g.group, lag, str(g.pending), str(len(g.consumers)))
        if not info.groups:
            table.add_row(stream, str(info.length), "—", "—", "—", "0")
    return table


def roles_table(frame: Frame) -> Table:
    table = Table("role", "alive", "handled", "failed", "dead", "msg/s", "p50", "p95", title="roles",
                  title_justify="left")
    health = {h.role: h for h in frame.health}
    for role in ROLES:
        h, w = health.get(role), frame.work.get(role, RoleWork())
        alive = f"{len(h.live)}/{h.expected}" if h else "?"
        table.add_row(role, alive, *(str(w.counts.get(k, 0)) if role in frame.work else "—"
                                     for k in ("handled", "failed", "dead")),
                      f"{w.per_s:.2f}" if role in frame.work else "—", _seconds(w.p50_s), _seconds(w.p95_s))
    return table


def learner_table(frame: Frame) -> Table:
    table = Table(*LEARNER_FIELDS[:-1], title="learner (last step)", title_justify="left")
    table.add_row(*(_number(frame.learner.get(k)) for k in LEARNER_FIELDS[:-1]))
    return table


def engines_table(frame: Frame) -> Table:
    dead = frame.stats[DEAD.name].length if DEAD.name in frame.stats else 0
    table = Table("policy engine", "serves version", title=f"engines — dead letters: {dead}"
                  + ("  (catq tail dead)" if dead else ""), title_justify="left")
    for url, version in frame.engines.items():
        table.add_row(url, version)
    return table


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}s"


def _number(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
