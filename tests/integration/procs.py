"""Helpers for tests that run real worker processes (tests/integration/bus_worker.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.engine_proc import free_port  # noqa: F401  (re-exported for the tests here)

ROOT = Path(__file__).resolve().parents[2]
BUS_WORKER = Path(__file__).with_name("bus_worker.py")


def start_bus_worker(redis_url: str, run: str, log_path: Path, *args: str) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, str(BUS_WORKER), "--redis-url", redis_url, "--run", run, *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "CATQ_LOG_LEVEL": "INFO"})


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM (then SIGKILL) one process we started; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


async def wait_for(predicate, timeout: float = 15, interval: float = 0.05, what: str = "condition"):
    """Await an async (or sync) predicate until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


