"""A supervised child process of `catq up` (or `catq eval`): its record (:class:`Child`), the
restart backoff and crash-loop rule (:func:`restart_delay`), stopping it (:func:`stop_child`:
SIGTERM, grace, SIGKILL) and waiting for something to come up (:func:`wait_until`,
:func:`engine_healthy`), failing with :class:`LaunchError`.

The stack that starts and supervises them in order is :class:`catq.launcher.Stack`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp

from catq.config import EngineSpec, SuperviseConfig


class LaunchError(RuntimeError):
    """The stack could not be brought up (missing Redis binary, an engine never got healthy...)."""


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None
    pump: asyncio.Task | None = None
    stopping: bool = False
    started_at: float = 0.0
    failures: int = 0
    """Exits since the child last ran ``healthy_after_s``: the backoff exponent."""
    failed_starts: int = 0
    """Exits within ``start_window_s`` of start, in a row: a crash loop when it reaches the limit."""
    restarts: int = 0
    restart_at: float | None = None
    """When a restart is due (monotonic), while the child waits out its backoff."""
    exit_codes: list[int] = field(default_factory=list)
    """Exit codes of incarnations that died on their own, oldest first."""
    last_lines: deque = field(default_factory=lambda: deque(maxlen=12))
    given_up: bool = False
    spec: EngineSpec | None = None
    """For an engine: its spec, so a restart recomputes its command (newest published weights)."""

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


def restart_delay(child: Child, ran_s: float, policy: SuperviseConfig) -> float | None:
    """Seconds to wait before restarting ``child`` that exited after ``ran_s`` seconds, or None
    when it is in a crash loop and must be given up. Updates its counters."""
    if ran_s >= policy.healthy_after_s:
        child.failures = 0
    child.failed_starts = child.failed_starts + 1 if ran_s < policy.start_window_s else 0
    if child.failed_starts >= policy.crash_loop_starts:
        return None
    delay = min(policy.backoff_max_s, policy.backoff_initial_s * policy.backoff_factor ** child.failures)
    child.failures += 1
    return delay


async def stop_child(child: Child, grace_s: float) -> None:
    """SIGTERM, wait up to grace_s, then SIGKILL. Never leaves the process behind."""
    child.stopping = True
    proc = child.process
    if proc is None or proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def http_ok(url: str) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            async with session.get(url) as response:
                return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def engine_healthy(base_url: str) -> bool:
    return await http_ok(f"{base_url}/health")


async def wait_until(check, timeout_s: float, what: str, failed=None) -> None:
    """Poll an async check until true; raise LaunchError on timeout or when ``failed()`` says why."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        reason = failed() if failed else None
        if reason:
            raise LaunchError(f"waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise LaunchError(f"{what} not healthy after {timeout_s:.0f}s")
        await asyncio.sleep(0.5)
