"""Data files as users have them: catq's own JSONL, MATH-500, HealthBench and CHAMP, read into
prompts the pipeline may see plus what only a scorer may see.

    catq eval --data math500.jsonl --format math500        (auto: told apart by the first line's keys)
    catq submit --file healthbench.jsonl --format healthbench   (trains without the rubrics)

- ``catq``: ``{"text" | "messages", "task"?, "prompt_id"?, "answer"?}``; any other field is kept
  as metadata (never refused), and ``id`` becomes the prompt's label.
- ``math500`` (the MATH-500 JSONL): ``problem`` is the prompt, ``answer`` the known answer,
  ``unique_id`` the label; results are broken down by ``subject`` and ``level``.
- ``healthbench`` (OpenAI's HealthBench JSONL): ``prompt`` is the conversation (a list of
  ``{role, content}``), ``rubrics`` the physicians' criteria (``{criterion, points, tags}``),
  ``prompt_id`` the label; results are broken down by the ``theme:`` of ``example_tags``.
- ``champ`` (the ``champ-dataset`` package's one JSON file, not JSONL): each of ``problems`` is a
  prompt with its ``_answer``; results are broken down by ``category``. Only with ``--format champ``.

Fields that reveal the answer (``ANSWER_FIELDS``) never become metadata, so a benchmark submitted
for training carries no answer anywhere. Files are local: nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catq.config import IngestConfig
from catq.messages import Prompt

FORMATS = ("auto", "catq", "math500", "healthbench", "champ")
MATH_SUFFIX = "Put your final answer in \\boxed{}."
"""Appended to benchmark problems that state no answer format (MATH-500, CHAMP), so a model
knows where its final answer goes; catq's own lines are sent as written."""
PROMPT_FIELDS = {"text", "messages", "task", "prompt_id"}
ANSWER_FIELDS = {
    "catq": {"answer"},
    "math500": {"problem", "answer", "solution"},
    "healthbench": {"prompt", "rubrics", "ideal_completions_data", "completion"},
}
"""Per format: the prompt and every field that reveals an answer; none of them is metadata."""
LABEL_FIELD = {"catq": "id", "math500": "unique_id", "healthbench": "prompt_id", "champ": "identifier"}
KEYS_OF = {"catq": ("text", "messages"), "math500": ("problem",), "healthbench": ("prompt", "rubrics")}
"""What :func:`detect_format` looks for on the first line (catq: either key)."""


class DatasetError(ValueError):
    """A data file that cannot be read; the message names the file, the line and the field."""


@dataclass
class RubricItem:
    criterion: str
    points: float
    """Negative for a criterion that must not be met (meeting it subtracts)."""
    tags: list[str] = field(default_factory=list)


@dataclass
class DataItem:
    """One prompt of a data file: what the pipeline sees (``prompt``), and what only a scorer
    may (``answer``, ``rubric``)."""

    prompt: Prompt
    line: int
    """Line number in the file (problem number in a CHAMP file)."""
    label: str | None = None
    """The file's own id of the prompt (``id``, ``unique_id``, ...), shown in results."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Every other field of the line, as it was (answer-revealing ones excepted)."""
    groups: dict[str, str] = field(default_factory=dict)
    """Breakdown keys -> this prompt's value (MATH-500: subject and level)."""
    answer: str | None = None
    rubric: list[RubricItem] | None = None


def read_data(path: str, fmt: str = "auto", *, limits: IngestConfig | None = None,
              default_task: str = "math", label: str | None = None, text: str | None = None) -> list[DataItem]:
    """Every prompt of the file at ``path`` (or of ``text``, named ``label`` in errors)."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    label = label or path
    text = read_text(path) if text is None else text
    limits = limits or IngestConfig()
    if fmt == "champ":
        return _champ_items(text, label, limits)
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if fmt == "auto" and lines:
        fmt = detect_format(_decode_line(*lines[0][::-1], label), f"{label}:{lines[0][0]}")
    items = [_item(fmt, _decode_line(line, n, label), n, f"{label}:{n}", limits, default_task) for n, line in lines]
    _check_unique_prompt_ids(items, label)
    return items


def read_text(path: str) -> str:
    if not Path(path).is_file():
        raise DatasetError(f"{path!r} is not a file")
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 (byte {exc.start})") from None


def detect_format(record: dict, where: str) -> str:
    """The one format whose keys the record has; an error when none or several fit."""
    fits = [name for name, keys in KEYS_OF.items()
            if (any if name == "catq" else all)(key in record for key in keys)]
    if len(fits) == 1:
        return fits[0]
    wanted = "; ".join(f"{name}: {' or '.join(keys) if name == 'catq' else ' and '.join(keys)}"
                       for name, keys in KEYS_OF.items())
    if not fits:
        raise DatasetError(f"{where}: cannot tell the format from keys {sorted(record)} ({wanted}); "
                           f"pass --format")
    raise DatasetError(f"{where}: keys {sorted(record)} fit {' and '.join(fits)}; pass --format")


def _decode_line(line: str, number: int, label: str) -> dict:
    where = f"{label}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        hint = " (a CHAMP JSON file? pass --format champ)" if line.strip() == "{" else ""
        raise DatasetError(f"{where}: invalid JSON: {exc}{hint}") from None
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: must be a JSON object, got {_json_type(record)}")
    return record


def _item(fmt: str, record: dict, number: int, where: str, limits: IngestConfig, default_task: str) -> DataItem:
    if fmt == "catq":
        return _catq_item(record, number, where, limits, default_task)
    if fmt == "math500":
        return _math500_item(record, number, where, limits)
    return _healthbench_item(record, number, where, limits)


def _catq_item(record: dict, number: int, where: str, limits: IngestConfig, default_task: str) -> DataItem:
    prompt = _prompt({k: v for k, v in record.items() if k in PROMPT_FIELDS}, where, limits, default_task)
    answer = _answer_of(record, where) if record.get("answer") is not None else None
    return DataItem(prompt, number, _label_of(record, "catq"),
                    _metadata(record, PROMPT_FIELDS | ANSWER_FIELDS["catq"]), answer=answer)


def _math500_item(record: dict, number: int, where: str, limits: IngestConfig) -> DataItem:
    problem = _string_field(record, "problem", where)
    prompt = _prompt({"text": f"{problem}\n\n{MATH_SUFFIX}", "task": "math"}, where, limits, "math")
    groups = {key: str(record[key]) for key in ("subject", "level") if key in record}
    return DataItem(prompt, number, _label_of(record, "math500"), _metadata(record, ANSWER_FIELDS["math500"]),
                    groups, answer=_answer_of(record, where))


def _healthbench_item(record: dict, number: int, where: str, limits: IngestConfig) -> DataItem:
    conversation = record.get("prompt")
    if not isinstance(conversation, list) or not conversation:
        raise DatasetError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} messages")
    messages = [_message(m, f"{where}: prompt[{i}]") for i, m in enumerate(conversation)]
    prompt = _prompt({"messages": messages, "task": "open"}, where, limits, "open")
    metadata = _metadata(record, ANSWER_FIELDS["healthbench"])
    themes = [t.split(":", 1)[1] for t in record.get("example_tags") or [] if isinstance(t, str) and t.startswith("theme:")]
    return DataItem(prompt, number, _label_of(record, "healthbench"), metadata,
                    {"theme": themes[0]} if themes else {}, rubric=_rubric(record.get("rubrics"), where))


def _message(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or "role" not in value or "content" not in value:
        raise DatasetError(f"{where}: must be an object with 'role' and 'content'")
    return {"role": value["role"], "content": value["content"]}


def _rubric(value: Any, where: str) -> list[RubricItem]:
    if not isinstance(value, list) or not value:
        raise DatasetError(f"{where}: 'rubrics' must be a non-empty list of {{criterion, points, tags}}")
    items = [_rubric_item(entry, f"{where}: rubrics[{i}]") for i, entry in enumerate(value)]
    if not any(item.points > 0 for item in items):
        raise DatasetError(f"{where}: 'rubrics' has no criterion with positive points (nothing to score against)")
    return items


def _rubric_item(value: Any, where: str) -> RubricItem:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: must be an object with 'criterion' and 'points'")
    criterion = _string_field(value, "criterion", where)
    points = value.get("points")
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points):
        raise DatasetError(f"{where}.points: must be a number, got {_json_type(points)}")
    tags = value.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise DatasetError(f"{where}.tags: must be a list of strings")
    return RubricItem(criterion, float(points), tags)


def _champ_items(text: str, label: str, limits: IngestConfig) -> list[DataItem]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{label}: not a CHAMP JSON file: {exc}") from None
    problems = data.get("problems") if isinstance(data, dict) else None
    if not isinstance(problems, dict):
        raise DatasetError(f"{label}: a CHAMP file is one JSON object with a 'problems' object")
    return [_champ_item(record, number, f"{label}: problems[{key!r}]", limits)
            for number, (key, record) in enumerate(problems.items(), 1)]


def _champ_item(record: Any, number: int, where: str, limits: IngestConfig) -> DataItem:
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: must be an object")
    problem = _string_field(record, "_text", where)
    prompt = _prompt({"text": f"{problem}\n\n{MATH_SUFFIX}", "task": "math"}, where, limits, "math")
    category = {"category": str(record["category"])} if "category" in record else {}
    # solution, conversations and fws_annotations hold solutions; ch_list names hints: not metadata
    return DataItem(prompt, number, _label_of(record, "champ"), dict(category), dict(category),
                    answer=_answer_of({"answer": record.get("_answer")}, where))


def _prompt(fields: dict, where: str, limits: IngestConfig, default_task: str) -> Prompt:
    from catq.prompt_requests import PromptRequestError, parse_prompts  # not at import: the CLI imports FORMATS

    try:
        (prompt,) = parse_prompts(fields, limits, default_task=default_task, check_batch=False)
    except PromptRequestError as exc:
        raise DatasetError(f"{where}: {str(exc).removeprefix('prompt: ').removeprefix('prompt.')}") from None
    return prompt


def _string_field(record: dict, name: str, where: str) -> str:
    value = record.get(name)
    if value is None:
        raise DatasetError(f"{where}: missing {name!r}")
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: {name!r} must be a non-empty string, got {_json_type(value)} {value!r}")
    return value


def _answer_of(record: dict, where: str) -> str:
    answer = record.get("answer")
    if answer is None:
        raise DatasetError(f"{where}: missing 'answer'")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DatasetError(f"{where}: 'answer' must be a string or number, got {_json_type(answer)}")
    if not str(answer).strip():
        raise DatasetError(f"{where}: 'answer' is empty")
    return str(answer)


def _label_of(record: dict, fmt: str) -> str | None:
    value = record.get(LABEL_FIELD[fmt])
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _metadata(record: dict, excluded: set[str]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in excluded}


def _check_unique_prompt_ids(items: list[DataItem], label: str) -> None:
    """A client's own ``prompt_id`` keys its result: two lines may not share one."""
    first: dict[str, int] = {}
    for item in items:
        prompt_id = item.prompt.prompt_id
        if prompt_id in first:
            raise DatasetError(f"{label}:{item.line}: prompt_id {prompt_id!r} repeats line {first[prompt_id]}")
        first[prompt_id] = item.line


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
