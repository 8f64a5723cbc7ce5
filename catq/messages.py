"""Typed messages that travel on catq's Redis streams.

Every message is a dataclass, encoded as msgpack with a schema version and its type name:
``{"schema": SCHEMA_VERSION, "type": "RolloutGroup", "body": {...}}``. Decoding checks the
version, the type and every field's type, and raises :class:`MessageDecodeError` for anything
else, so a worker can dead-letter garbage instead of crashing on it. No pickle anywhere.

Each stage copies forward what later stages need (a ScoredGroup contains its ReferencedGroup,
which contains its RolloutGroup, which contains its Prompt), so any stream can be tailed and
understood on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import msgpack

SCHEMA_VERSION = 1

Task = Literal["math", "open"]
TASKS: tuple[str, ...] = ("math", "open")


class MessageDecodeError(ValueError):
    """Bytes that are not a valid catq message of the expected type and schema version."""


def new_prompt_id() -> str:
    return uuid.uuid4().hex


@dataclass
class ChatMessage:
    role: str
    """"system", "user" or "assistant"."""
    content: str


@dataclass
class Prompt:
    prompt_id: str
    """Unique id assigned when the prompt entered the system; keys the per-prompt result."""
    task: Task
    """"math" (verifiable: rewards by answer equivalence) or "open" (rewards by rubric)."""
    messages: list[ChatMessage]
    """The conversation to answer; a plain-text prompt is one user message."""
    created_at: float = field(default_factory=time.time)
    """Unix time the prompt was accepted."""

    @property
    def question(self) -> str:
        """The last user turn: what the prompt asks."""
        users = [m.content for m in self.messages if m.role == "user"]
        return users[-1] if users else self.messages[-1].content


@dataclass
class Rollout:
    text: str
    """Decoded completion."""
    token_ids: list[int]
    """Completion token ids exactly as generated (the learner trains on these)."""
    logprobs: list[float]
    """Behaviour log-prob of each generated token under the sampling policy (same length as
    token_ids); see catq.engines for which distribution they come from."""
    finish_reason: str
    """"stop", "length" or "abort", as the engine reported it."""


@dataclass
class RolloutGroup:
    prompt: Prompt
    prompt_token_ids: list[int]
    """The chat-templated prompt as token ids, as sent to the engine."""
    rollouts: list[Rollout]
    """The G samples of the policy for this prompt."""
    policy_version: int
    """Version of the policy weights that produced every rollout (0 = initial weights)."""
    created_at: float = field(default_factory=time.time)


@dataclass
class ReferencedGroup:
    group: RolloutGroup
    reference: str
    """The pseudo-reference s: the anchor's unified response (the CaT answer)."""
    estimator: str
    """Which estimator produced it: "synthesis", "majority", "self_bon" or "min_ppl"."""
    anchor_output: str
    """The anchor's raw output (summary + unified response), kept for debugging."""
    format_fallback: bool = False
    """True when the anchor's output lacked the expected format and the whole output was used."""
    reference_answer: str | None = None
    """math: the final answer extracted from the reference; None when it has none."""
    majority_answer: str | None = None
    """math: the most common (equivalence-grouped) final answer among the rollouts."""
    rubric: list[str] = field(default_factory=list)
    """open: binary criteria the anchor derived from the reference; empty for math."""
    anchor_version: int = 0
    """Version of the anchor weights (the anchor is frozen, so normally 0)."""
    created_at: float = field(default_factory=time.time)


@dataclass
class Verdict:
    rollout_index: int
    criterion_index: int
    satisfied: bool
    raw: str
    """The judge's raw reply."""
    parsed: bool = True
    """False when no strict yes/no could be read after the retries (then counted as "no")."""


@dataclass
class ScoredGroup:
    referenced: ReferencedGroup
    rewards: list[float]
    """One reward per rollout, in rollout order."""
    rollout_answers: list[str | None] = field(default_factory=list)
    """math: each rollout's extracted final answer (None when it has none)."""
    verdicts: list[Verdict] = field(default_factory=list)
    """open: every (rollout, criterion) judgement."""
    created_at: float = field(default_factory=time.time)

    @property
    def group(self) -> RolloutGroup:
        return self.referenced.group


@dataclass
class WeightsPublished:
    policy_version: int
    path: str
    """HF-format checkpoint directory, inside the configured weights directory."""
    step: int
    """Learner optimizer steps taken when these weights were saved."""
    created_at: float = field(default_factory=time.time)


@dataclass
class DeadLetter:
    stream: str
    """Stream name (without namespace) the entry came from."""
    entry_id: str
    """Redis id of the original entry."""
    payload: bytes
    """The original entry's message bytes, untouched."""
    error: str
    """Why it was dead-lettered."""
    attempts: int
    """How many times it had been delivered."""
    worker: str = ""
    """The worker that gave up on it."""
    created_at: float = field(default_factory=time.time)


Message = Union[Prompt, RolloutGroup, ReferencedGroup, ScoredGroup, WeightsPublished, DeadLetter]
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (Prompt, RolloutGroup, ReferencedGroup, ScoredGroup, WeightsPublished, DeadLetter)
}


def encode(message: Message) -> bytes:
    """msgpack bytes of a message, with its schema version and type name."""
    name = type(message).__name__
    if name not in MESSAGE_TYPES:
        raise TypeError(f"not a catq message: {name}")
    envelope = {"schema": SCHEMA_VERSION, "type": name, "body": message}
    return msgpack.packb(envelope, use_bin_type=True, default=_fields_of)


def _fields_of(obj: Any) -> dict[str, Any]:
    """msgpack's hook for dataclasses: a shallow field map (msgpack recurses, and packs lists of
    numbers in C; dataclasses.asdict deep-copies every token id and costs ~20x more)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: getattr(obj, name) for name in _field_names(type(obj))}
    raise TypeError(f"cannot encode {type(obj).__name__}")


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _fields_by_name(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(data: bytes, expected: type | None = None) -> Message:
    """Decode bytes made by :func:`encode`; raise MessageDecodeError for anything else."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageDecodeError(f"not msgpack: {exc}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"schema", "type", "body"}:
        raise MessageDecodeError("not a catq message envelope")
    if envelope["schema"] != SCHEMA_VERSION:
        raise MessageDecodeError(f"schema version {envelope['schema']!r}, expected {SCHEMA_VERSION}")
    cls = MESSAGE_TYPES.get(envelope["type"]) if isinstance(envelope["type"], str) else None
    if cls is None:
        raise MessageDecodeError(f"unknown message type {envelope['type']!r}")
    if expected is not None and cls is not expected:
        raise MessageDecodeError(f"expected {expected.__name__}, got {cls.__name__}")
    return _build(cls, envelope["body"], cls.__name__)


def _build(cls: type, body: Any, path: str) -> Any:
    if not isinstance(body, dict):
        raise MessageDecodeError(f"{path}: expected a map, got {type(body).__name__}")
    hints = _type_hints(cls)
    fields = _fields_by_name(cls)
    unknown = set(body) - set(fields)
    if unknown:
        raise MessageDecodeError(f"{path}: unknown fields {sorted(unknown)}")
    values = {}
    for name, f in fields.items():
        if name not in body:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageDecodeError(f"{path}: missing field {name!r}")
            continue
        values[name] = _convert(hints[name], body[name], f"{path}.{name}")
    return cls(**values)


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise MessageDecodeError(f"{path}: {value!r} not one of {typing.get_args(hint)}")
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _convert(option, value, path)
            except MessageDecodeError as exc:
                errors.append(str(exc))
        raise MessageDecodeError(f"{path}: {value!r} matches no type of {hint}")
    if origin is list:
        if not isinstance(value, list):
            raise MessageDecodeError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        if item in (int, float, str, bytes):
            # Fast path for token ids and log-probs: check element types at C speed.
            kinds = set(map(type, value))
            if kinds <= {item}:
                return value
            if item is float and kinds <= {float, int}:
                return [float(v) for v in value]
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise MessageDecodeError(f"{path}: expected a map, got {type(value).__name__}")
        return value
    return _check_scalar(hint, value, path)


def _check_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint is type(None):
        if value is not None:
            raise MessageDecodeError(f"{path}: expected nil")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise MessageDecodeError(f"{path}: expected int, got bool")
    if hint in (str, int, float, bool, bytes) and not isinstance(value, hint):
        raise MessageDecodeError(f"{path}: expected {hint.__name__}, got {type(value).__name__}")
    return value


def describe(message: Message) -> dict[str, Any]:
    """A plain dict of a message for humans (``catq tail``): bytes shown by length."""
    body = dataclasses.asdict(message)
    if isinstance(message, DeadLetter):
        body["payload"] = f"<{len(message.payload)} bytes>"
    return {"type": type(message).__name__, **body}


def prompt_id_of(message: Message) -> str | None:
    """The prompt a message is about, for log lines and results; None for weights/dead letters."""
    if isinstance(message, Prompt):
        return message.prompt_id
    if isinstance(message, RolloutGroup):
        return message.prompt.prompt_id
    if isinstance(message, ReferencedGroup):
        return message.group.prompt.prompt_id
    if isinstance(message, ScoredGroup):
        return message.referenced.group.prompt.prompt_id
    return None
