"""Consuming a stream through a consumer group: delivery is at least once, processed
effectively once (see :mod:`catq.bus.streams` for the completing side).

- groups are created idempotently from id 0, so nothing written before a group existed is lost;
- entries idle longer than ``claim_idle_ms`` on a consumer (it died) are reclaimed with
  XAUTOCLAIM; a live consumer keeps its slow entries with :meth:`GroupReads.keep_alive`;
- undecodable entries, entries whose handler failed ``max_attempts`` times (counted by the
  worker with :meth:`Streams.record_failure`; transient failures are not counted) and entries
  delivered more than ``max_deliveries`` times without completing go to ``dead``; entries whose
  done marker exists (this entry's, or its work's: a duplicate) are acked, not delivered.
"""

from __future__ import annotations

import time

from redis.exceptions import ResponseError

from catq.bus.connection import log
from catq.bus.entries import MESSAGE_FIELD, Delivery, EntryId, as_str
from catq.bus.scripts import lua
from catq.bus.streams import Streams
from catq.messages import MessageDecodeError, decode, work_id

MAX_BLOCK_MS = 20_000
"""Longest single blocking read; the socket timeout is above it."""

RawEntry = tuple[str, dict, int]
"""(entry id, fields, times delivered) as read, before decoding."""


class GroupReads(Streams):
    """The read side of the stream protocol: group reads, reclaiming, keeping entries alive."""

    def _init_groups(self) -> None:
        self._screen_script = self.redis.register_script(lua("screen"))
        self._groups: set[tuple[str, str]] = set()
        self._reclaim_cursor: dict[tuple[str, str], str] = {}
        self._last_reclaim: dict[tuple[str, str], float] = {}

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
        return await self._read_group(stream, group, consumer, count, message_type, block_ms,
                                      lambda: self._reclaim(stream, group, consumer, count))

    async def take_over(self, stream: str, group: str, consumer: str, *, count: int,
                        message_type: type, idle_ms: int, block_ms: int | None = None) -> list[Delivery]:
        """:meth:`read`, but reclaiming every entry idle over ``idle_ms`` now, whatever
        ``claim_idle_ms`` says and however recently this bus reclaimed: a restarted consumer
        taking back what its predecessor left pending (in one read, so nothing is claimed twice).
        The bus's own reclaim walk is left as it was."""
        return await self._read_group(stream, group, consumer, count, message_type, block_ms,
                                      lambda: self._take_back(stream, group, consumer, count, idle_ms))

    async def _read_group(self, stream, group, consumer, count, message_type, block_ms, reclaim) -> list[Delivery]:
        await self.ensure_group(stream, group)
        try:
            raw = await reclaim()
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
                        block_ms: int | None) -> list[RawEntry]:
        key = self.key(stream)
        reply = await self.retrying(
            lambda: self.redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms),
            f"read {stream}",
        )
        entries = reply[0][1] if reply else []
        return [(as_str(entry_id), fields, 1) for entry_id, fields in entries]

    async def _reclaim(self, stream: str, group: str, consumer: str, count: int) -> list[RawEntry]:
        """XAUTOCLAIM entries idle over claim_idle_ms, at most every claim_idle_ms/4 (≤ 5 s),
        walking the pending list with a remembered cursor."""
        slot = (stream, group)
        interval = min(self.config.claim_idle_ms / 4000, 5.0)
        now = time.monotonic()
        if now - self._last_reclaim.get(slot, 0.0) < interval:
            return []
        self._last_reclaim[slot] = now
        start = self._reclaim_cursor.get(slot, "0-0")
        cursor, entries = await self._autoclaim(stream, group, consumer, count, self.config.claim_idle_ms, start)
        self._reclaim_cursor[slot] = cursor
        if cursor != "0-0" and len(entries) < count:
            self._last_reclaim[slot] = 0.0  # more to walk: look again on the next read
        return await self._with_delivery_counts(stream, group, entries)

    async def _take_back(self, stream: str, group: str, consumer: str, count: int, idle_ms: int) -> list[RawEntry]:
        _, entries = await self._autoclaim(stream, group, consumer, count, idle_ms, "0-0")
        return await self._with_delivery_counts(stream, group, entries)

    async def _autoclaim(self, stream: str, group: str, consumer: str, count: int, idle_ms: int,
                         start: str) -> tuple[str, list]:
        """One XAUTOCLAIM from ``start``: the next cursor and the claimed (id, fields), fields
        None for an entry deleted meanwhile (Redis 6.2)."""
        key = self.key(stream)
        reply = await self.retrying(
            lambda: self.redis.xautoclaim(key, group, consumer, idle_ms, start_id=start, count=count),
            f"reclaim {stream}",
        )
        return as_str(reply[0]), reply[1]

    async def _with_delivery_counts(self, stream: str, group: str, claimed: list) -> list[RawEntry]:
        """The claimed entries that still exist, with the times each was delivered."""
        key = self.key(stream)
        entries = [(as_str(i), f) for i, f in claimed if f is not None]
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
                      raw: list[RawEntry], message_type: type) -> list[Delivery]:
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
            mine = await self.redis.xpending_range(key, group, min=min(entry_ids, key=EntryId.parse),
                                                   max=max(entry_ids, key=EntryId.parse),
                                                   count=len(entry_ids) * 4 + 16, consumername=consumer)
            ids = [as_str(p["message_id"]) for p in mine if as_str(p["message_id"]) in wanted]
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
