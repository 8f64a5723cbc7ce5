"""Looking at streams without consuming them: ungrouped reads (``catq tail``, the syncer), a
prompt's trace (``catq trace``), stream and group stats (``catq status``, ``top``, ``health``),
dead letters (``catq dead``: list, replay, drop) and the key layout migration.

For debugging, every entry about a prompt is listed, in the step that writes it, in the prompt's
trace list ``trace:<prompt_id>`` (:meth:`Inspection.trace_entries`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from redis.exceptions import ResponseError

from catq.bus.connection import Connection, log
from catq.bus.entries import MESSAGE_FIELD, as_str
from catq.bus.groups import MAX_BLOCK_MS
from catq.bus.keys import legacy_run_key
from catq.bus.scripts import lua
from catq.messages import DeadLetter, Message, MessageDecodeError, decode
from catq.topology import DEAD, STREAM_NAMES


@dataclass
class ConsumerStats:
    name: str
    pending: int
    """Entries delivered to it and not acknowledged."""
    idle_ms: int


@dataclass
class GroupStats:
    """One consumer group of a stream, as `catq status`, ``top`` and ``health`` read it."""

    group: str
    pending: int
    """Entries delivered and not acknowledged."""
    lag: int | None
    """Entries not yet delivered; None when Redis cannot tell (after deletions)."""
    last_delivered_id: str
    consumers: list[ConsumerStats] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        """Work the group has not finished: pending plus not yet delivered."""
        return self.pending + (self.lag or 0)

    @property
    def progress(self) -> str:
        """Changes whenever the group delivers or acknowledges anything."""
        return f"{self.last_delivered_id}/{self.pending}/{self.lag}"


@dataclass
class StreamStats:
    length: int
    groups: list[GroupStats] = field(default_factory=list)

    def group(self, name: str) -> GroupStats | None:
        return next((g for g in self.groups if g.group == name), None)

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able form :meth:`Inspection.stats` returns."""
        return asdict(self)


@dataclass
class RedisMemory:
    """Redis's memory as INFO reports it (the whole server: every run on it)."""

    used_bytes: int
    maxmemory_bytes: int
    """0: no limit (Redis grows until the host runs out)."""
    policy: str
    """What Redis does at the limit: catq wants "noeviction" (refuse writes, lose nothing)."""

    def line(self) -> str:
        used = _size(self.used_bytes)
        if not self.maxmemory_bytes:
            return f"redis memory: {used} used, no maxmemory (unbounded: set maxmemory with noeviction)"
        share = 100 * self.used_bytes / self.maxmemory_bytes
        warning = "" if self.policy == "noeviction" else \
            f"; policy {self.policy} may evict catq's keys silently: set noeviction"
        return f"redis memory: {used} used of {_size(self.maxmemory_bytes)} maxmemory ({share:.0f}%), {self.policy}{warning}"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class Inspection(Connection):
    """Reads that take nothing from a group, and the operator's dead-letter commands."""

    def _init_inspection(self) -> None:
        self._replay = self.redis.register_script(lua("replay"))

    # -- reading without a group --

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
                out.append((as_str(entry_id), decode(fields.get(MESSAGE_FIELD, b""), expected=message_type)))
            except MessageDecodeError as exc:
                log.warning("skipped undecodable entry", stream=stream, entry_id=as_str(entry_id), error=str(exc))
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
        return [(as_str(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    async def read_raw(self, stream: str, after_id: str, count: int = 100,
                       block_ms: int | None = None) -> list[tuple[str, bytes]]:
        """Entries after ``after_id`` as (id, message bytes), oldest first (``catq tail -f``)."""
        key = self.key(stream)
        block = min(block_ms, MAX_BLOCK_MS) if block_ms is not None else None
        reply = await self.retrying(lambda: self.redis.xread({key: after_id}, count=count, block=block),
                                    f"read {stream}")
        return [(as_str(i), f.get(MESSAGE_FIELD, b"")) for i, f in (reply[0][1] if reply else [])]

    async def read_range(self, stream: str, start: str = "-", count: int | None = None) -> list[tuple[str, bytes]]:
        """Entries from ``start`` (an id, or "-"), oldest first (``catq tail --since``)."""
        key = self.key(stream)
        entries = await self.retrying(lambda: self.redis.xrange(key, min=start, count=count), f"range {stream}")
        return [(as_str(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    # -- tracing a prompt --

    async def trace_entries(self, prompt_id: str) -> list[tuple[str, str, bytes | None]]:
        """Every stream entry of one prompt, in the order they were written, as (stream, id,
        message bytes; None once trimmed). :meth:`complete` lists them in the prompt's trace key,
        so this is one LRANGE and one XRANGE per entry, whatever the streams' lengths."""
        listed = await self.retrying(lambda: self.redis.lrange(self.trace_key(prompt_id), 0, -1),
                                     f"trace {prompt_id}")
        seen = list(dict.fromkeys(as_str(item) for item in listed))
        where = [tuple(item.split(" ", 1)) for item in seen]

        async def fetch() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for stream, entry_id in where:
                pipe.xrange(self.key(stream), min=entry_id, max=entry_id, count=1)
            return await pipe.execute()

        replies = await self.retrying(fetch, f"trace {prompt_id}") if where else []
        return [(stream, entry_id, reply[0][1].get(MESSAGE_FIELD, b"") if reply else None)
                for (stream, entry_id), reply in zip(where, replies)]

    # -- stats --

    async def stats(self, streams: tuple[str, ...] = STREAM_NAMES) -> dict[str, Any]:
        """Per stream: length and, per group, pending/lag/consumers (idle ms, pending)."""
        return {stream: info.as_dict() for stream, info in (await self.stream_stats(streams)).items()}

    async def stream_stats(self, streams: tuple[str, ...] = STREAM_NAMES) -> dict[str, StreamStats]:
        """Per stream: its length and its groups (:class:`GroupStats`)."""
        out: dict[str, StreamStats] = {}
        for stream in streams:
            key = self.key(stream)
            length = await self.retrying(lambda: self.redis.xlen(key), f"stats {stream}")
            groups = []
            if length or await self.redis.exists(key):
                for g in await self.retrying(lambda: self.redis.xinfo_groups(key), f"stats {stream}"):
                    name = as_str(g["name"])
                    consumers = await self.retrying(lambda: self.redis.xinfo_consumers(key, name),
                                                    f"stats {stream}")
                    groups.append(GroupStats(
                        group=name, pending=int(g["pending"]), lag=g.get("lag"),
                        last_delivered_id=as_str(g["last-delivered-id"]),
                        consumers=[ConsumerStats(as_str(c["name"]), int(c["pending"]), int(c["idle"]))
                                   for c in consumers],
                    ))
            out[stream] = StreamStats(int(length), groups)
        return out

    async def key_count(self) -> int:
        """How many keys this run has in Redis (``catq:{<run>}:*``, one SCAN pass; on a server
        shared by several runs DBSIZE would count theirs too): for watching that they stay bounded."""
        pattern = self.key("*")

        async def count() -> int:
            return sum([1 async for _ in self.redis.scan_iter(match=pattern, count=1000)])

        return await self.retrying(count, "count keys")

    async def memory(self) -> RedisMemory | None:
        """Redis's used memory against its ``maxmemory``; None where INFO tells neither (a
        cluster answers per node, some managed Redis refuse INFO)."""
        try:
            info = await self.retrying(lambda: self.redis.info("memory"), "info memory")
        except ResponseError:
            return None
        if "used_memory" not in info:
            return None
        return RedisMemory(int(info["used_memory"]), int(info.get("maxmemory", 0)),
                           str(info.get("maxmemory_policy", "?")))

    # -- dead letters --

    async def dead_letters(self, count: int | None = None) -> list[tuple[str, bytes]]:
        """Entries of ``dead`` as (id, message bytes), oldest first (all when ``count`` is None)."""
        key = self.key(DEAD.name)
        entries = await self.retrying(lambda: self.redis.xrange(key, count=count), "read dead")
        return [(as_str(i), f.get(MESSAGE_FIELD, b"")) for i, f in entries]

    async def replay_dead(self, dead_id: str, letter: DeadLetter) -> str | None:
        """Put a dead letter's original message back on its stream (a new entry, ``source``
        ``replay:<dead id>``) and remove the letter, atomically. None if it was already gone."""
        keys = [self.key(DEAD.name), self.key(letter.stream)]
        new_id = await self.retrying(lambda: self._replay(keys=keys, args=[dead_id, letter.payload]),
                                     "replay dead letter")
        return as_str(new_id) if new_id else None

    async def drop_dead(self, dead_ids: list[str]) -> int:
        """Delete dead letters for good; returns how many existed."""
        if not dead_ids:
            return 0
        return int(await self.retrying(lambda: self.redis.xdel(self.key(DEAD.name), *dead_ids), "drop dead"))

    # -- key layout migration --

    async def migrate_legacy_keys(self) -> list[str]:
        """Rename this run's keys from the layout before hash tags (``catq:<run>:…``) to
        ``catq:{<run>}:…``, streams with their consumer groups and pending entries; a key that
        already exists under its new name is left where it is. For a single Redis (the old keys
        of a run sit in many cluster slots), with the run stopped. Returns the renamed names."""
        prefix = legacy_run_key(self.run, "")
        renamed = []
        async for raw in self.redis.scan_iter(match=prefix + "*", count=1000):
            name = as_str(raw)[len(prefix):]
            if await self.retrying(lambda n=name: self.redis.renamenx(prefix + n, self.key(n)), "migrate key"):
                renamed.append(name)
        return sorted(renamed)
