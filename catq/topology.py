"""The shape of a run, in one table: which streams exist, what each carries, who writes it and
which role reads it. Handlers, backpressure, the launcher, `catq status`, `catq tail` and the
README's picture all derive from it.

    ingest ──prompts──▶ rollout ──groups──▶ anchor ──references──▶ judge ──scored──▶ learner
                                                                                        │
                                       policy engines ◀── syncer ◀──────weights─────────┘
    any stage ──dead──▶ (operators: `catq tail dead`)

A stream with a ``consumer`` is read through a consumer group named after that role (each entry
goes to one worker of the role); ``weights`` and ``dead`` are read whole by whoever reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from catq.messages import (
    DeadLetter,
    Prompt,
    ReferencedGroup,
    RolloutGroup,
    ScoredGroup,
    WeightsPublished,
)

ROLES: tuple[str, ...] = ("ingest", "rollout", "anchor", "judge", "learner", "syncer")
"""Every process role, in pipeline order (also the order `catq up` stops them: sources first)."""


@dataclass(frozen=True)
class Stream:
    name: str
    message: type
    producer: str
    """The role that writes it ("any": every stage dead-letters)."""
    consumer: str | None
    """The role whose consumer group reads it; None: read whole, without a group."""
    readers: str = ""
    """Who reads a stream that has no consumer group."""


PROMPTS = Stream("prompts", Prompt, "ingest", "rollout")
GROUPS = Stream("groups", RolloutGroup, "rollout", "anchor")
REFERENCES = Stream("references", ReferencedGroup, "anchor", "judge")
SCORED = Stream("scored", ScoredGroup, "judge", "learner")
WEIGHTS = Stream("weights", WeightsPublished, "learner", None, readers="syncer")
DEAD = Stream("dead", DeadLetter, "any", None, readers="operators (`catq tail dead`)")

STREAMS: tuple[Stream, ...] = (PROMPTS, GROUPS, REFERENCES, SCORED, WEIGHTS, DEAD)
"""Every stream of a run, in pipeline order."""
STREAM_NAMES: tuple[str, ...] = tuple(s.name for s in STREAMS)
WORK_STREAMS: tuple[Stream, ...] = tuple(s for s in STREAMS if s.consumer is not None)
"""The pipeline's stages: streams read through a consumer group, each by one role."""
GROUP_STREAMS: frozenset[str] = frozenset(s.name for s in WORK_STREAMS)
"""Streams read through consumer groups: not trimmed until their group exists, so a stage
started late still finds everything written before it."""
CONSUMER_ROLE: dict[str, str] = {s.name: s.consumer for s in WORK_STREAMS}
"""Each work stream and the role (= consumer group) that consumes it."""


def stage_name(s: Stream) -> str:
    """The pipeline stage an entry of ``s`` records: the role that wrote it (``dead``: every
    stage writes it, so the stage is the stream's own name). `catq trace` names stages so."""
    return s.name if s.producer == "any" else s.producer


def stream_of(message: object) -> Stream | None:
    """The stream that carries messages of ``message``'s type (isinstance, in pipeline order)."""
    return next((s for s in STREAMS if isinstance(message, s.message)), None)


def stream(name: str) -> Stream:
    for s in STREAMS:
        if s.name == name:
            return s
    raise KeyError(f"unknown stream {name!r}; streams: {', '.join(STREAM_NAMES)}")


def input_of(role: str) -> Stream:
    """The work stream ``role`` consumes (stream roles only)."""
    for s in WORK_STREAMS:
        if s.consumer == role:
            return s
    raise KeyError(f"role {role!r} consumes no work stream")


def downstream_of(role: str) -> tuple[Stream, ...]:
    """The work streams after the one ``role`` consumes: the stages its output queues behind."""
    index = WORK_STREAMS.index(input_of(role))
    return WORK_STREAMS[index + 1:]


def markdown_table() -> str:
    """The stream table as the README shows it (a test keeps the two equal)."""
    rows = ["| stream | message | written by | read by (consumer group) |", "|---|---|---|---|"]
    for s in STREAMS:
        reader = f"`{s.consumer}`" if s.consumer else f"{s.readers}, whole stream, no group"
        rows.append(f"| `{s.name}` | `{s.message.__name__}` | {s.producer} | {reader} |")
    return "\n".join(rows)
