"""How every role starts and stops, in one place.

:func:`run_role` is the lifecycle of all six roles: a worker id, logging, SIGTERM/SIGINT, a Bus,
a heartbeat once the role says it is serving, and a bounded graceful stop. A role supplies
``serve(ctx)``, which works until ``ctx.stop`` is set and then returns; after the stop signal it
gets ``worker.grace_period_s`` (+ ``STOP_SLACK_S`` to clean up) before it is cancelled.

:func:`run_worker` is :func:`run_role` for the four stream roles (rollout, anchor, judge, and
tests' own): read the role's input stream (from :mod:`catq.topology`) through its consumer
group, handle up to ``config.worker.concurrency`` messages at once, complete (outputs + ack)
each. A stream role supplies a *handler* (``async handle(message) -> list[Output]``, optionally
``ready()`` and ``close()``) through a ``build(ctx)`` coroutine, and its ``run(config)`` is one
line: ``await run_worker(config, "anchor", build_anchor_handler)``. Ingest, learner and syncer
call :func:`run_role` with their own ``serve``.

Failure rules for stream roles, in one place:

- ``handle`` raises :class:`DeadLetterError`: the entry goes to ``dead`` now, the worker goes on;
- ``handle`` raises :class:`~catq.config.ConfigError` (e.g. an engine refusing our API key): no
  message could succeed, so nothing is dead-lettered; the entry stays pending, the worker stops
  and ``run_worker`` re-raises it (``catq worker`` exits 2 with the message);
- Redis refuses our password or permissions (:class:`~catq.bus.RedisAuthError`, a ConfigError),
  checked before any role serves and on every read: the role stops the same way, exit 2;
- ``handle`` raises a *transient* error (:func:`is_transient`: an engine answering 5xx or not at
  all, Redis or the network down, Redis out of memory): not the message's fault, so nothing is
  counted; the worker keeps the entry, reads nothing new, and retries it after a backoff (1 s
  doubling to ``worker.transient_backoff_max_s``) until it works or the worker stops;
- Redis refuses the completion for memory (``maxmemory`` with ``noeviction``): the worker keeps
  the outputs and retries the completion with backoff until memory frees (the work is not redone);
- ``handle`` raises anything else, or runs past ``worker.message_deadline_s``: a *failure*,
  counted in Redis; the entry is left pending, reclaimed after ``bus.claim_idle_ms`` and
  retried, and dead-lettered at its ``bus.max_attempts``-th failure. An entry delivered
  ``bus.max_deliveries`` times without completing (its worker died each time) is dead-lettered too;
- SIGTERM/SIGINT: stop reading, give in-flight work ``grace_period_s`` to finish, then cancel
  it (those entries stay pending for another worker). Nothing is acked without its output.

Each finished message (handled, failed or dead-lettered) is counted once, in ``_WorkerLoop._count``:
in the role's Prometheus metrics (:mod:`catq.metrics`, served on ``/metrics`` when ``[metrics]``
gives the role a port) and in Redis for ``catq top``.

While a message is in flight the runtime keeps its entry alive (so slow work is not reclaimed
from a live worker) and a heartbeat key ``catq:{<run>}:heartbeat:<role>:<worker_id>`` with a
3-interval expiry says the worker lives (``catq health ROLE``; `catq up` waits for it).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from catq import metrics
from catq.bus import Bus, Delivery, Output, RedisAuthError, StreamBus, is_out_of_memory, is_retryable
from catq.config import BusConfig, Config, ConfigError
from catq.log import default_worker_id, setup_logging
from catq.messages import prompt_id_of
from catq.results import ResultStore
from catq.topology import ROLES, Stream, input_of

READY_POLL_S = 0.5
"""How soon a handler that said it is not ready is asked again."""
STOP_SLACK_S = 5.0
"""After the grace period, how long a stopping role has to clean up before it is cancelled."""


@dataclass
class WorkerContext:
    """What a role's ``serve`` (or a stream handler) gets: its config, Bus, results, id, log,
    and the event that says stop."""

    config: Config
    bus: Bus
    results: ResultStore
    worker_id: str
    log: structlog.BoundLogger
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    role: str = ""
    heartbeat: asyncio.Task | None = None
    end_heartbeat: asyncio.Event = field(default_factory=asyncio.Event)
    """Set to end the heartbeat (an event, not a cancel: redis-py can swallow a cancel that
    lands mid-command, and the process would then never exit)."""

    def serving(self) -> None:
        """Say this worker is up (call once ready): its heartbeat starts, which `catq health`
        and `catq up` wait for."""
        if self.heartbeat is None:
            self.heartbeat = asyncio.create_task(heartbeat_loop(
                self.bus, self.role, self.worker_id, self.config.worker.heartbeat_s, self.end_heartbeat))


class DeadLetterError(Exception):
    """Raise from ``handle()`` to dead-letter the message now with ``str(exc)`` as the reason."""


class DeadlineExceeded(Exception):
    """A handler ran past ``worker.message_deadline_s``."""


def is_transient(exc: BaseException) -> bool:
    """A failure of something the handler depends on (engine, Redis, network), not of the
    message: retried without counting toward ``bus.max_attempts``."""
    import aiohttp

    from catq.engines.client import EngineError

    if isinstance(exc, EngineError):
        return not exc.refused
    if is_out_of_memory(exc):  # Redis refused a write for memory: it frees as the pipeline drains
        return True
    if isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError, TimeoutError)):
        return True
    return is_retryable(exc) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (call from inside the running event loop)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def heartbeat_loop(bus: Bus, role: str, worker_id: str, interval_s: float,
                         end: asyncio.Event | None = None) -> None:
    """Beat every ``interval_s`` until ``end`` is set (or cancelled); a beat expires after
    three intervals, so a dead or wedged worker disappears from ``catq health`` on its own. A
    clean end removes the key."""
    ttl_ms = max(int(interval_s * 3000), 1)
    end = end or asyncio.Event()
    log = structlog.get_logger("catq.runtime")
    try:
        while not end.is_set():
            info = {"worker": worker_id, "pid": os.getpid(), "host": socket.gethostname(), "at": time.time()}
            try:
                await asyncio.wait_for(bus.beat(role, worker_id, info, ttl_ms), timeout=interval_s)
            except Exception as exc:  # Redis away: the key expires, health says so; keep trying
                log.warning("heartbeat failed", error=str(exc) or type(exc).__name__)
            try:
                await asyncio.wait_for(end.wait(), timeout=interval_s)
            except TimeoutError:
                pass
    finally:
        try:
            await asyncio.wait_for(asyncio.shield(bus.clear_beat(role, worker_id)), timeout=2.0)
        except Exception:
            pass


async def run_role(
    config: Config,
    role: str,
    serve: Callable[[WorkerContext], Awaitable[None]],
    *,
    worker_id: str | None = None,
    stop: asyncio.Event | None = None,
    bus_config: BusConfig | None = None,
) -> None:
    """Run one worker of ``role`` until ``serve`` returns, or until SIGTERM/SIGINT (or ``stop``)
    and then a bounded grace period. Re-raises what ``serve`` raised."""
    worker_id = worker_id or default_worker_id(role)
    log = setup_logging(role, worker_id)
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(stop)
    bus = Bus(config.redis_url, config.run, bus_config or config.bus)
    ctx = WorkerContext(config, bus, ResultStore(bus, config.bus.result_ttl_s), worker_id, log, stop, role)
    bus.on_dead_letter = ctx.results.record_dead_letter

    async def serve_with_access(ctx: WorkerContext) -> None:
        await bus.check_access()  # a wrong password stops the role here, not in endless retries
        serve_metrics(config, role, log)
        await serve(ctx)

    try:
        await _serve_until_stopped(ctx, serve_with_access)
    finally:
        if ctx.heartbeat is not None:
            ctx.end_heartbeat.set()
            await asyncio.wait([ctx.heartbeat], timeout=ctx.config.worker.heartbeat_s + 3)
            if not ctx.heartbeat.done():  # wedged: cancel and move on, never wait forever
                ctx.heartbeat.cancel()
        await bus.close()


def serve_metrics(config: Config, role: str, log) -> None:
    """Serve the role's Prometheus ``/metrics`` when ``[metrics]`` gives it a port. A port in
    use (two copies of a role on one host) is logged, not fatal: metrics are not the work."""
    port = config.metrics.port_for(role) if role in ROLES else 0
    if not port:
        return
    try:
        metrics.serve(port, config.metrics.host)
    except OSError as exc:
        log.warning("metrics port unavailable; serving no /metrics", port=port, error=str(exc))
        return
    log.info("metrics listening", host=config.metrics.host, port=port)


async def _serve_until_stopped(ctx: WorkerContext, serve) -> None:
    serving = asyncio.ensure_future(serve(ctx))
    stopped = asyncio.create_task(ctx.stop.wait())
    try:
        await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
        bound = ctx.config.worker.grace_period_s + STOP_SLACK_S
        if not serving.done():
            await asyncio.wait([serving], timeout=bound)
        if not serving.done():
            ctx.log.warning("did not stop in time; cancelled", seconds=bound)
            serving.cancel()
            await asyncio.wait([serving])
        if not serving.cancelled():
            serving.result()
    finally:
        stopped.cancel()
        if not serving.done():  # we were cancelled ourselves
            serving.cancel()
            await asyncio.wait([serving])


async def run_worker(
    config: Config,
    role: str,
    build: Callable[[WorkerContext], Awaitable[Any]],
    *,
    stream: Stream | None = None,
    worker_id: str | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run one worker of the stream role ``role``: its consumer group reads ``stream`` (default:
    the role's input in :mod:`catq.topology`) until SIGTERM/SIGINT or ``stop`` is set."""
    source = stream or input_of(role)

    async def serve(ctx: WorkerContext) -> None:
        handler = await build(ctx)
        try:
            loop = _WorkerLoop(ctx, ctx.bus, role, source, handler)
            await loop.run()
            if loop.fatal is not None:
                raise loop.fatal
        finally:
            close = getattr(handler, "close", None)
            if close is not None:
                await close()

    await run_role(config, role, serve, worker_id=worker_id, stop=stop)


class _WorkerLoop:
    """Reads ``source`` through ``group`` and handles each delivery; sees the transport only as
    a :class:`~catq.bus.StreamBus`."""

    def __init__(self, ctx: WorkerContext, bus: StreamBus, group: str, source: Stream, handler: Any):
        self.ctx, self.bus, self.group, self.handler, self.stop = ctx, bus, group, handler, ctx.stop
        self.stream, self.message_type = source.name, source.message
        self.concurrency = ctx.config.worker.concurrency
        self.in_flight: dict[str, asyncio.Task] = {}
        self.fatal: ConfigError | None = None
        self.waiting_on_dependency = 0
        """In-flight messages waiting out a transient failure; while any does, read nothing new."""

    async def run(self) -> None:
        ctx = self.ctx
        ctx.log.info("worker started", stream=self.stream, concurrency=self.concurrency)
        keep_alive = asyncio.create_task(self._keep_alive_loop())
        ctx.serving()
        try:
            while not self.stop.is_set():
                await self._step()
            ctx.log.info("stopping", in_flight=len(self.in_flight),
                         grace_period_s=ctx.config.worker.grace_period_s)
            await self._drain()
            await self._forget_consumer()
        finally:
            tasks = [keep_alive, *self.in_flight.values()]  # still running only if we were cancelled
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            ctx.log.info("worker stopped")

    async def _step(self) -> None:
        if self.waiting_on_dependency:
            await self._wait_stop(READY_POLL_S)
            return
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
        read = asyncio.create_task(self.bus.read(
            self.stream, self.group, self.ctx.worker_id, count=count,
            message_type=self.message_type))
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait([read, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                await asyncio.wait([read], timeout=self.ctx.config.bus.block_ms / 1000 + 1)
            if not read.done():
                read.cancel()
                return []
            return read.result()
        except RedisAuthError as exc:
            self.ctx.log.error("redis refused our credentials: stopping this worker", error=str(exc))
            self.fatal = self.fatal or exc
            self.stop.set()
            return []
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
            outputs = await self._handle_until_not_transient(delivery, log)
        except DeadLetterError as exc:
            await asyncio.shield(self.bus.dead_letter(delivery, self.group, str(exc),
                                                          worker=self.ctx.worker_id))
            await self._count("dead", started)
            return
        except asyncio.CancelledError:
            log.warning("abandoned; left pending")
            raise
        except ConfigError as exc:
            log.error("configuration error: stopping this worker; entry left pending", error=str(exc))
            self.fatal = self.fatal or exc
            self.stop.set()
            return
        except Exception as exc:
            dead = await asyncio.shield(self._failed(delivery, exc, log))
            await self._count("dead" if dead else "failed", started)
            return
        if outputs is None:
            return  # stopped while waiting out a transient failure: left pending
        try:
            if not await asyncio.shield(self._complete_when_memory_allows(delivery, outputs, log)):
                return  # stopped while Redis was out of memory: left pending
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("complete failed; left pending for retry")
            return
        log.info("done", seconds=round(time.monotonic() - started, 3),
                 outputs=[o.stream for o in outputs])
        await self._count("handled", started)

    async def _complete_when_memory_allows(self, delivery: Delivery, outputs: list[Output], log) -> bool:
        """Complete; while Redis refuses it for memory (maxmemory, noeviction), keep the outputs
        and try again with backoff rather than redo the work later. False if stopped meanwhile."""
        wait = 0.5
        while True:
            try:
                await self.bus.complete(delivery, self.group, outputs)
                return True
            except Exception as exc:
                if not is_out_of_memory(exc) or self.stop.is_set():
                    raise
                log.warning("redis out of memory; keeping the result, will retry", retry_in_s=wait)
            await self._wait_stop(wait)
            if self.stop.is_set():
                return False
            wait = min(wait * 2, self.ctx.config.worker.transient_backoff_max_s)

    async def _count(self, outcome: str, started: float) -> None:
        """Count the message (``/metrics`` and, for `catq top`, Redis); never fails the work."""
        seconds = time.monotonic() - started
        metrics.handled(self.ctx.role, outcome, seconds)
        try:
            await self.bus.record_handled(self.ctx.role, outcome, seconds)
        except Exception as exc:
            self.ctx.log.debug("could not record role stats", error=str(exc) or type(exc).__name__)

    async def _handle_until_not_transient(self, delivery: Delivery, log) -> list[Output] | None:
        """The handler's outputs, retrying transient failures with backoff (the worker reads
        nothing new meanwhile); None if asked to stop while waiting."""
        wait, waiting = 1.0, False
        try:
            while True:
                try:
                    return await self._handle(delivery.message)
                except Exception as exc:
                    if not is_transient(exc) or self.stop.is_set():
                        raise
                    log.warning("dependency unavailable; will retry, not counted as a failure",
                                error=str(exc) or type(exc).__name__, retry_in_s=wait)
                if not waiting:
                    waiting = True
                    self.waiting_on_dependency += 1
                await self._wait_stop(wait)
                if self.stop.is_set():
                    return None
                wait = min(wait * 2, self.ctx.config.worker.transient_backoff_max_s)
        finally:
            if waiting:
                self.waiting_on_dependency -= 1

    async def _handle(self, message) -> list[Output]:
        deadline = self.ctx.config.worker.message_deadline_s
        if not deadline:
            return await self.handler.handle(message)
        timer = asyncio.timeout(deadline)
        try:
            async with timer:
                return await self.handler.handle(message)
        except TimeoutError:
            if timer.expired():
                raise DeadlineExceeded(f"ran past the message deadline ({deadline:g} s)") from None
            raise

    async def _failed(self, delivery: Delivery, exc: Exception, log) -> bool:
        """Count a failure; dead-letter at the ``max_attempts``-th (returns True), else leave it
        for a retry."""
        error = str(exc) or type(exc).__name__
        limit = self.bus.config.max_attempts
        try:
            failures = await self.bus.record_failure(delivery, self.group)
            if failures >= limit:
                await self.bus.dead_letter(delivery, self.group, f"failed {failures} times; last: {error}",
                                               worker=self.ctx.worker_id)
                return True
        except Exception as bus_exc:  # Redis away: the entry stays pending either way
            log.warning("could not count the failure", error=str(bus_exc) or type(bus_exc).__name__)
            failures = delivery.failures + 1
        if isinstance(exc, DeadlineExceeded):
            log.error("handler ran past its deadline; left pending for retry", error=error,
                      failures=failures, max_attempts=limit)
        else:
            log.error("handler failed; left pending for retry", failures=failures, max_attempts=limit,
                      exc_info=exc)
        return False

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
            await asyncio.wait_for(self.bus.forget_consumer(self.stream, self.group, self.ctx.worker_id), 5)
        except Exception as exc:  # bookkeeping only: a leftover consumer entry is harmless
            self.ctx.log.warning("could not remove consumer", error=str(exc) or type(exc).__name__)

    async def _keep_alive_loop(self) -> None:
        interval = self.ctx.config.bus.claim_idle_ms / 3000
        while True:
            await asyncio.sleep(interval)
            ids = list(self.in_flight)
            try:
                await self.bus.keep_alive(self.stream, self.group, self.ctx.worker_id, ids)
            except Exception as exc:
                self.ctx.log.warning("keep-alive failed", error=str(exc) or type(exc).__name__)

    async def _wait_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)
        except TimeoutError:
            pass
