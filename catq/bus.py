"""The one module that speaks Redis' stream protocol (XADD, XREADGROUP, XACK, XAUTOCLAIM, ...).

Every key of a run lives under ``catq:<run>:``; a stream ``prompts`` is ``catq:<run>:prompts``.
Each entry has one field ``message`` (msgpack bytes, see catq.messages) and, for outputs, a
field ``source`` with the id of the input entry that produced it.

Delivery is at least once, processed effectively once:

- groups are created idempotently from id 0, so nothing written before a group existed is lost;
- :meth:`Bus.complete` writes a consumer's outputs, a *done marker* for its input and the XACK in
  one atomic step (a Lua script: Redis runs it like MULTI/EXEC, and it can also check the
  marker first). A re-delivered input whose marker exists is acked without redoing the work,
  and two consumers racing on one input produce one set of outputs;
- entries idle longer than ``claim_idle_ms`` on a consumer (it died) are reclaimed with
  XAUTOCLAIM; a live consumer keeps its slow entries with :meth:`Bus.keep_alive`;
- undecodable entries, and entries delivered more than ``max_attempts`` times, go to ``dead``;
- trimming never removes an entry some group has not acknowledged (see ``_TRIM``);
- Redis connection errors are retried with capped exponential backoff (see ``retrying``).
  Commands are retried as a whole; a retried XADD whose first reply was lost may duplicate an
  entry (at least once), a lost XREADGROUP reply leaves entries pending, reclaimed later.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from catq.config import BusConfig
from catq.messages import DeadLetter, Message, MessageDecodeError, decode, encode

STREAMS: tuple[str, ...] = ("prompts", "groups", "references", "scored", "weights", "dead")
"""Every stream of a run, in pipeline order (names without namespace)."""
GROUP_STREAMS: frozenset[str] = frozenset({"prompts", "groups", "references", "scored"})
"""Streams read through consumer groups: not trimmed at all until their group exists, so a
stage started late still finds everything written before it."""

MESSAGE_FIELD = b"message"
SOURCE_FIELD = b"source"
MAX_BLOCK_MS = 20_000
"""Longest single blocking read; the socket timeout is above it."""
SOCKET_TIMEOUT_S = 30.0

T = TypeVar("T")
log = structlog.get_logger("catq.bus")


def is_retryable(exc: BaseException) -> bool:
    """Redis went away or did not answer in time (BusyLoadingError is a ConnectionError too)."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError))


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


@dataclass
class Output:
    stream: str
    message: Message


# complete(): KEYS = input stream, done marker, output streams...;
# ARGV = group, entry id, marker ttl (s), payloads... (one per output stream).
_COMPLETE = """
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local ids = {}
for i = 3, #KEYS do
  ids[#ids + 1] = redis.call('XADD', KEYS[i], '*', 'message', ARGV[i + 1], 'source', ARGV[2])
end
redis.call('SET', KEYS[2], table.concat(ids, ' '), 'EX', tonumber(ARGV[3]))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
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
        self.config = config or BusConfig()
        self.reconnect_timeout_s = reconnect_timeout_s
        """How long to keep retrying when Redis is unreachable; None = until it is back."""
        self.trim_interval_s = trim_interval_s
        """A stream written by this bus is trimmed at most this often."""
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=5,
            retry=Retry(NoBackoff(), 0),  # retries are ours (retrying), with backoff and a log line
        )
        self._complete = self.redis.register_script(_COMPLETE)
        self._trim = self.redis.register_script(_TRIM)
        self._groups: set[tuple[str, str]] = set()
        self._reclaim_cursor: dict[tuple[str, str], str] = {}
        self._last_reclaim: dict[tuple[str, str], float] = {}
        self._last_trim: dict[str, float] = {}
        self.on_dead_letter: Callable[[DeadLetter], Awaitable[None]] | None = None
        """Called after an entry is dead-lettered (the runtime marks the prompt's result)."""

    def key(self, name: str) -> str:
        return f"catq:{self.run}:{name}"

    def done_key(self, stream: str, group: str, entry_id: str) -> str:
        return self.key(f"done:{stream}:{group}:{entry_id}")

    async def close(self) -> None:
        await self.redis.aclose()

    async def retrying(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """Run ``op`` until it succeeds, retrying Redis connection errors with capped
        exponential backoff (0.05 s doubling to 2 s, jittered) for ``reconnect_timeout_s``."""
        delay, deadline = 0.05, None
        while True:
            try:
                return await op()
            except Exception as exc:
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
        """XADD one message; returns its entry id."""
        fields: dict[bytes, bytes | str] = {MESSAGE_FIELD: encode(message)}
        if source is not None:
            fields[SOURCE_FIELD] = source
        entry_id = await self.retrying(lambda: self.redis.xadd(self.key(stream), fields), f"publish {stream}")
        await self._maybe_trim(stream)
        return _s(entry_id)

    async def complete(self, delivery: Delivery, group: str, outputs: list[Output]) -> None:
        """Write outputs (each with ``source`` = the input's id), the done marker and the XACK
        atomically. A no-op apart from the ack when the input's marker already exists."""
        keys = [self.key(delivery.stream), self.done_key(delivery.stream, group, delivery.entry_id)]
        keys += [self.key(o.stream) for o in outputs]
        args = [group, delivery.entry_id, self.config.result_ttl_s] + [encode(o.message) for o in outputs]
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
        await self.complete(placeholder, group, [Output("dead", letter)])
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
        if not raw:
            return []

        async def markers() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, _, _ in raw:
                pipe.exists(self.done_key(stream, group, entry_id))
            return await pipe.execute()

        done = await self.retrying(markers, f"read {stream}")
        deliveries, finished = [], []
        for (entry_id, fields, attempts), is_done in zip(raw, done):
            payload = fields.get(MESSAGE_FIELD, b"")
            if is_done:
                finished.append(entry_id)
                continue
            if attempts > self.config.max_attempts:
                await self._dead_letter(stream, group, entry_id, payload, attempts - 1,
                                        f"not completed after {attempts - 1} deliveries "
                                        f"(max_attempts={self.config.max_attempts})", consumer)
                continue
            try:
                message = decode(payload, expected=message_type)
            except MessageDecodeError as exc:
                await self._dead_letter(stream, group, entry_id, payload, attempts,
                                        f"undecodable: {exc}", consumer)
                continue
            deliveries.append(Delivery(stream, entry_id, message, attempts, payload))
        if finished:
            key = self.key(stream)
            await self.retrying(lambda: self.redis.xack(key, group, *finished), f"ack {stream}")
            log.info("skipped already-done entries", stream=stream, group=group, entries=finished)
        return deliveries

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

    # -- upkeep and inspection ---------------------------------------------------------------------

    async def trim(self, stream: str) -> int:
        """Trim a stream towards config.max_stream_len without removing any entry a group has not
        acknowledged (or not yet been delivered); a GROUP_STREAMS stream with no group yet is
        left alone. Returns the number of entries removed."""
        self._last_trim[stream] = time.monotonic()
        removed = await self.retrying(
            lambda: self._trim(keys=[self.key(stream)],
                               args=[self.config.max_stream_len, int(stream in GROUP_STREAMS)]),
            f"trim {stream}",
        )
        return int(removed)

    async def _maybe_trim(self, stream: str) -> None:
        if time.monotonic() - self._last_trim.get(stream, 0.0) >= self.trim_interval_s:
            await self.trim(stream)

    async def stats(self, streams: tuple[str, ...] = STREAMS) -> dict[str, Any]:
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

    async def get_policy_version(self) -> int:
        value = await self.retrying(lambda: self.redis.get(self.key("policy_version")), "get policy version")
        return int(value) if value is not None else 0

    async def set_policy_version(self, version: int) -> None:
        await self.retrying(lambda: self.redis.set(self.key("policy_version"), int(version)),
                            "set policy version")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
