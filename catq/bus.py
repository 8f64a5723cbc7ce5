"""The one module that talks to Redis: the stream protocol (XADD, XREADGROUP, XACK, XAUTOCLAIM,
...), and the plain keys beside it (heartbeats, per-prompt result hashes, restart counts, the
policy version, the learner's lease and fencing token, trained prompt/version pairs). No other
module calls Redis.

Every key of a run lives under ``catq:{<run>}:`` (:func:`run_key`); a stream ``prompts`` is
``catq:{<run>}:prompts``. The braces are a Redis Cluster hash tag: all of a run's keys hash to one
slot, so every script, which touches several streams, runs on one node, and runs spread over a
cluster (``bus.cluster``).
Each entry has one field ``message`` (msgpack bytes, see catq.messages) and, for outputs, a
field ``source`` with the id of the input entry that produced it.

Delivery is at least once, processed effectively once:

- groups are created idempotently from id 0, so nothing written before a group existed is lost;
- :meth:`Bus.complete` writes a consumer's outputs, a *done marker* for its input and the XACK in
  one atomic step (a Lua script: Redis runs it like MULTI/EXEC, and it can also check the
  marker first). A re-delivered input whose marker exists is acked without redoing the work,
  and two consumers racing on one input produce one set of outputs. The marker is also kept
  per unit of work (:func:`catq.messages.work_id`: the prompt id, and the policy version of a
  group), so a duplicate entry of the same work (a retried XADD whose first reply was lost) is
  acked where it arrives instead of being processed twice;
- entries idle longer than ``claim_idle_ms`` on a consumer (it died) are reclaimed with
  XAUTOCLAIM; a live consumer keeps its slow entries with :meth:`Bus.keep_alive`;
- undecodable entries, entries whose handler failed ``max_attempts`` times (counted by the
  worker with :meth:`Bus.record_failure`; transient failures are not counted) and entries
  delivered more than ``max_deliveries`` times without completing go to ``dead``;
- trimming never removes an entry some group has not acknowledged (see ``_TRIM``), and never
  touches ``dead``: operators list, replay or drop dead letters with `catq dead`;
- Redis connection errors are retried with capped exponential backoff (see ``retrying``).
  Commands are retried as a whole; a retried XADD whose first reply was lost may duplicate an
  entry (at least once), a lost XREADGROUP reply leaves entries pending, reclaimed later.
  A refused password or permission (WRONGPASS, NOAUTH, NOPERM) is not retried: it raises
  :class:`RedisAuthError`, a ConfigError, so a role stops and ``catq worker`` exits 2;
- :meth:`Bus.publish_once` (ingest's enqueue) is the exception: entries keyed by a record, and
  optionally a request key, in one script, so a retry finds them there and adds nothing.

For debugging, every entry about a prompt is listed, in the step that writes it, in the prompt's
trace list ``trace:<prompt_id>`` (``catq trace``: :meth:`Bus.trace_entries`), and the worker
loop counts each message in ``rolestats:<role>`` / ``latency:<role>`` (``catq top``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgpack
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from catq.config import BusConfig, ConfigError
from catq.log import redact
from catq.messages import (
    DeadLetter,
    Message,
    MessageDecodeError,
    decode,
    encode,
    prompt_id_of,
    work_id,
)
from catq.topology import DEAD, GROUP_STREAMS, STREAM_NAMES, WEIGHTS

MESSAGE_FIELD = b"message"
SOURCE_FIELD = b"source"
MAX_BLOCK_MS = 20_000
"""Longest single blocking read; the socket timeout is above it."""
SOCKET_TIMEOUT_S = 30.0
LATENCY_SAMPLES = 200
"""Handler latencies kept per role for `catq top`'s percentiles and throughput."""

T = TypeVar("T")
log = structlog.get_logger("catq.bus")


AUTH_ERROR_CODES = ("WRONGPASS", "NOAUTH", "NOPERM")


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


def auth_error(url: str, exc: BaseException) -> RedisAuthError:
    """The one-line error for a refused login, naming the URL without its password."""
    return RedisAuthError(f"Redis at {redact(url)} refused catq's credentials "
                          f"({type(exc).__name__}: {redact(str(exc))}): check the password in "
                          f"CATQ_REDIS_URL / redis_url")


@dataclass
class Delivery:
    stream: str
    """Stream name without namespace."""
    entry_id: str
    message: Message
    """The decoded message."""
    attempts: int
    """Times this entry has been delivered to the group, including this delivery."""
    payload: bytes
    """The raw message bytes."""
    failures: int = 0
    """Times a handler failed on it (:meth:`Bus.record_failure`); transient failures excluded."""


@dataclass
class Output:
    stream: str
    message: Message


@dataclass
class KeyedEntry:
    """A message to publish at most once, keyed by a record (a hash) written with it: while the
    record exists the message counts as published (ingest: ``result:<prompt_id>``)."""

    message: Message
    record: str
    """Hash name without namespace."""
    fields: dict[str, str]
    """Written to the record, with the message."""


@dataclass
class PublishedOnce:
    """What :meth:`Bus.publish_once` did (or, replayed, what the first call with its key did)."""

    existing: list[str | None]
    """Per entry: None when published by that call, else the status field its record already had
    ("" if none)."""
    request_value: str
    """The value stored with the request key (the caller's own when not replayed)."""
    replayed: bool
    """The request key had been seen: nothing was written now."""


# complete(): KEYS = input stream, the entry's done marker, its work's done marker (see
# work_id), the prompt's trace list, output streams...; ARGV = group, entry id, marker ttl (s),
# "stream id" of the input for the trace ("" when the work has no prompt), then payloads (one per
# output stream, ARGV[i] for KEYS[i]), then the output streams' names. Either marker present:
# done already (this entry, or a duplicate entry of the same work), so only ack.
_COMPLETE = """
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local ids = {}
local n = #KEYS - 4
for i = 5, #KEYS do
  ids[#ids + 1] = redis.call('XADD', KEYS[i], '*', 'message', ARGV[i], 'source', ARGV[2])
end
local outputs = table.concat(ids, ' ')
redis.call('SET', KEYS[2], outputs, 'EX', tonumber(ARGV[3]))
redis.call('SET', KEYS[3], outputs, 'EX', tonumber(ARGV[3]))
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[4], ARGV[4])
  for i = 1, n do redis.call('RPUSH', KEYS[4], ARGV[4 + n + i] .. ' ' .. ids[i]) end
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# screen(): KEYS = per entry: its done marker, its work's done marker, its failure counter.
# Returns per entry: done (0/1), failures. One call per read instead of two commands per entry.
_SCREEN = """
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = math.min(redis.call('EXISTS', KEYS[i], KEYS[i + 1]), 1)
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i + 2]) or '0')
end
return out
"""

# publish() of a message about a prompt: KEYS = stream, the prompt's trace list; ARGV = stream
# name, trace ttl (s), then the entry's field/value pairs.
_PUBLISH_TRACED = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. id)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return id
"""

# replay_dead(): KEYS = dead stream, target stream; ARGV = dead entry id, payload. The XDEL
# decides: two operators replaying one letter at once put it back once.
_REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', 'message', ARGV[2], 'source', 'replay:' .. ARGV[1])
"""

# publish_once(): KEYS = stream, request key, one record key per entry;
# ARGV = ttl (s), "1" if the request key is used, request value, status field, then per entry:
# payload, n, n field/value pairs. "#!lua" (no allow-oom): refused whole, before any write, when
# Redis is out of memory. All reads come before the first write, so an error (a record of the
# wrong type) leaves nothing written either. Returns {replayed (0/1), msgpack [value, outcome]}
# where outcome has, per entry, false (published now) or its record's status field.
_PUBLISH_ONCE = """#!lua
if ARGV[2] == '1' then
  local seen = redis.call('GET', KEYS[2])
  if seen then return {1, seen} end
end
local outcome = {}
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    outcome[i - 2] = redis.call('HGET', KEYS[i], ARGV[4]) or ''
  else
    outcome[i - 2] = false
  end
end
local a = 5
for i = 3, #KEYS do
  local n = tonumber(ARGV[a + 1])
  if outcome[i - 2] == false then
    redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * n))
    redis.call('EXPIRE', KEYS[i], ARGV[1])
    redis.call('XADD', KEYS[1], '*', 'message', ARGV[a])
  end
  a = a + 2 + 2 * n
end
local record = cmsgpack.pack({ARGV[3], outcome})
if ARGV[2] == '1' then
  redis.call('SET', KEYS[2], record, 'EX', ARGV[1])
end
return {0, record}
"""

# trim(): KEYS = stream; ARGV = max length, "1" if the stream is not trimmed without a group. Removes the oldest entries beyond max length, but
# only those below every group's *needed* id: its oldest pending entry, or when nothing is
# pending its last-delivered id (entries after it are undelivered; the entry itself is kept,
# which is merely conservative). Entries below that id were delivered and acked by the group.
# Atomic (a script), so no delivery or ack can slip between measuring and trimming. It reads
# at most as many entries as it deletes (plus none), so the cost is amortised per entry.
_TRIM = """
local function less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am < bm end
  return tonumber(as) < tonumber(bs)
end
local excess = redis.call('XLEN', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local needed = nil
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 and ARGV[2] == '1' then return 0 end
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local id = info['last-delivered-id']
  if tonumber(info['pending']) > 0 then
    id = redis.call('XPENDING', KEYS[1], info['name'])[2]
  end
  if needed == nil or less(id, needed) then needed = id end
end
local stop = '+'
if needed ~= nil then
  if needed == '0-0' then return 0 end
  stop = '(' .. needed
end
local doomed = redis.call('XRANGE', KEYS[1], '-', stop, 'COUNT', excess)
if #doomed == 0 then return 0 end
local ms, seq = string.match(doomed[#doomed][1], '^(%d+)-(%d+)$')
return redis.call('XTRIM', KEYS[1], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
"""


# Learner lease (see "learner lease" in Bus). KEYS = lease key, fencing counter.
# acquire: ARGV = holder, ttl ms; returns the new token, or 0 when the lease is held.
_LEASE_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""
# renew: ARGV = token, holder, ttl ms; 1 if the token is still the newest (lease re-set), else 0.
_LEASE_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# release: ARGV = token; deletes the lease only while the token is the newest.
_LEASE_RELEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""
# fenced publish: KEYS = fencing counter, weights stream, policy version key;
# ARGV = token, version, message payload ('' for none). nil (nothing written) when fenced out.
_FENCED_PUBLISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local id = ''
if ARGV[3] ~= '' then id = redis.call('XADD', KEYS[2], '*', 'message', ARGV[3]) end
redis.call('SET', KEYS[3], ARGV[2])
return id
"""


class LeaseLost(Exception):
    """This holder's fencing token is no longer current: another holder took the lease."""


def run_key(run: str, name: str) -> str:
    """The Redis key ``name`` of ``run``: ``catq:{<run>}:<name>``, hash-tagged by run (see the
    module docstring)."""
    return f"catq:{{{run}}}:{name}"


def legacy_run_key(run: str, name: str) -> str:
    """Where a key lived before keys were hash-tagged (``catq:<run>:<name>``); see
    :meth:`Bus.migrate_legacy_keys`."""
    return f"catq:{run}:{name}"


class Bus:
    """Streams of one run. Safe to share between the tasks of one event loop."""

    def __init__(
        self,
        redis_url: str,
        run: str,
        config: BusConfig | None = None,
        *,
        reconnect_timeout_s: float | None = None,
        trim_interval_s: float = 1.0,
    ):
        self.run = run
        self.url = redact(redis_url)
        """The Redis URL without its password, for messages."""
        self.config = config or BusConfig()
        self.reconnect_timeout_s = reconnect_timeout_s
        """How long to keep retrying when Redis is unreachable; None = until it is back."""
        self.trim_interval_s = trim_interval_s
        """A stream written by this bus is trimmed at most this often."""
        self.redis: aioredis.Redis = _client(redis_url, cluster=self.config.cluster)
        self._complete = self.redis.register_script(_COMPLETE)
        self._publish_once = self.redis.register_script(_PUBLISH_ONCE)
        self._trim = self.redis.register_script(_TRIM)
        self._replay = self.redis.register_script(_REPLAY)
        self._screen_script = self.redis.register_script(_SCREEN)
        self._lease_acquire = self.redis.register_script(_LEASE_ACQUIRE)
        self._lease_renew = self.redis.register_script(_LEASE_RENEW)
        self._lease_release = self.redis.register_script(_LEASE_RELEASE)
        self._fenced_publish = self.redis.register_script(_FENCED_PUBLISH)
        self._publish_traced = self.redis.register_script(_PUBLISH_TRACED)
        self._groups: set[tuple[str, str]] = set()
        self._reclaim_cursor: dict[tuple[str, str], str] = {}
        self._last_reclaim: dict[tuple[str, str], float] = {}
        self._last_trim: dict[str, float] = {}
        self.on_dead_letter: Callable[[DeadLetter], Awaitable[None]] | None = None
        """Called after an entry is dead-lettered (the runtime marks the prompt's result)."""

    def key(self, name: str) -> str:
        return run_key(self.run, name)

    def done_key(self, stream: str, group: str, entry_id: str) -> str:
        return self.key(f"done:{stream}:{group}:{entry_id}")

    def failures_key(self, stream: str, group: str, entry_id: str) -> str:
        return self.key(f"failures:{stream}:{group}:{entry_id}")

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

    # -- writing -------------------------------------------------------------------------------

    async def publish(self, stream: str, message: Message, *, source: str | None = None) -> str:
        """XADD one message (listing it in its prompt's trace); returns its entry id."""
        fields: dict[bytes, bytes | str] = {MESSAGE_FIELD: encode(message)}
        if source is not None:
            fields[SOURCE_FIELD] = source
        prompt_id = prompt_id_of(message) if not isinstance(message, DeadLetter) else _prompt_of(message.payload)

        async def write() -> bytes:
            if prompt_id is None:
                return await self.redis.xadd(self.key(stream), fields)
            return await self._publish_traced(keys=[self.key(stream), self.trace_key(prompt_id)],
                                              args=[stream, self.config.result_ttl_s, *_flat(fields)])

        entry_id = await self.retrying(write, f"publish {stream}")
        await self._maybe_trim(stream)
        return _s(entry_id)

    # -- idempotent enqueue --

    async def publish_once(self, stream: str, entries: list[KeyedEntry], ttl_s: int, *,
                           request_key: str | None = None, request_value: str = "",
                           status_field: str = "status") -> PublishedOnce:
        """Publish the entries whose record does not exist yet, with their records (expiring after
        ``ttl_s``), all in one atomic script: every entry or none. With ``request_key`` (a name
        without namespace), a key seen within ``ttl_s`` replays the first call's outcome instead
        of writing anything; a retried call whose first reply was lost is thus a no-op."""
        if not all(e.fields for e in entries):
            raise ValueError("every KeyedEntry needs fields: its record must exist once published")
        keys = [self.key(stream), self.key(request_key or stream)] + [self.key(e.record) for e in entries]
        args: list[Any] = [ttl_s, int(request_key is not None), request_value, status_field]
        for entry in entries:
            args += [encode(entry.message), len(entry.fields)]
            args += [part for pair in entry.fields.items() for part in pair]
        replayed, record = await self.retrying(lambda: self._publish_once(keys=keys, args=args),
                                               f"publish once {stream}")
        await self._maybe_trim(stream)
        value, outcome = msgpack.unpackb(record, raw=False)
        return PublishedOnce([None if o is False else o for o in outcome], value, bool(replayed))

    async def complete(self, delivery: Delivery, group: str, outputs: list[Output], *,
                       prompt_id: str | None = None) -> None:
        """Write outputs (each with ``source`` = the input's id), the done markers (of the entry
        and of its work), the prompt's trace entries (:meth:`trace_entries`) and the XACK
        atomically. A no-op apart from the ack when either marker already exists. ``prompt_id``
        defaults to the delivered message's."""
        prompt_id = prompt_id or prompt_id_of(delivery.message)
        keys = [self.key(delivery.stream), self.done_key(delivery.stream, group, delivery.entry_id),
                self.done_key(delivery.stream, group, work_id(delivery.message, delivery.entry_id)),
                self.trace_key(prompt_id or "")]
        keys += [self.key(o.stream) for o in outputs]
        traced = f"{delivery.stream} {delivery.entry_id}" if prompt_id else ""
        args = [group, delivery.entry_id, self.config.result_ttl_s, traced]
        args += [encode(o.message) for o in outputs] + [o.stream for o in outputs]
        await self.retrying(lambda: self._complete(keys=keys, args=args), f"complete {delivery.stream}")
        for stream in {o.stream for o in outputs}:
            await self._maybe_trim(stream)

    async def ack(self, deliveries: list[Delivery], group: str) -> None:
        """Plain XACK, no outputs (the learner acks once its step is checkpointed)."""
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        for stream, ids in by_stream.items():
            await self.retrying(lambda: self.redis.xack(self.key(stream), group, *ids), f"ack {stream}")

    async def record_failure(self, delivery: Delivery, group: str) -> int:
        """Count one failure of a handler on this entry; returns the failures so far."""
        key = self.failures_key(delivery.stream, group, delivery.entry_id)

        async def count() -> int:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, self.config.result_ttl_s)
            return int((await pipe.execute())[0])

        return await self.retrying(count, f"record failure {delivery.stream}")

    async def dead_letter(self, delivery: Delivery, group: str, error: str, *, worker: str = "") -> None:
        """Move an entry to ``dead`` with the error text, and ack it."""
        await self._dead_letter(delivery.stream, group, delivery.entry_id, delivery.payload,
                                delivery.attempts, error, worker)

    async def _dead_letter(self, stream: str, group: str, entry_id: str, payload: bytes,
                           attempts: int, error: str, worker: str) -> None:
        letter = DeadLetter(stream=stream, entry_id=entry_id, payload=payload, error=error,
                            attempts=attempts, worker=worker)
        # Through complete(): atomic, and a second consumer giving up on it adds no second letter.
        placeholder = Delivery(stream, entry_id, letter, attempts, payload)
        await self.complete(placeholder, group, [Output(DEAD.name, letter)], prompt_id=_prompt_of(payload))
        log.warning("dead-lettered", stream=stream, entry_id=entry_id, attempts=attempts, error=error)
        if self.on_dead_letter is not None:
            await self.on_dead_letter(letter)

    # -- consuming through a group ---------------------------------------------------------------

    async def ensure_group(self, stream: str, group: str) -> None:
        """Create the group (from id 0, creating the stream if needed) unless it exists."""
        if (stream, group) in self._groups:
            return

        async def create() -> None:
            try:
                await self.redis.xgroup_create(self.key(stream), group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self.retrying(create, f"create group {group} on {stream}")
        self._groups.add((stream, group))

    async def read(self, stream: str, group: str, consumer: str, *, count: int,
                   message_type: type, block_ms: int | None = None) -> list[Delivery]:
        """Up to ``count`` deliveries: entries reclaimed from dead consumers first, then new ones
        (blocking up to ``block_ms``, default config.block_ms, when there are none). Undecodable
        and exhausted entries are dead-lettered, already-done entries acked; neither returned."""
        await self.ensure_group(stream, group)
        try:
            raw = await self._reclaim(stream, group, consumer, count)
            if len(raw) < count:
                block = None if raw else min(block_ms if block_ms is not None else self.config.block_ms,
                                             MAX_BLOCK_MS)
                raw += await self._read_new(stream, group, consumer, count - len(raw), block)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard((stream, group))  # Redis lost it (restart without persistence)
            return []
        return await self._screen(stream, group, consumer, raw, message_type)

    async def _read_new(self, stream: str, group: str, consumer: str, count: int,
                        block_ms: int | None) -> list[tuple[str, dict, int]]:
        key = self.key(stream)
        reply = await self.retrying(
            lambda: self.redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms),
            f"read {stream}",
        )
        entries = reply[0][1] if reply else []
        return [(_s(entry_id), fields, 1) for entry_id, fields in entries]

    async def _reclaim(self, stream: str, group: str, consumer: str, count: int) -> list[tuple[str, dict, int]]:
        """XAUTOCLAIM entries idle over claim_idle_ms, at most every claim_idle_ms/4 (≤ 5 s),
        walking the pending list with a remembered cursor."""
        slot = (stream, group)
        interval = min(self.config.claim_idle_ms / 4000, 5.0)
        now = time.monotonic()
        if now - self._last_reclaim.get(slot, 0.0) < interval:
            return []
        self._last_reclaim[slot] = now
        key, start = self.key(stream), self._reclaim_cursor.get(slot, "0-0")
        reply = await self.retrying(
            lambda: self.redis.xautoclaim(key, group, consumer, self.config.claim_idle_ms,
                                          start_id=start, count=count),
            f"reclaim {stream}",
        )
        cursor, entries = _s(reply[0]), reply[1]
        self._reclaim_cursor[slot] = cursor
        if cursor != "0-0" and len(entries) < count:
            self._last_reclaim[slot] = 0.0  # more to walk: look again on the next read
        entries = [(_s(i), f) for i, f in entries if f is not None]
        if not entries:
            return []

        async def counts() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, _ in entries:
                pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
            return await pipe.execute()

        pending = await self.retrying(counts, f"reclaim {stream}")
        found = []
        for (entry_id, fields), info in zip(entries, pending):
            attempts = int(info[0]["times_delivered"]) if info else 1
            found.append((entry_id, fields, attempts))
        log.info("reclaimed", stream=stream, group=group, entries=[e[0] for e in found])
        return found

    async def _screen(self, stream: str, group: str, consumer: str,
                      raw: list[tuple[str, dict, int]], message_type: type) -> list[Delivery]:
        """Decode entries; dead-letter the undecodable and exhausted, ack the already done (this
        entry, or another entry carrying the same work: a duplicate), return the rest."""
        decoded = []
        for entry_id, fields, attempts in raw:
            payload = fields.get(MESSAGE_FIELD, b"")
            try:
                decoded.append((entry_id, payload, attempts, decode(payload, expected=message_type)))
            except MessageDecodeError as exc:
                await self._dead_letter(stream, group, entry_id, payload, attempts, f"undecodable: {exc}", consumer)
        if not decoded:
            return []

        keys = []
        for entry_id, _, _, message in decoded:
            keys += [self.done_key(stream, group, entry_id), self.done_key(stream, group, work_id(message, entry_id)),
                     self.failures_key(stream, group, entry_id)]
        replies = await self.retrying(lambda: self._screen_script(keys=keys), f"read {stream}")
        deliveries, finished = [], []
        for (entry_id, payload, attempts, message), done, failed in zip(decoded, replies[::2], replies[1::2]):
            if done:
                finished.append(entry_id)
                continue
            failures = int(failed or 0)
            exhausted = self._exhausted(attempts, failures)
            if exhausted:
                await self._dead_letter(stream, group, entry_id, payload, attempts - 1, exhausted, consumer)
                continue
            deliveries.append(Delivery(stream, entry_id, message, attempts, payload, failures))
        if finished:
            key = self.key(stream)
            await self.retrying(lambda: self.redis.xack(key, group, *finished), f"ack {stream}")
            log.info("skipped already-done entries", stream=stream, group=group, entries=finished)
        return deliveries

    def _exhausted(self, attempts: int, failures: int) -> str | None:
        """Why an entry is not worth another delivery, or None."""
        if failures >= self.config.max_attempts:
            return f"failed {failures} times (max_attempts={self.config.max_attempts})"
        if attempts > self.config.max_deliveries:
            return (f"delivered {attempts - 1} times without completing (max_deliveries="
                    f"{self.config.max_deliveries}): a worker died on it each time?")
        return None

    async def keep_alive(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Reset the idle time of entries this consumer is still working on, so they are not
        reclaimed while it lives (XCLAIM JUSTID does not count as a delivery). Entries another
        consumer has meanwhile claimed are left alone."""
        if not entry_ids:
            return
        key = self.key(stream)
        wanted = set(entry_ids)

        async def touch() -> None:
            mine = await self.redis.xpending_range(key, group, min=min(entry_ids, key=_id_order),
                                                   max=max(entry_ids, key=_id_order),
                                                   count=len(entry_ids) * 4 + 16, consumername=consumer)
            ids = [_s(p["message_id"]) for p in mine if _s(p["message_id"]) in wanted]
            if ids:
                await self.redis.xclaim(key, group, consumer, 0, ids, justid=True)

        await self.retrying(touch, f"keep alive {stream}")

    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Remove a stopped consumer from the group if it holds no pending entries (so `catq
        status` does not list every worker that ever ran). Returns True if it was removed."""
        key = self.key(stream)

        async def forget() -> bool:
            if await self.redis.xpending_range(key, group, "-", "+", 1, consumername=consumer):
                return False
            await self.redis.xgroup_delconsumer(key, group, consumer)
            return True

        return await self.retrying(forget, f"forget consumer {consumer}")

    # -- reading without a group -----------------------------------------------------------------

    async def read_all(self, stream: str, message_type: type, after_id: str = "0",
                       block_ms: int | None = None, count: int = 100) -> list[tuple[str, Message]]:
        """Entries after ``after_id`` for a reader that sees everything (no group, no ack).
        Undecodable entries are logged and skipped."""
        block = min(block_ms, MAX_BLOCK_MS) if block_ms is not None else None
        key = self.key(stream)
        reply = await self.retrying(
            lambda: self.redis.xread({key: after_id}, count=count, block=block), f"read {stream}"
        )
        out = []
        for entry_id, fields in reply[0][1] if reply else []:
            try:
                out.append((_s(entry_id), decode(fields.get(MESSAGE_FIELD, b""), expected=message_type)))
            except MessageDecodeError as exc:
                log.warning("skipped undecodable entry", stream=stream, entry_id=_s(entry_id), error=str(exc))
        return out

    async def last(self, stream: str, message_type: type) -> tuple[str, Message] | None:
        """The newest decodable entry of a stream, or None."""
        for entry_id, payload in await self.tail_raw(stream, 10):
            try:
                return entry_id, decode(payload, expected=message_type)
            except MessageDecodeError:
                continue
        return None

    async def tail_raw(self, stream: str, count: int) -> list[tuple[str, bytes]]:
        """The newest ``count`` entries as (id, message bytes), newest first."""
        key = self.key(stream)
        entries = await self.retrying(lambda: self.redis.xrevrange(key, count=count), f"tail {stream}")
        return [(_s(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    async def read_raw(self, stream: str, after_id: str, count: int = 100,
                       block_ms: int | None = None) -> list[tuple[str, bytes]]:
        """Entries after ``after_id`` as (id, message bytes), oldest first (``catq tail -f``)."""
        key = self.key(stream)
        block = min(block_ms, MAX_BLOCK_MS) if block_ms is not None else None
        reply = await self.retrying(lambda: self.redis.xread({key: after_id}, count=count, block=block),
                                    f"read {stream}")
        return [(_s(i), f.get(MESSAGE_FIELD, b"")) for i, f in (reply[0][1] if reply else [])]

    async def read_range(self, stream: str, start: str = "-", count: int | None = None) -> list[tuple[str, bytes]]:
        """Entries from ``start`` (an id, or "-"), oldest first (``catq tail --since``)."""
        key = self.key(stream)
        entries = await self.retrying(lambda: self.redis.xrange(key, min=start, count=count), f"range {stream}")
        return [(_s(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    # -- tracing a prompt --------------------------------------------------------------------------

    def trace_key(self, prompt_id: str) -> str:
        return self.key(f"trace:{prompt_id}")

    async def trace_entries(self, prompt_id: str) -> list[tuple[str, str, bytes | None]]:
        """Every stream entry of one prompt, in the order they were written, as (stream, id,
        message bytes; None once trimmed). :meth:`complete` lists them in the prompt's trace key,
        so this is one LRANGE and one XRANGE per entry, whatever the streams' lengths."""
        listed = await self.retrying(lambda: self.redis.lrange(self.trace_key(prompt_id), 0, -1),
                                     f"trace {prompt_id}")
        seen = list(dict.fromkeys(_s(item) for item in listed))
        where = [tuple(item.split(" ", 1)) for item in seen]

        async def fetch() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for stream, entry_id in where:
                pipe.xrange(self.key(stream), min=entry_id, max=entry_id, count=1)
            return await pipe.execute()

        replies = await self.retrying(fetch, f"trace {prompt_id}") if where else []
        return [(stream, entry_id, reply[0][1].get(MESSAGE_FIELD, b"") if reply else None)
                for (stream, entry_id), reply in zip(where, replies)]

    # -- per-role work counters (`catq top`) -------------------------------------------------------

    def role_stats_key(self, role: str) -> str:
        return self.key(f"rolestats:{role}")

    def latency_key(self, role: str) -> str:
        return self.key(f"latency:{role}")

    async def record_handled(self, role: str, outcome: str, seconds: float) -> None:
        """Count one message a ``role`` worker finished (``outcome``: handled, failed, dead) and
        keep its handler latency among the newest LATENCY_SAMPLES (one round trip; not retried:
        these numbers only inform `catq top`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.role_stats_key(role), outcome, 1)
        pipe.lpush(self.latency_key(role), f"{time.time():.3f} {seconds:.4f} {outcome}")
        pipe.ltrim(self.latency_key(role), 0, LATENCY_SAMPLES - 1)
        await pipe.execute()

    async def role_stats(self, role: str) -> tuple[dict[str, int], list[tuple[float, float, str]]]:
        """A role's counters and its newest latency samples as (unix time, seconds, outcome)."""
        async def read() -> list:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.role_stats_key(role))
            pipe.lrange(self.latency_key(role), 0, -1)
            return await pipe.execute()

        counts, samples = await self.retrying(read, f"role stats {role}")
        parsed = []
        for sample in samples:
            at, seconds, outcome = _s(sample).split(" ")
            parsed.append((float(at), float(seconds), outcome))
        return {_s(k): int(v) for k, v in counts.items()}, parsed

    # -- dead letters ------------------------------------------------------------------------------

    async def dead_letters(self, count: int | None = None) -> list[tuple[str, bytes]]:
        """Entries of ``dead`` as (id, message bytes), oldest first (all when ``count`` is None)."""
        key = self.key(DEAD.name)
        entries = await self.retrying(lambda: self.redis.xrange(key, count=count), "read dead")
        return [(_s(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    async def replay_dead(self, dead_id: str, letter: DeadLetter) -> str | None:
        """Put a dead letter's original message back on its stream (a new entry, ``source``
        ``replay:<dead id>``) and remove the letter, atomically. None if it was already gone."""
        keys = [self.key(DEAD.name), self.key(letter.stream)]
        new_id = await self.retrying(lambda: self._replay(keys=keys, args=[dead_id, letter.payload]),
                                     "replay dead letter")
        return _s(new_id) if new_id else None

    async def drop_dead(self, dead_ids: list[str]) -> int:
        """Delete dead letters for good; returns how many existed."""
        if not dead_ids:
            return 0
        return int(await self.retrying(lambda: self.redis.xdel(self.key(DEAD.name), *dead_ids), "drop dead"))

    # -- upkeep and inspection ---------------------------------------------------------------------

    async def trim(self, stream: str) -> int:
        """Trim a stream towards config.max_stream_len without removing any entry a group has not
        acknowledged (or not yet been delivered); a GROUP_STREAMS stream with no group yet is
        left alone; ``dead`` never (it holds the only copy of that work: `catq dead`). Returns the
        number of entries removed."""
        self._last_trim[stream] = time.monotonic()
        if stream == DEAD.name:
            return 0
        removed = await self.retrying(
            lambda: self._trim(keys=[self.key(stream)],
                               args=[self.config.max_stream_len, int(stream in GROUP_STREAMS)]),
            f"trim {stream}",
        )
        return int(removed)

    async def _maybe_trim(self, stream: str) -> None:
        if time.monotonic() - self._last_trim.get(stream, 0.0) >= self.trim_interval_s:
            await self.trim(stream)

    async def stats(self, streams: tuple[str, ...] = STREAM_NAMES) -> dict[str, Any]:
        """Per stream: length and, per group, pending/lag/consumers (idle ms, pending)."""
        out: dict[str, Any] = {}
        for stream in streams:
            key = self.key(stream)
            length = await self.retrying(lambda: self.redis.xlen(key), f"stats {stream}")
            groups = []
            if length or await self.redis.exists(key):
                for g in await self.retrying(lambda: self.redis.xinfo_groups(key), f"stats {stream}"):
                    name = _s(g["name"])
                    consumers = await self.retrying(lambda: self.redis.xinfo_consumers(key, name),
                                                    f"stats {stream}")
                    groups.append({
                        "group": name,
                        "pending": int(g["pending"]),
                        "lag": g.get("lag"),
                        "last_delivered_id": _s(g["last-delivered-id"]),
                        "consumers": [{"name": _s(c["name"]), "pending": int(c["pending"]),
                                       "idle_ms": int(c["idle"])} for c in consumers],
                    })
            out[stream] = {"length": int(length), "groups": groups}
        return out

    # -- plain keys ------------------------------------------------------------------------------

    async def heartbeats(self, role: str) -> dict[str, dict]:
        """Live workers of ``role`` (heartbeat keys not yet expired): worker id -> what the
        worker wrote (pid, host, "at": unix time of its newest beat)."""
        prefix = self.heartbeat_key(role, "")

        async def read() -> dict[str, dict]:
            keys = [k async for k in self.redis.scan_iter(match=prefix + "*", count=1000)]
            values = await self.redis.mget(keys) if keys else []
            return {_s(k)[len(prefix):]: _json_or_empty(v) for k, v in zip(keys, values) if v is not None}

        return await self.retrying(read, f"heartbeats {role}")

    def heartbeat_key(self, role: str, worker_id: str) -> str:
        return self.key(f"heartbeat:{role}:{worker_id}")

    async def beat(self, role: str, worker_id: str, info: dict, ttl_ms: int) -> None:
        """One heartbeat: ``info`` (JSON) under the worker's key, expiring after ``ttl_ms``.
        Not retried: a missed beat only ages the key, and the caller beats again."""
        await self.redis.set(self.heartbeat_key(role, worker_id), json.dumps(info), px=ttl_ms)

    async def clear_beat(self, role: str, worker_id: str) -> None:
        """Drop the worker's heartbeat at a clean stop (else it lingers until it expires)."""
        await self.redis.delete(self.heartbeat_key(role, worker_id))

    async def live_workers(self, role: str) -> list[str]:
        """Worker ids of ``role`` whose heartbeat key has not expired."""
        return sorted(await self.heartbeats(role))

    async def ping(self, timeout_s: float) -> None:
        """Raise unless Redis answers within ``timeout_s`` (no retries: a health check)."""
        await asyncio.wait_for(self.redis.ping(), timeout=timeout_s)

    async def check_access(self) -> None:
        """Wait (as ``retrying`` does) until Redis answers; raise :class:`RedisAuthError` at once
        if it refuses our credentials. A role calls this before it serves."""
        await self.retrying(self.redis.ping, "ping")

    async def write_hash(self, name: str, mapping: dict[str, str], ttl_s: int) -> None:
        """Merge ``mapping`` into the hash ``name`` and (re)set its expiry, atomically."""
        key = self.key(name)

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl_s)
            await pipe.execute()

        await self.retrying(write, f"write {name}")

    async def read_hash(self, name: str) -> dict[str, bytes]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key(name)), f"read {name}")
        return {_s(k): v for k, v in raw.items()}

    async def record_restart(self, child: str) -> None:
        """Count one restart of a supervised child (`catq up`), for `catq status`."""
        await self.retrying(lambda: self.redis.hincrby(self.key("restarts"), child, 1), "record restart")

    async def restart_counts(self) -> dict[str, int]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key("restarts")), "restart counts")
        return {_s(k): int(v) for k, v in raw.items()}

    async def set_learner_step(self, fields: dict[str, Any]) -> None:
        """The learner's newest per-step metrics (`catq top`), each field JSON; replaces the last."""
        key, mapping = self.key("learner:last_step"), {k: json.dumps(v) for k, v in fields.items()}

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            await pipe.execute()

        await self.retrying(write, "set learner step")

    async def learner_step(self) -> dict[str, Any]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key("learner:last_step")), "learner step")
        return {_s(k): json.loads(v) for k, v in raw.items()}

    async def get_policy_version(self) -> int:
        value = await self.retrying(lambda: self.redis.get(self.key("policy_version")), "get policy version")
        return int(value) if value is not None else 0

    async def set_policy_version(self, version: int) -> None:
        await self.retrying(lambda: self.redis.set(self.key("policy_version"), int(version)),
                            "set policy version")

    # -- policy engine replicas (catq/engines/replicas.py): url -> JSON entry, listed by the syncer --

    def replicas_key(self, pool: str) -> str:
        return self.key(f"replicas:{pool}")

    async def list_replica(self, pool: str, url: str, entry: dict) -> None:
        await self.retrying(lambda: self.redis.hset(self.replicas_key(pool), url, json.dumps(entry)),
                            f"list replica {url}")

    async def unlist_replica(self, pool: str, url: str) -> None:
        await self.retrying(lambda: self.redis.hdel(self.replicas_key(pool), url), f"unlist replica {url}")

    async def replicas(self, pool: str) -> dict[str, dict]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.replicas_key(pool)), f"read replicas {pool}")
        return {_s(url): json.loads(value) for url, value in raw.items()}

    # -- key layout migration --

    async def migrate_legacy_keys(self) -> list[str]:
        """Rename this run's keys from the layout before hash tags (``catq:<run>:…``) to
        ``catq:{<run>}:…``, streams with their consumer groups and pending entries; a key that
        already exists under its new name is left where it is. For a single Redis (the old keys
        of a run sit in many cluster slots), with the run stopped. Returns the renamed names."""
        prefix = legacy_run_key(self.run, "")
        renamed = []
        async for raw in self.redis.scan_iter(match=prefix + "*", count=1000):
            name = _s(raw)[len(prefix):]
            if await self.retrying(lambda n=name: self.redis.renamenx(prefix + n, self.key(n)), "migrate key"):
                renamed.append(name)
        return sorted(renamed)

    # -- learner lease --
    # One holder of a named lease at a time (SET NX PX), and a fencing token (INCR) per
    # acquisition: a holder whose token is no longer the newest may not publish, even if it
    # has not noticed yet that its lease expired and was taken.

    def lease_keys(self, name: str) -> list[str]:
        """The lease key (holder, expiring) and its fencing counter (never expires)."""
        return [self.key(f"lease:{name}"), self.key(f"fence:{name}")]

    async def acquire_lease(self, name: str, holder: str, ttl_ms: int) -> int:
        """Take the lease if nobody holds it: returns the new fencing token, or 0 when held."""
        token = await self.retrying(
            lambda: self._lease_acquire(keys=self.lease_keys(name), args=[holder, ttl_ms]),
            f"acquire lease {name}")
        return int(token)

    async def renew_lease(self, name: str, token: int, holder: str, ttl_ms: int) -> bool:
        """Extend the lease while ``token`` is still the newest (also after a lapse nobody used);
        False once another holder has taken it."""
        renewed = await self.retrying(
            lambda: self._lease_renew(keys=self.lease_keys(name), args=[token, holder, ttl_ms]),
            f"renew lease {name}")
        return bool(renewed)

    async def release_lease(self, name: str, token: int) -> bool:
        """Drop the lease at a clean stop if ``token`` still holds it, so a successor need not
        wait for it to expire."""
        released = await self.retrying(
            lambda: self._lease_release(keys=self.lease_keys(name), args=[token]), f"release lease {name}")
        return bool(released)

    async def lease_holder(self, name: str) -> str | None:
        value = await self.retrying(lambda: self.redis.get(self.lease_keys(name)[0]), f"lease holder {name}")
        return _s(value) if value is not None else None

    async def holds_lease(self, name: str, token: int) -> bool:
        """Whether ``token`` is still the lease's newest fencing token."""
        current = await self.retrying(lambda: self.redis.get(self.lease_keys(name)[1]), f"check lease {name}")
        return current is not None and int(current) == int(token)

    async def publish_policy_version(self, lease: str, token: int, version: int,
                                     message: Message | None = None) -> str | None:
        """Fenced, in one atomic step: XADD ``message`` (a WeightsPublished; None: none) on
        ``weights`` and set the run's policy version, only while ``token`` is the newest of
        ``lease``; else raise :class:`LeaseLost` with nothing written. Returns the entry id."""
        keys = [self.lease_keys(lease)[1], self.key(WEIGHTS.name), self.key("policy_version")]
        args = [token, int(version), encode(message) if message is not None else b""]
        entry_id = await self.retrying(lambda: self._fenced_publish(keys=keys, args=args),
                                       "publish policy version")
        if entry_id is None:
            raise LeaseLost(f"lease {lease!r}: fencing token {token} is no longer current "
                            f"(another holder took the lease); version {version} not published")
        if message is not None:
            await self._maybe_trim(WEIGHTS.name)
        return _s(entry_id) or None

    # Trained (prompt id, policy version) pairs: the learner trains each pair once, across
    # restarts and duplicate stream entries.

    def trained_key(self, prompt_id: str, policy_version: int) -> str:
        return self.key(f"trained:{prompt_id}:{policy_version}")

    async def record_trained(self, pairs: list[tuple[str, int]], ttl_s: int) -> None:
        """Remember each (prompt id, policy version) pair as trained for ``ttl_s`` seconds."""
        if not pairs:
            return

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for prompt_id, version in pairs:
                pipe.set(self.trained_key(prompt_id, version), 1, ex=ttl_s)
            await pipe.execute()

        await self.retrying(write, "record trained")

    async def trained_pairs(self, pairs: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Those of ``pairs`` recorded as trained."""
        if not pairs:
            return set()

        async def read() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for prompt_id, version in pairs:
                pipe.exists(self.trained_key(prompt_id, version))
            return await pipe.execute()

        found = await self.retrying(read, "read trained")
        return {pair for pair, exists in zip(pairs, found) if exists}


def _client(url: str, *, cluster: bool) -> aioredis.Redis:
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
    client = aioredis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
    try:
        await client.ping()
        return "ok"
    except (OSError, aioredis.RedisError) as exc:
        return "refused" if is_auth_error(exc) else "down"
    finally:
        await client.aclose()


def _flat(fields: dict) -> list:
    return [part for pair in fields.items() for part in pair]


def _prompt_of(payload: bytes) -> str | None:
    try:
        return prompt_id_of(decode(payload))
    except MessageDecodeError:
        return None


def _json_or_empty(value: bytes | str) -> dict:
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
