"""A prompt request, whoever makes it (ingest's HTTP API, `catq submit`, `catq eval`'s loaders,
the demo): its validation and its idempotent enqueue.

- :func:`parse_prompts` (with :func:`decode_body` for raw HTTP bodies) checks a request whole and
  turns it into :class:`~catq.messages.Prompt` s, or raises :class:`PromptRequestError` naming
  the problem and the HTTP status to answer with;
- :func:`enqueue` records each prompt as "queued" and publishes it, all or none, in one atomic
  Bus script; a request key (:func:`idempotency_record`) seen before replays the first answer,
  and :func:`fingerprint_of` tells a different request under the same key (422).

Pure validation plus one Bus call; the HTTP side (limits, auth, admission control) is
:mod:`catq.ingest`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from catq.bus import Bus, KeyedEntry, PublishedOnce
from catq.config import IngestConfig
from catq.messages import TASKS, ChatMessage, Prompt, new_prompt_id
from catq.results import ResultStore, Status
from catq.topology import PROMPTS

ROLES = ("system", "user", "assistant")
PROMPT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
"""Visible ASCII, as HTTP header values can carry it unambiguously."""


class PromptRequestError(ValueError):
    """A request that cannot be enqueued; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


# -- validation -----------------------------------------------------------------------------------

def decode_body(raw: bytes, limits: IngestConfig) -> Any:
    """The JSON value of a request body, or PromptRequestError: not UTF-8, not JSON, or nested
    deeper than ``limits.max_nesting``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptRequestError(f"body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    if _bracket_depth(text) > limits.max_nesting:  # before parsing: how deep the parser may
        raise PromptRequestError(_too_deep(limits))  # recurse depends on the process's state
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PromptRequestError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise PromptRequestError(_too_deep(limits)) from None
    if _nested_deeper_than(body, limits.max_nesting):
        raise PromptRequestError(_too_deep(limits))
    return body


def _too_deep(limits: IngestConfig) -> str:
    return f"JSON nested too deeply; the limit is {limits.max_nesting} levels"


def _bracket_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text``, brackets inside strings not counted (for
    valid JSON, its nesting depth). Regexes, not a Python loop per character: bodies are large."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def _nested_deeper_than(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def parse_prompts(body: Any, limits: IngestConfig, *, default_task: str | None = None,
                  check_batch: bool = True) -> list[Prompt]:
    """Turn a decoded JSON request into Prompts, or raise PromptRequestError naming the problem.

    ``body`` is one prompt object, ``{"prompts": [...]}``, or a list of prompt objects; a prompt
    object is ``{"text": str}`` or ``{"messages": [{"role", "content"}, ...]}`` plus
    ``"task": "math" | "open"`` (``default_task`` when absent, and required when that is None)
    and optionally the client's own ``"prompt_id"`` (unique within the request).
    """
    if isinstance(body, dict) and "prompts" in body:
        extra = set(body) - {"prompts"}
        if extra:
            raise PromptRequestError(f"unknown key {sorted(extra)[0]!r} next to 'prompts'")
        items, where = body["prompts"], "prompts"
        if not isinstance(items, list):
            raise PromptRequestError("'prompts' must be a list")
    elif isinstance(body, dict):
        items, where = [body], None
    elif isinstance(body, list):
        items, where = body, "prompts"
    else:
        raise PromptRequestError("body must be a JSON object or a list of objects")
    if not items:
        raise PromptRequestError("no prompts given")
    if check_batch and len(items) > limits.max_batch:
        raise PromptRequestError(f"{len(items)} prompts in one request; the limit is {limits.max_batch}", 413)
    prompts = [_parse_one(item, f"{where}[{i}]" if where else "prompt", limits, default_task)
               for i, item in enumerate(items)]
    _check_unique_ids(prompts)
    return prompts


def _parse_one(item: Any, where: str, limits: IngestConfig, default_task: str | None) -> Prompt:
    if not isinstance(item, dict):
        raise PromptRequestError(f"{where}: must be an object, got {_json_type(item)}")
    unknown = set(item) - {"text", "messages", "task", "prompt_id"}
    if unknown:
        raise PromptRequestError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    task = item.get("task", default_task)
    if task is None:
        raise PromptRequestError(f"{where}: missing 'task' (one of {', '.join(TASKS)})")
    if task not in TASKS:
        raise PromptRequestError(f"{where}.task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if ("text" in item) == ("messages" in item):
        raise PromptRequestError(f"{where}: give exactly one of 'text' or 'messages'")
    if "text" in item:
        messages = [ChatMessage("user", _nonempty_text(item["text"], f"{where}.text"))]
    else:
        messages = _parse_messages(item["messages"], f"{where}.messages")
    size = sum(len(m.content) for m in messages)
    if size > limits.max_text_chars:
        raise PromptRequestError(f"{where}: text is {size} characters; the limit is {limits.max_text_chars}", 413)
    prompt_id = _prompt_id(item["prompt_id"], f"{where}.prompt_id") if "prompt_id" in item else new_prompt_id()
    return Prompt(prompt_id=prompt_id, task=task, messages=messages)


def _parse_messages(value: Any, where: str) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise PromptRequestError(f"{where}: must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise PromptRequestError(f"{where}[{i}]: must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PromptRequestError(f"{where}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        messages.append(ChatMessage(m["role"], _nonempty_text(m["content"], f"{where}[{i}].content")))
    if not any(m.role == "user" for m in messages):
        raise PromptRequestError(f"{where}: needs at least one 'user' message")
    return messages


def _nonempty_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PromptRequestError(f"{where}: must be a string, got {_json_type(value)}")
    if not value.strip():
        raise PromptRequestError(f"{where}: is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to text no stream can carry
        raise PromptRequestError(f"{where}: lone surrogate U+{ord(value[exc.start]):04X} at character "
                                 f"{exc.start}; send valid Unicode") from None
    return value


def _prompt_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not PROMPT_ID.fullmatch(value):
        raise PromptRequestError(f"{where}: must be 1-128 letters, digits or . _ : - "
                                 f"(starting with a letter or digit), got {_json_type(value)} {value!r}")
    return value


def _check_unique_ids(prompts: list[Prompt]) -> None:
    first: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        if prompt.prompt_id in first:
            raise PromptRequestError(f"prompts[{i}].prompt_id: {prompt.prompt_id!r} repeats "
                                     f"prompts[{first[prompt.prompt_id]}]")
        first[prompt.prompt_id] = i


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- enqueueing -----------------------------------------------------------------------------------

@dataclass
class Enqueued:
    """What one enqueue did, per prompt: its id, its status, whether this request added it."""

    ids: list[str]
    statuses: list[str]
    new: list[bool]
    replayed: bool = False
    """An earlier request with the same Idempotency-Key did it; this one wrote nothing."""

    @property
    def http_status(self) -> int:
        return 202 if any(self.new) else 200

    def body(self) -> dict[str, Any]:
        return {"ids": self.ids,
                "prompts": [{"prompt_id": i, "status": s, "new": n}
                            for i, s, n in zip(self.ids, self.statuses, self.new)]}


async def enqueue(bus: Bus, results: ResultStore, prompts: list[Prompt], *,
                  request_key: str | None = None, fingerprint: str = "") -> Enqueued:
    """Record each prompt as "queued" and publish it, all prompts or none, in one atomic step.
    A prompt whose id already has a result is left alone (its status is reported). A
    ``request_key`` (see :func:`idempotency_record`) seen before replays its first outcome; seen
    with another ``fingerprint`` (a different request), it is refused with 422."""
    request = json.dumps({"fingerprint": fingerprint, "ids": [p.prompt_id for p in prompts]})
    done = await bus.publish_once(PROMPTS.name, _keyed_entries(prompts), results.ttl_s,
                                  request_key=request_key, request_value=request)
    return _enqueued(done, done.request_value, fingerprint)


def _keyed_entries(prompts: list[Prompt]) -> list[KeyedEntry]:
    return [KeyedEntry(p, ResultStore.hash_name(p.prompt_id),
                       ResultStore.encode_fields(status=Status.QUEUED, task=p.task, question=p.question))
            for p in prompts]


def _enqueued(done: PublishedOnce, request_value: str, fingerprint: str) -> Enqueued:
    first = json.loads(request_value)
    if first["fingerprint"] != fingerprint:
        raise PromptRequestError("Idempotency-Key was already used for a different request", 422)
    statuses = [Status.QUEUED.value if raw is None else _status_of(raw) for raw in done.existing]
    return Enqueued(first["ids"], statuses, [raw is None for raw in done.existing], done.replayed)


async def answer_without_writing(bus: Bus, prompts: list[Prompt], *, request_key: str | None = None,
                                 fingerprint: str = "") -> Enqueued | None:
    """What :func:`enqueue` would answer for a request that writes nothing (a replayed
    ``request_key``, or prompt ids that all exist already), or None if it would enqueue."""
    done = await bus.published_before(_keyed_entries(prompts), request_key=request_key)
    if done is None:
        return None
    request = json.dumps({"fingerprint": fingerprint, "ids": [p.prompt_id for p in prompts]})
    return _enqueued(done, done.request_value or request, fingerprint)


def _status_of(raw: str) -> str:
    try:
        return str(json.loads(raw))
    except ValueError:
        return "unknown"


def idempotency_record(scope: str, key: str) -> str:
    """The Redis name of an Idempotency-Key: hashed (fixed length, any characters) and scoped to
    its client, so two clients' keys never collide."""
    return "idempotency:" + hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()


def fingerprint_of(body: Any) -> str:
    """A request's identity for Idempotency-Key reuse: its JSON, canonically ordered."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
