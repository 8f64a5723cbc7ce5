"""The worker runtime every stream role runs on: read a stream through the role's consumer group,
handle up to ``config.worker.concurrency`` messages at once, complete (outputs + ack) each, and
stop gracefully.

A role supplies a *handler* (``input_stream``, ``input_type``, ``async handle(message) ->
list[Output]``, optionally ``ready()`` and ``close()``) through a ``build(ctx)`` coroutine, and
its ``run(config)`` is one line: ``await run_worker(config, "anchor", build_anchor_handler)``.

Failure rules, in one place:

- ``handle`` raises :class:`DeadLetterError`: the entry goes to ``dead`` now, the worker goes on;
- ``handle`` raises anything else: logged, entry left pending; it is reclaimed after
  ``bus.claim_idle_ms`` and retried, and after ``bus.max_attempts`` deliveries dead-lettered;
- SIGTERM/SIGINT: stop reading, give in-flight work ``grace_period_s`` to finish, then cancel
  it (those entries stay pending for another worker). Nothing is acked without its output.

While a message is in flight the runtime keeps its entry alive (so slow work is not reclaimed
from a live worker) and a heartbeat key ``catq:<run>:heartbeat:<role>:<worker_id>`` with a
3-interval expiry says the worker lives (``catq health ROLE``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from catq.bus import Bus, Delivery, Output
from catq.config import Config
from catq.log import default_worker_id, setup_logging
from catq.messages import prompt_id_of
from catq.results import ResultStore

READY_POLL_S = 0.5
"""How soon a handler that said it is not ready is asked again."""


@dataclass
class WorkerContext:
    config: Config
    bus: Bus
    results: ResultStore
    worker_id: str
    log: structlog.BoundLogger


class DeadLetterError(Exception):
    """Raise from ``handle()`` to dead-letter the message now with ``str(exc)`` as the reason."""


class Handler(Protocol):
    input_stream: str
    input_type: type

    async def handle(self, message: Any) -> list[Output]: ...


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (call from inside the running event loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def heartbeat_key(bus: Bus, role: str, worker_id: str) -> str:
    return bus.key(f"heartbeat:{role}:{worker_id}")


async def heartbeat_loop(bus: Bus, role: str, worker_id: str, interval_s: float) -> None:
    """Refresh the heartbeat key every ``interval_s`` until cancelled; it expires after three
    intervals, so a dead or wedged worker disappears from ``catq health`` on its own."""
    key = heartbeat_key(bus, role, worker_id)
    ttl_ms = max(int(interval_s * 3000), 1)
    log = structlog.get_logger("catq.runtime")
    try:
        while True:
            value = json.dumps({"worker": worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                                "at": time.time()})
            try:
                await bus.redis.set(key, value, px=ttl_ms)
            except Exception as exc:  # Redis away: the key expires, health says so; keep trying
                log.warning("heartbeat failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(interval_s)
    finally:
        try:
            await asyncio.shield(bus.redis.delete(key))
        except Exception:
            pass


async def run_worker(
    config: Config,
    role: str,
    build: Callable[[WorkerContext], Awaitable[Any]],
    *,
    worker_id: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one worker of ``role`` (its consumer group) until SIGTERM/SIGINT or ``stop`` is set."""
    worker_id = worker_id or default_worker_id(role)
    log = setup_logging(role, worker_id)
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    bus = Bus(config.redis_url, config.run, config.bus)
    ctx = WorkerContext(config, bus, ResultStore(bus, config.bus.result_ttl_s), worker_id, log)
    bus.on_dead_letter = ctx.results.record_dead_letter
    handler = None
    try:
        handler = await build(ctx)
        await _WorkerLoop(ctx, role, handler, stop).run()
    finally:
        close = getattr(handler, "close", None)
        if close is not None:
            await close()
        await bus.close()


class _WorkerLoop:
    def __init__(self, ctx: WorkerContext, group: str, handler: Any, stop: asyncio.Event):
        self.ctx, self.group, self.handler, self.stop = ctx, group, handler, stop
        self.stream: str = handler.input_stream
        self.concurrency = ctx.config.worker.concurrency
        self.in_flight: dict[str, asyncio.Task] = {}

    async def run(self) -> None:
        ctx = self.ctx
        ctx.log.info("worker started", stream=self.stream, concurrency=self.concurrency)
        upkeep = [
            asyncio.create_task(heartbeat_loop(ctx.bus, self.group, ctx.worker_id, ctx.config.worker.heartbeat_s)),
            asyncio.create_task(self._keep_alive_loop()),
        ]
        try:
            while not self.stop.is_set():
                await self._step()
            ctx.log.info("stopping", in_flight=len(self.in_flight),
                         grace_period_s=ctx.config.worker.grace_period_s)
            await self._drain()
            await self._forget_consumer()
        finally:
            for task in upkeep:
                task.cancel()
            await asyncio.gather(*upkeep, return_exceptions=True)
            ctx.log.info("worker stopped")

    async def _step(self) -> None:
        ready = getattr(self.handler, "ready", None)
        if ready is not None and not await ready():
            await self._wait_stop(READY_POLL_S)
            return
        free = self.concurrency - len(self.in_flight)
        if free <= 0:
            stopped = asyncio.create_task(self.stop.wait())
            await asyncio.wait([*self.in_flight.values(), stopped], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            return
        deliveries = await self._read(free)
        for delivery in deliveries:
            task = asyncio.create_task(self._process(delivery))
            self.in_flight[delivery.entry_id] = task
            task.add_done_callback(lambda _t, entry_id=delivery.entry_id: self.in_flight.pop(entry_id, None))

    async def _read(self, count: int) -> list[Delivery]:
        """One read; if asked to stop meanwhile, give it a moment to return, else abandon it
        (anything it had claimed stays pending and is reclaimed later)."""
        read = asyncio.create_task(self.ctx.bus.read(
            self.stream, self.group, self.ctx.worker_id, count=count,
            message_type=self.handler.input_type))
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                await asyncio.wait([read], timeout=self.ctx.config.bus.block_ms / 1000 + 1)
            if not read.done():
                read.cancel()
                return []
            return read.result()
        except Exception as exc:
            self.ctx.log.error("read failed", error=str(exc) or type(exc).__name__)
            await self._wait_stop(1.0)
            return []
        finally:
            stopped.cancel()

    async def _process(self, delivery: Delivery) -> None:
        prompt_id = prompt_id_of(delivery.message)
        structlog.contextvars.bind_contextvars(prompt_id=prompt_id)  # this task's context only
        log = self.ctx.log.bind(prompt_id=prompt_id, entry_id=delivery.entry_id, attempts=delivery.attempts)
        started = time.monotonic()
        try:
            outputs = await self.handler.handle(delivery.message)
        except DeadLetterError as exc:
            await asyncio.shield(self.ctx.bus.dead_letter(delivery, self.group, str(exc),
                                                          worker=self.ctx.worker_id))
            return
        except asyncio.CancelledError:
            log.warning("abandoned; left pending")
            raise
        except Exception:
            log.exception("handler failed; left pending for retry")
            return
        try:
            await asyncio.shield(self.ctx.bus.complete(delivery, self.group, outputs))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("complete failed; left pending for retry")
            return
        log.info("done", seconds=round(time.monotonic() - started, 3),
                 outputs=[o.stream for o in outputs])

    async def _drain(self) -> None:
        tasks = list(self.in_flight.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self.ctx.config.worker.grace_period_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _forget_consumer(self) -> None:
        try:
            await asyncio.wait_for(self.ctx.bus.forget_consumer(self.stream, self.group, self.ctx.worker_id), 5)
        except Exception as exc:  # bookkeeping only: a leftover consumer entry is harmless
            self.ctx.log.warning("could not remove consumer", error=str(exc) or type(exc).__name__)

    async def _keep_alive_loop(self) -> None:
        interval = self.ctx.config.bus.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            ids = list(self.in_flight)
            try:
                await self.ctx.bus.keep_alive(self.stream, self.group, self.ctx.worker_id, ids)
            except Exception as exc:
                self.ctx.log.warning("keep-alive failed", error=str(exc) or type(exc).__name__)

    async def _wait_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
