"""math-verify (sympy) off the event loop.

Answer equivalence can take seconds on a hostile answer, and on the event loop that would stall
heartbeats, keep-alives and every other message. :func:`off_loop` runs a pure function (majority
vote, math rewards) in one helper process per role process, each call bounded by
``CALL_TIMEOUT_S``: a call that overruns kills the helper (the next call starts a fresh one) and
raises :class:`VerifyTimeout`, a failure counted against the message, like any other.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

CALL_TIMEOUT_S = 60.0
"""Longest one call may take (a whole group's comparisons; each sympy call has its own limit)."""

_pool: ProcessPoolExecutor | None = None
_turns: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None


class VerifyTimeout(Exception):
    """Answer checking ran past its limit; the helper process was killed."""


def _helper() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:
        # spawn, not fork: the parent runs an event loop and threads that must not be copied
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return _pool


def _discard(pool: ProcessPoolExecutor) -> None:
    global _pool
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    if _pool is pool:
        _pool = None


def _turn() -> asyncio.Semaphore:
    """One call at a time per event loop: the helper runs one anyway, and the time limit must
    bound a call's own run, not its wait behind the others (many prompts of an evaluation, or a
    busy machine, queue for minutes)."""
    global _turns
    loop = asyncio.get_running_loop()
    if _turns is None or _turns[0] is not loop:
        _turns = (loop, asyncio.Semaphore(1))
    return _turns[1]


async def off_loop(fn: Callable[..., T], *args, timeout_s: float = CALL_TIMEOUT_S) -> T:
    """``fn(*args)`` in the helper process (``fn`` and its arguments must pickle)."""
    async with _turn():
        return await _run(fn, *args, timeout_s=timeout_s)


async def _run(fn: Callable[..., T], *args, timeout_s: float) -> T:
    pool = _helper()
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, fn, *args), timeout_s)
    except TimeoutError:
        _discard(pool)
        raise VerifyTimeout(f"answer checking ({getattr(fn, '__name__', fn)}) ran past {timeout_s:g} s") from None
    except BrokenProcessPool as exc:
        _discard(pool)
        raise VerifyTimeout(f"the answer-checking process died: {exc}") from None
