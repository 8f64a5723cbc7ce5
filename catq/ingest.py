"""The ingest role: an HTTP front door that puts prompts on the ``prompts`` stream.

    POST /v1/prompts       {"text": "...", "task": "math"} | {"prompts": [...]} | [...]
                           → 202 {"ids", "prompts": [{"prompt_id", "status", "new"}]}
                             (200 when every prompt was already there: nothing was added)
    GET  /v1/prompts/{id}  → status and whatever result the pipeline has written (404 if unknown)
    GET  /healthz          → 200 when Redis answers, else 503 (no token, no rate limit)
    GET  /metrics          → Prometheus text: stream lengths, pending per group, dead letters

Run it with ``catq worker ingest`` or ``python workers/ingest.py --config F``. When the environment
variable named by ``ingest.token_env`` is set, every route but /healthz needs
``Authorization: Bearer <token>``; without one, ingest refuses to start on a non-loopback host.

A POST is checked whole before anything is enqueued, and each problem is a 4xx naming it: a
body over ``max_body_bytes`` (413), invalid UTF-8, invalid JSON, nesting deeper than
``max_nesting``, wrong types or keys, lone surrogates, texts over ``max_text_chars`` (413).
Validation is one pure function, :func:`~catq.prompt_requests.parse_prompts`, shared with
``catq submit``.

Enqueueing is all or nothing and idempotent (:func:`~catq.prompt_requests.enqueue`, one atomic
script in the Bus):

- a prompt may carry its own ``prompt_id``; one whose result already exists is not enqueued
  again, and the answer gives its current status;
- a request with an ``Idempotency-Key`` header seen before (per client, within
  ``bus.result_ttl_s``) gets the first request's answer again (header ``Idempotent-Replayed``)
  and enqueues nothing; the same key with a different body is 422.

Under load (each answer says which limit it hit):

- each client (the bearer token when auth is on, else the remote address) gets
  ``rate_limit_per_s`` requests per second with bursts of ``rate_limit_burst`` (429 with
  Retry-After beyond; off when 0), one token bucket in Redis shared by every ingest replica;
- admission control: while the ``prompts`` backlog (accepted, not yet rolled out) would exceed
  ``max_backlog``, new prompts get 429 with Retry-After (off when 0); a request that writes
  nothing (an ``Idempotency-Key`` replay, prompt ids all already there) is still answered;
- a request whose Redis work takes longer than ``redis_deadline_s`` (Redis down), or that Redis
  refuses for memory (OOM, at ``maxmemory`` with ``noeviction``), is answered 503 with
  Retry-After; its enqueue happened whole or not at all, so retrying with the same key or ids is
  safe.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import math
import os
import time

from aiohttp import web

from catq import metrics as catq_metrics
from catq.bus import Bus, is_out_of_memory, is_retryable
from catq.config import ConfigError, IngestConfig
from catq.messages import Prompt
from catq.prompt_requests import (
    IDEMPOTENCY_KEY,
    Enqueued,
    PromptRequestError,
    answer_without_writing,
    decode_body,
    enqueue,
    fingerprint_of,
    idempotency_record,
    parse_prompts,
)
from catq.results import ResultStore
from catq.runtime import WorkerContext
from catq.topology import PROMPTS

# -- admission control --------------------------------------------------------------------------

BACKLOG_RETRY_AFTER_S = 5
"""Retry-After when the backlog is full: rollout drains it a prompt group at a time (seconds
each), so asking again sooner mostly earns another 429."""


class BacklogGauge:
    """The ``prompts`` backlog (accepted, not yet rolled out) as this ingest sees it: read
    through the Bus at most once per ``max_age_s`` (reading it on every request would add a
    round trip to each), plus what this process enqueued since, so that between two reads one
    ingest never admits past the limit."""

    def __init__(self, bus: Bus, limit: int, max_age_s: float = 1.0, clock=time.monotonic):
        self.bus, self.limit, self.max_age_s, self.clock = bus, limit, max_age_s, clock
        self.value, self.read_at = 0, -math.inf
        self.reserved = 0
        """Room held by requests admitted and still enqueueing (so concurrent ones see it)."""
        self._reading = asyncio.Lock()  # concurrent requests share one read

    async def current(self) -> int:
        if self.clock() - self.read_at >= self.max_age_s:
            async with self._reading:
                if self.clock() - self.read_at >= self.max_age_s:
                    self.value = await self.bus.backlog(PROMPTS.name, PROMPTS.consumer, cap=self.limit + 1)
                    self.read_at = self.clock()
        return self.value + self.reserved

    async def reserve(self, count: int) -> int | None:
        """Hold room for ``count`` prompts until :meth:`settle`: None when they fit, else the
        backlog that refuses them. Checking and holding happen with no await between them, so
        concurrent requests cannot all pass the check before any of them has enqueued (the soak,
        bench/soak.py, saw a backlog of 5 over a limit of 4 from two clients without this)."""
        backlog = await self.current()
        if backlog + count > self.limit:
            return backlog
        self.reserved += count
        return None

    def settle(self, reserved: int, added: int) -> None:
        """A reserved request finished: release its room and count what it really enqueued."""
        self.reserved -= reserved
        self.added(added)

    def added(self, count: int) -> None:
        self.value += count

    def refusal(self, backlog: int, adding: int) -> PromptRequestError:
        what = "this prompt" if adding == 1 else f"these {adding} prompts"
        return PromptRequestError(
            f"backlog full: {backlog} prompts accepted and not yet rolled out, {what} would exceed "
            f"the limit of {self.limit} (ingest.max_backlog); retry after {BACKLOG_RETRY_AFTER_S} s",
            429, headers={"Retry-After": str(BACKLOG_RETRY_AFTER_S)})


# -- the HTTP app ---------------------------------------------------------------------------------

BUS_KEY = web.AppKey("bus", Bus)
RESULTS_KEY = web.AppKey("results", ResultStore)
LIMITS_KEY = web.AppKey("limits", IngestConfig)
TOKEN_KEY = web.AppKey("token", str)
BACKLOG_KEY = web.AppKey("backlog", BacklogGauge)


class RedisUnavailable(Exception):
    """Redis did not answer within the request's deadline."""

    retry_after_s = 1


class RedisOutOfMemory(RedisUnavailable):
    """Redis refused a write: it is at ``maxmemory`` and evicts nothing (noeviction)."""

    retry_after_s = BACKLOG_RETRY_AFTER_S


def make_app(bus: Bus, results: ResultStore, limits: IngestConfig, token: str | None) -> web.Application:
    """The ingest app; ``token`` (if non-empty) is required as a Bearer token except on /healthz."""
    middlewares = [_unavailable_middleware]
    if token:
        middlewares.append(_auth_middleware(token))
    if limits.rate_limit_per_s > 0:
        middlewares.append(_rate_limit_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=limits.max_body_bytes)
    app[BUS_KEY], app[RESULTS_KEY], app[LIMITS_KEY], app[TOKEN_KEY] = bus, results, limits, token or ""
    if limits.max_backlog:
        app[BACKLOG_KEY] = BacklogGauge(bus, limits.max_backlog)
    app.router.add_post("/v1/prompts", submit_prompts)
    app.router.add_get("/v1/prompts/{prompt_id}", get_prompt)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def _auth_middleware(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong 'Authorization: Bearer <token>'")
        return await handler(request)

    return auth


@web.middleware
async def _rate_limit_middleware(request: web.Request, handler):
    """Per-client token bucket in Redis, so every ingest replica counts against one limit."""
    if request.path != "/healthz":
        limits = request.app[LIMITS_KEY]
        wait = await within_deadline(request, request.app[BUS_KEY].take_token(
            client_of(request), limits.rate_limit_per_s, limits.rate_limit_burst))
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return _error(429, f"rate limit: {limits.rate_limit_per_s:g} requests/s, bursts of "
                               f"{limits.rate_limit_burst}; retry after {seconds} s",
                          headers={"Retry-After": str(seconds)})
    return await handler(request)


@web.middleware
async def _unavailable_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except RedisUnavailable as exc:
        return _error(503, f"{exc}; nothing was half-written: retry (with the same Idempotency-Key or "
                           "prompt_id to be sure nothing is enqueued twice)",
                      headers={"Retry-After": str(exc.retry_after_s)})


def client_of(request: web.Request) -> str:
    """Who is asking, for rate limits and Idempotency-Key scope: the bearer token when auth is on
    (it was checked; an unchecked header would let a client pick a fresh identity per request),
    else the remote address."""
    token = request.app[TOKEN_KEY]
    if token:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    return f"addr:{request.remote}"


async def within_deadline(request: web.Request, work):
    """Await Redis work, or raise RedisUnavailable after ``redis_deadline_s``."""
    deadline = request.app[LIMITS_KEY].redis_deadline_s
    try:
        return await asyncio.wait_for(work, deadline)
    except TimeoutError:
        raise RedisUnavailable(f"Redis did not answer within {deadline:g} s") from None
    except Exception as exc:
        if is_out_of_memory(exc):
            raise RedisOutOfMemory("Redis is out of memory (at its maxmemory, evicting nothing) and refused "
                                   "the write; it accepts prompts again as the pipeline drains") from None
        if not is_retryable(exc):
            raise
        raise RedisUnavailable(f"Redis unreachable ({exc})") from None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=headers)


async def submit_prompts(request: web.Request) -> web.Response:
    limits = request.app[LIMITS_KEY]
    try:
        body = decode_body(await _read_body(request, limits), limits)
        prompts = parse_prompts(body, limits, default_task="math")
        key = _request_key(request)
        done = await within_deadline(request, _admit(request.app, prompts, key, fingerprint_of(body)))
    except PromptRequestError as exc:
        return _error(exc.status, str(exc), headers=exc.headers)
    headers = {"Idempotent-Replayed": "true"} if done.replayed else None
    return web.json_response(done.body(), status=done.http_status, headers=headers)


async def _admit(app: web.Application, prompts: list[Prompt], key: str | None, fingerprint: str) -> Enqueued:
    """Enqueue, unless the backlog is full: then only a request that writes nothing is answered."""
    gauge = app.get(BACKLOG_KEY)
    if gauge is not None:
        backlog = await gauge.reserve(len(prompts))
        if backlog is not None:
            done = await answer_without_writing(app[BUS_KEY], prompts, request_key=key, fingerprint=fingerprint)
            if done is None:
                raise gauge.refusal(backlog, len(prompts))
            return done
    added = 0
    try:
        done = await enqueue(app[BUS_KEY], app[RESULTS_KEY], prompts, request_key=key, fingerprint=fingerprint)
        added = sum(done.new)
    finally:
        if gauge is not None:
            gauge.settle(len(prompts), added)
    return done


async def _read_body(request: web.Request, limits: IngestConfig) -> bytes:
    too_large = PromptRequestError(f"body too large; the limit is {limits.max_body_bytes} bytes", 413)
    if request.content_length is not None and request.content_length > limits.max_body_bytes:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:  # no or a false Content-Length
        raise too_large from None


def _request_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise PromptRequestError("Idempotency-Key: must be 1-255 visible ASCII characters")
    return idempotency_record(client_of(request), key)


async def get_prompt(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    result = await within_deadline(request, request.app[RESULTS_KEY].get(prompt_id))
    if result is None:
        return _error(404, f"unknown prompt id {prompt_id!r}")
    return web.json_response(result)


async def healthz(request: web.Request) -> web.Response:
    try:
        await request.app[BUS_KEY].ping(timeout_s=2)
    except Exception as exc:
        return web.json_response({"status": "redis unreachable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text (prometheus-client): the run's stream gauges, read now, and this
    process's own metrics."""
    bus = request.app[BUS_KEY]
    catq_metrics.stream_gauges(bus.run, await within_deadline(request, bus.stats()))
    body, content_type = catq_metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type, "X-Content-Type-Options": "nosniff"})


def ingest_token(config: IngestConfig) -> str | None:
    return os.environ.get(config.token_env) or None


def check_exposure(config: IngestConfig, token: str | None) -> None:
    """Raise ConfigError for an open door: a non-loopback host without a token."""
    if token is None and not is_loopback(config.host):
        raise ConfigError(f"ingest: refusing to listen on {config.host!r} (not loopback) without a token: "
                          f"set ${config.token_env}, or set ingest.host to 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name (or "" = every interface): it may resolve anywhere
        return False


async def serve(ctx: WorkerContext) -> None:
    config = ctx.config
    token = ingest_token(config.ingest)
    check_exposure(config.ingest, token)
    app = make_app(ctx.bus, ctx.results, config.ingest, token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.ingest.host, config.ingest.port)
        await site.start()
        ctx.serving()
        ctx.log.info("ingest listening", host=config.ingest.host, port=config.ingest.port, auth=bool(token))
        await ctx.stop.wait()
        ctx.log.info("ingest stopping")
    finally:
        await runner.cleanup()
