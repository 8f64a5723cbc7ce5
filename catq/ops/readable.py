"""Messages as a person reads them (``catq tail``, ``catq trace``): one short block per entry
with the fields that matter (answers, rewards, reference, versions, error), long arrays and
texts summarised, every line cut to the console's width.

A block is a header and ``(label, value)`` rows; :func:`print_block` prints it with ``rich``:
styled on a terminal, plain text when stdout is a pipe or a file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.text import Text

from catq.bus import EntryId
from catq.messages import (
    DeadLetter,
    Message,
    MessageDecodeError,
    Prompt,
    ReferencedGroup,
    RolloutGroup,
    ScoredGroup,
    WeightsPublished,
    decode,
    prompt_id_of,
)
from catq.topology import DEAD, GROUPS, PROMPTS, REFERENCES, SCORED, WEIGHTS, Stream, stream_of

TEXT_PREVIEW = 160
"""Characters of a question, answer or error shown before "…"; the console width cuts further."""
Rows = list[tuple[str, str]]


def entry_time(entry_id: str) -> float:
    """The unix time Redis wrote an entry (its id's milliseconds)."""
    return EntryId.parse(entry_id).time


def clock(unix_time: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix_time)) + f".{int(unix_time * 1000) % 1000:03d}"


def preview(text: str | None, limit: int = TEXT_PREVIEW) -> str:
    """One line of ``text``: newlines shown as ⏎, cut at ``limit`` with the full length named."""
    if text is None:
        return "—"
    flat = " ⏎ ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return flat if len(flat) <= limit else f"{flat[:limit]}… ({len(text)} chars)"


def numbers(values: Iterable[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def header(stream: str, entry_id: str, message: Message | None) -> str:
    prompt = prompt_id_of(message) if message is not None else None
    kind = type(message).__name__ if message is not None else "<undecodable>"
    parts = [stream, entry_id, clock(entry_time(entry_id)), kind]
    return "  ".join(parts + ([f"prompt {prompt}"] if prompt else []))


def rows(message: Message) -> Rows:
    """The fields a person reads, per message type (:data:`ROWS`, by the stream carrying it)."""
    s = stream_of(message)
    return ROWS[s](message) if s in ROWS else []


def prompt_rows(prompt: Prompt) -> Rows:
    return [("task", prompt.task), ("question", preview(prompt.question))]


def answer_rows(group: RolloutGroup, finals: list[str | None] | None = None) -> Rows:
    """One row per rollout: its final answer (when known), length in tokens, how it ended."""
    out = []
    for i, rollout in enumerate(group.rollouts):
        final = f"→ {finals[i]}  " if finals and i < len(finals) else ""
        out.append((f"answer {i}", f"{final}[{len(rollout.token_ids)} tok, {rollout.finish_reason}] "
                                   f"{preview(rollout.text, 80)}"))
    return out


def group_rows(group: RolloutGroup) -> Rows:
    return [("question", preview(group.prompt.question)), ("policy", f"v{group.policy_version}"),
            *answer_rows(group)]


def referenced_rows(ref: ReferencedGroup) -> Rows:
    out = [("question", preview(ref.group.prompt.question)), ("policy", f"v{ref.group.policy_version}"),
           ("estimator", ref.estimator + (" (format fallback)" if ref.format_fallback else "")),
           ("reference", preview(ref.reference))]
    if ref.group.prompt.task == "math":
        out += [("ref answer", str(ref.reference_answer)), ("majority", str(ref.majority_answer))]
    out += [(f"criterion {i}", preview(c, 100)) for i, c in enumerate(ref.rubric)]
    return out


def scored_rows(scored: ScoredGroup) -> Rows:
    ref = scored.referenced
    mean = sum(scored.rewards) / len(scored.rewards) if scored.rewards else 0.0
    out = [("question", preview(ref.group.prompt.question)), ("policy", f"v{ref.group.policy_version}"),
           ("rewards", f"{numbers(scored.rewards)}  (mean {mean:.2f})")]
    if ref.group.prompt.task == "math":
        out += [("ref answer", f"{ref.reference_answer}  ({ref.estimator})"),
                ("answers", " | ".join(str(a) for a in scored.rollout_answers))]
    else:
        out += [("reference", preview(ref.reference, 100))]
        out += [(f"criterion {i}", f"{satisfied_marks(scored, i)}  {preview(c, 80)}")
                for i, c in enumerate(ref.rubric)]
    return out


def satisfied_marks(scored: ScoredGroup, criterion: int) -> str:
    """Per rollout, ✓ when the judge said the criterion is met (? when unparsed)."""
    marks = {v.rollout_index: ("✓" if v.satisfied else "✗") if v.parsed else "?"
             for v in scored.verdicts if v.criterion_index == criterion}
    return "".join(marks.get(i, "·") for i in range(len(scored.rewards)))


def weights_rows(published: WeightsPublished) -> Rows:
    return [("version", f"v{published.policy_version}"), ("step", str(published.step)), ("path", published.path)]


def dead_rows(letter: DeadLetter) -> Rows:
    out = [("from", f"{letter.stream} {letter.entry_id}"), ("attempts", str(letter.attempts)),
           ("worker", letter.worker or "—"), ("error", preview(letter.error, 300))]
    try:
        original = decode(letter.payload)
    except MessageDecodeError as exc:
        return out + [("payload", f"<undecodable, {len(letter.payload)} bytes: {exc}>")]
    out.append(("payload", type(original).__name__ + (f" prompt {prompt_id_of(original)}"
                                                      if prompt_id_of(original) else "")))
    return out + [(f"  {label}", value) for label, value in rows(original)]


ROWS: dict[Stream, Callable[[Any], Rows]] = {
    PROMPTS: prompt_rows, GROUPS: group_rows, REFERENCES: referenced_rows, SCORED: scored_rows,
    WEIGHTS: weights_rows, DEAD: dead_rows}
"""How an entry of each stream (:data:`catq.topology.STREAMS`) reads: a renderer per stream."""


def entry_block(stream: str, entry_id: str, payload: bytes) -> tuple[str, Rows]:
    """The block of one stream entry; an undecodable one says why."""
    try:
        message = decode(payload)
    except MessageDecodeError as exc:
        return header(stream, entry_id, None), [("error", str(exc)), ("bytes", str(len(payload)))]
    return header(stream, entry_id, message), rows(message)


def console() -> Console:
    """stdout as rich sees it: styles and the real width on a terminal, plain text otherwise."""
    return Console(highlight=False, soft_wrap=False)


def print_block(out: Console, title: str, body: Rows) -> None:
    """A title line and indented ``label  value`` rows, each cut to the console's width."""
    width = max(max((len(label) for label, _ in body), default=0), 8)
    out.print(Text(title, style="bold cyan"), overflow="ellipsis", no_wrap=True, crop=True)
    for label, value in body:
        line = Text.assemble(("  " + label.ljust(width) + "  ", "dim"), value)
        out.print(line, overflow="ellipsis", no_wrap=True, crop=True)
