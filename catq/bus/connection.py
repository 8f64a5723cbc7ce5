"""The Redis client of a Bus, and which of its errors are worth retrying.

Redis connection errors are retried with capped exponential backoff (:meth:`Connection.retrying`).
Commands are retried as a whole; a retried XADD whose first reply was lost may duplicate an
entry (at least once), a lost XREADGROUP reply leaves entries pending, reclaimed later.
A refused password or permission (WRONGPASS, NOAUTH, NOPERM) is not retried: it raises
:class:`RedisAuthError`, a ConfigError, so a role stops and ``catq worker`` exits 2.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, OutOfMemoryError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from catq.bus.keys import KeyLayout
from catq.config import BusConfig, ConfigError
from catq.log import redact

SOCKET_TIMEOUT_S = 30.0
"""Above the longest single blocking read (MAX_BLOCK_MS)."""
AUTH_ERROR_CODES = ("WRONGPASS", "NOAUTH", "NOPERM")

T = TypeVar("T")
log = structlog.get_logger("catq.bus")


class RedisAuthError(ConfigError):
    """Redis refused our credentials or permissions: retrying cannot help, the URL is wrong."""


def is_auth_error(exc: BaseException) -> bool:
    """A refused password, missing AUTH, or an ACL permission error."""
    if isinstance(exc, (AuthenticationError, AuthorizationError, RedisAuthError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).upper().startswith(AUTH_ERROR_CODES)


def is_retryable(exc: BaseException) -> bool:
    """Redis went away or did not answer in time (BusyLoadingError is a ConnectionError too).
    Auth errors are ConnectionErrors in redis-py, but never retryable."""
    if is_auth_error(exc):
        return False
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError))


def is_out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write for memory: at ``maxmemory`` with ``noeviction`` it refuses every
    command (or script) that may grow it, whole, and serves the rest. Not retried here: ingest
    answers 503 at once, a worker waits for memory (``catq.runtime``)."""
    return isinstance(exc, OutOfMemoryError)


def auth_error(url: str, exc: BaseException) -> RedisAuthError:
    """The one-line error for a refused login, naming the URL without its password."""
    return RedisAuthError(f"Redis at {redact(url)} refused catq's credentials "
                          f"({type(exc).__name__}: {redact(str(exc))}): check the password in "
                          f"CATQ_REDIS_URL / redis_url")


class Connection(KeyLayout):
    """One run's Redis client and the retry loop every command of the Bus goes through."""

    def __init__(self, redis_url: str, run: str, config: BusConfig | None = None, *,
                 reconnect_timeout_s: float | None = None):
        self.run = run
        self.url = redact(redis_url)
        """The Redis URL without its password, for messages."""
        self.config = config or BusConfig()
        self.reconnect_timeout_s = reconnect_timeout_s
        """How long to keep retrying when Redis is unreachable; None = until it is back."""
        self.redis: aioredis.Redis = client(redis_url, cluster=self.config.cluster)

    async def close(self) -> None:
        await self.redis.aclose()

    async def retrying(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``op`` until it succeeds, retrying Redis connection errors with capped
        exponential backoff (0.05 s doubling to 2 s, jittered) for ``reconnect_timeout_s``.
        An auth error raises :class:`RedisAuthError` at once."""
        delay, deadline = 0.05, None
        while True:
            try:
                return await op()
            except RedisAuthError:
                raise
            except Exception as exc:
                if is_auth_error(exc):
                    raise auth_error(self.url, exc) from None
                if not is_retryable(exc):
                    raise
                now = time.monotonic()
                if deadline is None:
                    timeout = self.reconnect_timeout_s
                    deadline = now + timeout if timeout is not None else float("inf")
                if now >= deadline:
                    raise
                log.warning("redis unreachable, retrying", op=what, error=str(exc) or type(exc).__name__,
                            retry_in_s=round(delay, 2))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)

    async def ping(self, timeout_s: float) -> None:
        """Raise unless Redis answers within ``timeout_s`` (no retries: a health check)."""
        await asyncio.wait_for(self.redis.ping(), timeout=timeout_s)

    async def check_access(self) -> None:
        """Wait (as ``retrying`` does) until Redis answers; raise :class:`RedisAuthError` at once
        if it refuses our credentials. A role calls this before it serves."""
        await self.retrying(self.redis.ping, "ping")


def client(url: str, *, cluster: bool) -> aioredis.Redis:
    """redis-py's client for ``url``; with ``cluster``, a Redis Cluster client that finds the
    other nodes from this one (a run's keys share one hash slot, so every call goes to one node)."""
    options = dict(
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),  # retries are ours (retrying), with backoff and a log line
    )
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


async def redis_answers(url: str) -> bool:
    """Whether a Redis server answers PING at ``url`` within a second (with its credentials)."""
    return await redis_state(url) == "ok"


async def redis_state(url: str) -> str:
    """"ok" when Redis answers PING at ``url`` within a second, "refused" when one answers but
    refuses the URL's credentials, "down" when none answers."""
    probe = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        await probe.ping()
        return "ok"
    except (OSError, aioredis.RedisError) as exc:
        return "refused" if is_auth_error(exc) else "down"
    finally:
        await probe.aclose()
