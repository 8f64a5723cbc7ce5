"""Writing to streams, effectively once: publish, publish_once, complete, ack, failures, dead
letters, and trimming.

- :meth:`Streams.complete` writes a consumer's outputs, a *done marker* for its input and the
  XACK in one atomic step (``lua/complete.lua``: Redis runs it like MULTI/EXEC, and it can also
  check the marker first). A re-delivered input whose marker exists is acked without redoing
  the work, and two consumers racing on one input produce one set of outputs. The marker is also
  kept per unit of work (:func:`catq.messages.work_id`: the prompt id, and the policy version of
  a group), so a duplicate entry of the same work (a retried XADD whose first reply was lost) is
  acked where it arrives instead of being processed twice;
- :meth:`Streams.publish_once` (ingest's enqueue) is the exception to at-least-once: entries
  keyed by a record, and optionally a request key, in one script, so a retry finds them there
  and adds nothing;
- trimming never removes an entry some group has not acknowledged (``lua/trim.lua``), and touches
  ``dead`` only past ``[bus] max_dead_letters``, with an error line and a count in `catq status`:
  operators list, replay or drop dead letters with `catq dead`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack

from catq.bus.connection import Connection, log
from catq.bus.entries import (
    MESSAGE_FIELD,
    SOURCE_FIELD,
    Delivery,
    KeyedEntry,
    Output,
    PublishedOnce,
    as_str,
    prompt_of,
)
from catq.bus.scripts import lua
from catq.messages import DeadLetter, Message, encode, prompt_id_of, work_id
from catq.topology import DEAD, GROUP_STREAMS


class Streams(Connection):
    """The write side of the stream protocol."""

    trim_interval_s: float
    """A stream written by this bus is trimmed at most this often."""
    on_dead_letter: Callable[[DeadLetter], Awaitable[None]] | None
    """Called after an entry is dead-lettered (the runtime marks the prompt's result)."""

    def _init_streams(self, trim_interval_s: float) -> None:
        self.trim_interval_s = trim_interval_s
        self._complete = self.redis.register_script(lua("complete"))
        self._publish_once = self.redis.register_script(lua("publish_once"))
        self._trim = self.redis.register_script(lua("trim"))
        self._publish_traced = self.redis.register_script(lua("publish_traced"))
        self._last_trim: dict[str, float] = {}
        self.on_dead_letter = None

    async def publish(self, stream: str, message: Message, *, source: str | None = None) -> str:
        """XADD one message (listing it in its prompt's trace); returns its entry id."""
        fields: dict[bytes, bytes | str] = {MESSAGE_FIELD: encode(message)}
        if source is not None:
            fields[SOURCE_FIELD] = source
        # A dead letter is listed in the trace of its original's prompt.
        prompt_id = prompt_id_of(message) if not isinstance(message, DeadLetter) else prompt_of(fields[MESSAGE_FIELD])

        async def write() -> bytes:
            if prompt_id is None:
                return await self.redis.xadd(self.key(stream), fields)
            return await self._publish_traced(keys=[self.key(stream), self.trace_key(prompt_id)],
                                              args=[stream, self.config.result_ttl_s, *_flat(fields)])

        entry_id = await self.retrying(write, f"publish {stream}")
        await self._maybe_trim(stream)
        return as_str(entry_id)

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

    async def published_before(self, entries: list[KeyedEntry], *, request_key: str | None = None,
                               status_field: str = "status") -> PublishedOnce | None:
        """What :meth:`publish_once` would answer without writing anything, or None when it would
        publish something: the first call's outcome when ``request_key`` was seen, else the
        records' statuses when every entry's record exists. Reads only (ingest answers these
        while its backlog is full)."""
        if request_key is not None:
            seen = await self.retrying(lambda: self.redis.get(self.key(request_key)), "published before")
            if seen is not None:
                value, outcome = msgpack.unpackb(seen, raw=False)
                return PublishedOnce([None if o is False else o for o in outcome], value, True)

        async def statuses() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for entry in entries:
                pipe.exists(self.key(entry.record))
                pipe.hget(self.key(entry.record), status_field)
            return await pipe.execute()

        replies = await self.retrying(statuses, "published before")
        if not all(replies[0::2]):
            return None
        return PublishedOnce([as_str(s) if s is not None else "" for s in replies[1::2]], "", False)

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

    # -- dead letters --

    async def dead_letter(self, delivery: Delivery, group: str, error: str, *, worker: str = "") -> None:
        """Move an entry to ``dead`` with the error text, and ack it."""
        await self._dead_letter(delivery.stream, group, delivery.entry_id, delivery.payload,
                                delivery.attempts, error, worker)

    async def dead_letter_entry(self, stream: str, entry_id: str, message: Message, error: str, *,
                                worker: str = "") -> str:
        """Put an entry read without a group (:meth:`read_all`: nothing to ack) on ``dead``
        with the error text, as delivered once. Returns the dead letter's id."""
        letter = DeadLetter(stream=stream, entry_id=entry_id, payload=encode(message), error=error,
                            attempts=1, worker=worker)
        return await self.publish(DEAD.name, letter)

    async def _dead_letter(self, stream: str, group: str, entry_id: str, payload: bytes,
                           attempts: int, error: str, worker: str) -> None:
        letter = DeadLetter(stream=stream, entry_id=entry_id, payload=payload, error=error,
                            attempts=attempts, worker=worker)
        # Through complete(): atomic, and a second consumer giving up on it adds no second letter.
        placeholder = Delivery(stream, entry_id, letter, attempts, payload)
        await self.complete(placeholder, group, [Output(DEAD.name, letter)], prompt_id=prompt_of(encode(letter)))
        log.warning("dead-lettered", stream=stream, entry_id=entry_id, attempts=attempts, error=error)
        if self.on_dead_letter is not None:
            await self.on_dead_letter(letter)

    # -- trimming --

    async def trim(self, stream: str) -> int:
        """Trim a stream towards config.max_stream_len without removing any entry a group has not
        acknowledged (or not yet been delivered); a GROUP_STREAMS stream with no group yet is
        left alone; ``dead`` only past ``max_dead_letters``, loudly (:meth:`bound_dead_letters`).
        Returns the number of entries removed."""
        self._last_trim[stream] = time.monotonic()
        if stream == DEAD.name:
            return await self.bound_dead_letters()
        removed = await self.retrying(
            lambda: self._trim(keys=[self.key(stream)],
                               args=[self.config.max_stream_len, int(stream in GROUP_STREAMS)]),
            f"trim {stream}",
        )
        return int(removed)

    async def bound_dead_letters(self) -> int:
        """Keep ``dead`` at most ``config.max_dead_letters`` long: a dead letter holds the only
        copy of its work, so dropping the oldest is an error-level log line and a count that
        `catq status` shows (:meth:`dead_letters_dropped`), never silent. Returns how many went."""
        key, limit = self.key(DEAD.name), self.config.max_dead_letters

        async def drop() -> int:
            if await self.redis.xlen(key) <= limit:
                return 0
            removed = int(await self.redis.xtrim(key, maxlen=limit, approximate=False))
            if removed:
                await self.redis.incrby(self.key(DEAD_DROPPED), removed)
            return removed

        removed = await self.retrying(drop, "bound dead letters")
        if removed:
            log.error("dead letters over their limit: dropped the oldest", dropped=removed, limit=limit,
                      hint="raise [bus] max_dead_letters, or replay/drop them with `catq dead`")
        return removed

    async def dead_letters_dropped(self) -> int:
        """Dead letters dropped so far because ``dead`` was over ``max_dead_letters``."""
        value = await self.retrying(lambda: self.redis.get(self.key(DEAD_DROPPED)), "read dead dropped")
        return int(value or 0)

    async def _maybe_trim(self, stream: str) -> None:
        if time.monotonic() - self._last_trim.get(stream, 0.0) >= self.trim_interval_s:
            await self.trim(stream)


DEAD_DROPPED = "dead_dropped"
"""One counter per run (bounded: a single integer)."""


def _flat(fields: dict) -> list:
    return [part for pair in fields.items() for part in pair]
