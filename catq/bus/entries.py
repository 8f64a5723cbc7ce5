"""What a stream entry is: its id (:class:`EntryId`, the one place entry ids are parsed), its
fields, and the shapes the Bus hands out and takes in (:class:`Delivery`, :class:`Output`,
:class:`KeyedEntry`, :class:`PublishedOnce`).

Each entry has one field ``message`` (msgpack bytes, see catq.messages) and, for outputs, a
field ``source`` with the id of the input entry that produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

from catq.messages import DeadLetter, Message, MessageDecodeError, decode, prompt_id_of

MESSAGE_FIELD = b"message"
SOURCE_FIELD = b"source"


@dataclass(frozen=True, order=True)
class EntryId:
    """A Redis stream entry id ``<ms>-<seq>``: the time Redis wrote the entry and its order
    among entries of that millisecond. Ordered as Redis orders entries."""

    ms: int
    seq: int = 0

    @classmethod
    def parse(cls, text: str | bytes) -> EntryId:
        """``"1712-3"`` (or a bare ``"1712"``, sequence 0); ValueError for anything else."""
        parts = (text.decode() if isinstance(text, bytes) else text).split("-")
        if len(parts) > 2:
            raise ValueError(f"not a stream entry id: {text!r}")
        return cls(int(parts[0]), int(parts[1]) if len(parts) == 2 and parts[1] else 0)

    @classmethod
    def at(cls, unix_time: float) -> EntryId:
        """The first id Redis could give an entry written at ``unix_time``."""
        return cls(int(unix_time * 1000), 0)

    @property
    def time(self) -> float:
        """The unix time Redis wrote the entry."""
        return self.ms / 1000

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


def prompt_of(payload: bytes) -> str | None:
    """The prompt an entry's message bytes are about (a dead letter: its original's); None if
    none or undecodable."""
    try:
        message = decode(payload)
        if isinstance(message, DeadLetter):
            message = decode(message.payload)
    except MessageDecodeError:
        return None
    return prompt_id_of(message)


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


def as_str(value: bytes | str) -> str:
    """A Redis reply (bytes) as str."""
    return value.decode() if isinstance(value, bytes) else value
