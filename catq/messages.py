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

import array
import base64
import dataclasses
import functools
import sys
import time
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import msgpack

SCHEMA_VERSION = 1

Task = Literal["math", "open"]
TASKS: tuple[str, ...] = ("math", "open")


class MessageDecodeError(ValueError):
    """Bytes that are not a valid catq message of the expected type and schema version."""


class _Packed(array.array):
    """A flat array of numbers that travels as one packed little-endian msgpack ext (4 bytes a
    number), not as a msgpack list: decoding is a memcpy instead of building a Python object per
    number (a group carries ~16,000 of them). Indexes, iterates and slices like a list, compares
    equal to a list of the same numbers, and ``torch.tensor``/``torch.frombuffer`` take it."""

    typecode_: str = ""
    ext_code: int = 0

    def __new__(cls, values=()):
        return super().__new__(cls, cls.typecode_, values)

    def __eq__(self, other):
        if isinstance(other, (list, tuple)):
            try:
                other = type(self)(other)
            except (TypeError, OverflowError):
                return False
        return super().__eq__(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.tolist()!r})"

    def __reduce_ex__(self, protocol):  # pickle and deepcopy keep the type (array's own does not)
        return type(self).unpacked, (self.packed(),)

    def __deepcopy__(self, memo):
        return type(self)(self)

    def packed(self) -> bytes:
        if sys.byteorder == "little":
            return self.tobytes()
        swapped = type(self)(self)
        swapped.byteswap()
        return swapped.tobytes()

    @classmethod
    def unpacked(cls, data: bytes):
        values = cls()
        values.frombytes(data)
        if sys.byteorder != "little":
            values.byteswap()
        return values


class Int32s(_Packed):
    """Token ids."""

    typecode_, ext_code = "i", 1


class Float32s(_Packed):
    """Log-probs (the engines compute them in float32)."""

    typecode_, ext_code = "f", 2


PACKED_TYPES: dict[int, type[_Packed]] = {cls.ext_code: cls for cls in (Int32s, Float32s)}


def _as(cls: type[_Packed], values):
    """``values`` as a ``cls`` (a list from code that builds messages, or already packed)."""
    return values if type(values) is cls else cls(values)


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
    token_ids: Int32s
    """Completion token ids exactly as generated (the learner trains on these)."""
    logprobs: Float32s
    """Behaviour log-prob of each generated token under the sampling policy (same length as
    token_ids); see catq.engines for which distribution they come from."""
    finish_reason: str
    """"stop", "length" or "abort", as the engine reported it."""
    anchor_logprobs: Float32s | None = None
    """Log-prob of each generated token under the frozen anchor π0, for the learner's KL term;
    the anchor role asks the anchor engine for them (a prefill, no new tokens) when
    ``learner.anchor_logprobs = "engine"``. None until then, or when the learner computes them."""

    def __post_init__(self) -> None:
        self.token_ids = _as(Int32s, self.token_ids)
        self.logprobs = _as(Float32s, self.logprobs)
        if self.anchor_logprobs is not None:
            self.anchor_logprobs = _as(Float32s, self.anchor_logprobs)


@dataclass
class RolloutGroup:
    prompt: Prompt
    prompt_token_ids: Int32s
    """The chat-templated prompt as token ids, as sent to the engine."""
    rollouts: list[Rollout]
    """The G samples of the policy for this prompt."""
    policy_version: int
    """Version of the policy weights that produced every rollout (0 = initial weights)."""
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.prompt_token_ids = _as(Int32s, self.prompt_token_ids)


@dataclass
class ReferencedGroup:
    group: RolloutGroup
    reference: str
    """The pseudo-reference s: the anchor's unified response (the CaT answer)."""
    estimator: str
    """Which estimator produced it: a name in catq.teacher.registry.ESTIMATORS."""
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


def _fields_of(obj: Any) -> Any:
    """msgpack's hook for dataclasses (a shallow field map: msgpack recurses;
    dataclasses.asdict deep-copies every token id and costs ~20x more) and packed arrays."""
    if isinstance(obj, _Packed):
        return msgpack.ExtType(obj.ext_code, obj.packed())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: getattr(obj, name) for name in _field_names(type(obj))}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_ext(code: int, data: bytes) -> Any:
    cls = PACKED_TYPES.get(code)
    if cls is None or len(data) % cls().itemsize:
        raise MessageDecodeError(f"unknown or malformed packed array (ext {code}, {len(data)} bytes)")
    return cls.unpacked(data)


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
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_unpack_ext)
    except MessageDecodeError:
        raise
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
    try:
        return _build(cls, envelope["body"])
    except MessageDecodeError as exc:
        raise _under(cls.__name__, exc) from None


def _build(cls: type, body: Any) -> Any:
    if type(body) is not dict:
        raise MessageDecodeError(f"expected a map, got {type(body).__name__}")
    plan, required = _plan(cls)
    values = {}
    for name, value in body.items():
        convert = plan.get(name)
        if convert is None:
            raise MessageDecodeError(f"unknown fields {sorted(body.keys() - plan.keys())}")
        try:
            values[name] = convert(value)
        except MessageDecodeError as exc:
            raise _under(f".{name}", exc) from None
    if not required <= values.keys():
        raise MessageDecodeError(f"missing field {min(required - values.keys())!r}")
    return cls(**values)


def _under(segment: str, exc: MessageDecodeError) -> MessageDecodeError:
    """The error one level up: "token_ids: expected ..." -> ".rollouts[0].token_ids: ..."."""
    message = str(exc)
    return MessageDecodeError(segment + (message if message[:1] in ".[" else f": {message}"))


@functools.cache
def _plan(cls: type) -> tuple[dict[str, Callable[[Any], Any]], frozenset[str]]:
    """A message dataclass's field converters and its required fields (built once per class,
    so decoding does no type introspection)."""
    hints = _type_hints(cls)
    fields = dataclasses.fields(cls)
    required = frozenset(f.name for f in fields
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    return {f.name: _converter(hints[f.name]) for f in fields}, required


@functools.cache
def _converter(hint: Any) -> Callable[[Any], Any]:
    """A function that checks a decoded value against ``hint`` and returns it (converted where
    the wire form differs: packed arrays, ints for floats), raising MessageDecodeError."""
    if isinstance(hint, type) and issubclass(hint, _Packed):
        return functools.partial(_packed, hint)
    if dataclasses.is_dataclass(hint):
        return functools.partial(_build, hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        return functools.partial(_literal, typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return functools.partial(_union, hint, tuple(_converter(o) for o in typing.get_args(hint)))
    if origin is list:
        (item,) = typing.get_args(hint)
        return functools.partial(_list, item, _converter(item))
    if origin is dict:
        return _map
    if hint in (str, bytes):
        return functools.partial(_exactly, hint)
    return functools.partial(_check_scalar, hint)


def _exactly(kind: type, value: Any) -> Any:
    if type(value) is kind:
        return value
    raise MessageDecodeError(f"expected {kind.__name__}, got {type(value).__name__}")


def _literal(allowed: tuple, value: Any) -> Any:
    if value not in allowed:
        raise MessageDecodeError(f"{value!r} not one of {allowed}")
    return value


def _union(hint: Any, options: tuple, value: Any) -> Any:
    for convert in options:
        try:
            return convert(value)
        except MessageDecodeError:
            continue
    raise MessageDecodeError(f"{value!r} matches no type of {hint}")


def _list(item: Any, convert: Callable[[Any], Any], value: Any) -> list:
    if not isinstance(value, list):
        raise MessageDecodeError(f"expected a list, got {type(value).__name__}")
    if item in (int, float, str, bytes):
        kinds = set(map(type, value))  # element types checked at C speed
        if kinds <= {item}:
            return value
        if item is float and kinds <= {float, int}:
            return [float(v) for v in value]
    out = []
    for i, v in enumerate(value):
        try:
            out.append(convert(v))
        except MessageDecodeError as exc:
            raise _under(f"[{i}]", exc) from None
    return out


def _map(value: Any) -> dict:
    if not isinstance(value, dict):
        raise MessageDecodeError(f"expected a map, got {type(value).__name__}")
    return value


def _packed(cls: type[_Packed], value: Any) -> _Packed:
    if type(value) is cls:
        return value
    if isinstance(value, list):  # a plain list (an older producer): accepted when it fits
        try:
            return cls(value)
        except (TypeError, OverflowError) as exc:
            raise MessageDecodeError(f"not {cls.__name__}: {exc}") from None
    raise MessageDecodeError(f"expected {cls.__name__}, got {type(value).__name__}")


def _check_scalar(hint: Any, value: Any) -> Any:
    if hint is type(None):
        if value is not None:
            raise MessageDecodeError("expected nil")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise MessageDecodeError("expected int, got bool")
    if hint in (str, int, float, bool, bytes) and not isinstance(value, hint):
        raise MessageDecodeError(f"expected {hint.__name__}, got {type(value).__name__}")
    return value


def describe(message: Message) -> dict[str, Any]:
    """A plain dict of a message for humans (``catq tail``): bytes shown by length."""
    body = dataclasses.asdict(message, dict_factory=_plain_dict)
    if isinstance(message, DeadLetter):
        body["payload"] = f"<{len(message.payload)} bytes>"
    return {"type": type(message).__name__, **body}


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {name: value.tolist() if isinstance(value, array.array) else value for name, value in items}


def to_json(message: Message) -> dict[str, Any]:
    """Every field of a message as JSON-able data (``catq tail --json``); :func:`from_json` reads
    it back. A dead letter's payload is base64, and also shown ``decoded`` when it decodes."""
    body = describe(message)
    if isinstance(message, DeadLetter):
        body["payload"] = base64.b64encode(message.payload).decode()
        try:
            body["decoded"] = to_json(decode(message.payload))
        except MessageDecodeError as exc:
            body["decoded"] = {"type": "<undecodable>", "error": str(exc)}
    return body


def from_json(data: dict[str, Any]) -> Message:
    """The message :func:`to_json` wrote (extra keys such as a tail line's ``id`` ignored);
    fields are checked as :func:`decode` checks them."""
    cls = MESSAGE_TYPES.get(data.get("type", ""))
    if cls is None:
        raise MessageDecodeError(f"unknown message type {data.get('type')!r}")
    body = {k: v for k, v in data.items() if k in _fields_by_name(cls)}
    if cls is DeadLetter and isinstance(body.get("payload"), str):
        body["payload"] = base64.b64decode(body["payload"])
    try:
        return _build(cls, body)
    except MessageDecodeError as exc:
        raise _under(cls.__name__, exc) from None


def work_id(message: Message, entry_id: str = "") -> str:
    """What makes two entries the same work for a stage: the prompt, and for groups the policy
    version that sampled them ("prompt:p1", "group:p1@v3"); other messages: their entry id."""
    if isinstance(message, Prompt):
        return f"prompt:{message.prompt_id}"
    group = (message if isinstance(message, RolloutGroup) else message.group if isinstance(message, ReferencedGroup)
             else message.referenced.group if isinstance(message, ScoredGroup) else None)
    if group is None:
        return f"entry:{entry_id}"
    return f"group:{group.prompt.prompt_id}@v{group.policy_version}"


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
