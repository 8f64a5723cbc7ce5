"""`catq trace PROMPT_ID`: one prompt's path through the run, stage by stage, with times.

Read from the streams (every entry of the prompt, found through its trace list:
:meth:`catq.bus.Bus.trace_entries`) and from its result hash (:class:`catq.results.ResultStore`):
the learner's verdict (trained in which version and step, or set aside and why) lives only there.
Each stage has the wall-clock time its entry was written and its latency since the stage before.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from catq.bus import Bus, EntryId, prompt_of
from catq.config import Config
from catq.messages import (
    DeadLetter,
    Message,
    MessageDecodeError,
    Prompt,
    ReferencedGroup,
    RolloutGroup,
    ScoredGroup,
    decode,
)
from catq.ops.readable import Rows, clock, entry_time, numbers, preview, satisfied_marks
from catq.topology import (
    DEAD,
    GROUPS,
    PROMPTS,
    REFERENCES,
    SCORED,
    WORK_STREAMS,
    Stream,
    stage_name,
    stream_of,
)

LAST_STREAMS = (DEAD.name, *(s.name for s in reversed(WORK_STREAMS)))
"""Where `catq trace --last` looks for the newest prompt: ``dead``, then the work streams from
the last stage back."""
INGEST, ROLLOUT, ANCHOR, JUDGE = (stage_name(s) for s in (PROMPTS, GROUPS, REFERENCES, SCORED))
LEARNER = "learner"
"""The learner's verdict is a stage too, read from the result hash (no stream carries it)."""


def trace_command(args: argparse.Namespace, config: Config) -> int:
    from catq.ops.common import _fail, _run

    if bool(args.prompt_id) == bool(args.last):
        return _fail("give a PROMPT_ID or --last", 2)
    return _run(config, _trace(config, args))


async def _trace(config: Config, args: argparse.Namespace) -> int:
    from catq.ops.common import _bus, _fail
    from catq.results import ResultStore

    bus = _bus(config)
    try:
        prompt_id = args.prompt_id or await last_prompt(bus)
        if prompt_id is None:
            return _fail(f"run {config.run!r} has no prompt on any stream")
        entries = await bus.trace_entries(prompt_id)
        result = await ResultStore(bus, config.bus.result_ttl_s).get(prompt_id)
    finally:
        await bus.close()
    if not entries and result is None:
        return _fail(f"no prompt {prompt_id!r} in run {config.run!r} (unknown, or its result expired)")
    trace = build_trace(prompt_id, entries, result)
    if args.json:
        print(json.dumps(trace, ensure_ascii=False))
    else:
        print_trace(trace)
    return 0


async def last_prompt(bus: Bus) -> str | None:
    """The prompt of the newest entry across the work streams and ``dead``."""
    newest: list[tuple[EntryId, bytes]] = []
    for stream in LAST_STREAMS:
        for entry_id, payload in await bus.tail_raw(stream, 1):
            newest.append((EntryId.parse(entry_id), payload))
    for _, payload in sorted(newest, reverse=True):
        prompt_id = prompt_of(payload)
        if prompt_id:
            return prompt_id
    return None


# -- building -------------------------------------------------------------------------------------

def build_trace(prompt_id: str, entries: list[tuple[str, str, bytes | None]],
                result: dict[str, Any] | None) -> dict[str, Any]:
    """The trace as JSON-able data: the prompt, its status and its stages in order."""
    result = result or {}
    messages = [(stream, entry_id, _decoded(payload)) for stream, entry_id, payload in entries]
    stages = [stage for stream, entry_id, message in messages
              if (stage := stage_of(stream, entry_id, message, result)) is not None]
    finals = next((s["rollout_answers"] for s in stages if s["stage"] == JUDGE), None)
    for stage in stages:
        if stage["stage"] == ROLLOUT and finals:
            for answer, final in zip(stage["answers"], finals):
                answer["final_answer"] = final
    if not any(s["stage"] == INGEST for s in stages):
        stages.insert(0, ingest_from(prompt_id, messages, result))
    learner = learner_stage(result)
    if learner is not None:
        stages.append(learner)
    _add_latencies(stages)
    ingest = stages[0]
    return {"prompt_id": prompt_id, "label": result.get("label"), "status": result.get("status"),
            "task": result.get("task") or ingest["task"],
            "question": result.get("question") or ingest["question"], "stages": stages,
            "missing": [f"{s} {i}" for s, i, p in entries if p is None]}


def _decoded(payload: bytes | None) -> Message | None:
    if payload is None:
        return None
    try:
        return decode(payload)
    except MessageDecodeError:
        return None


def stage_of(stream: str, entry_id: str, message: Message | None, result: dict) -> dict | None:
    """The stage an entry records; None for a trimmed or undecodable entry."""
    if message is None:
        return None
    base = {"stream": stream, "entry_id": entry_id, "at": entry_time(entry_id)}
    s = stream_of(message)
    if s not in STAGE_FIELDS:
        return None
    return {"stage": stage_name(s), **base, **STAGE_FIELDS[s](message, result)}


def ingest_fields(prompt: Prompt, result: dict) -> dict:
    return {"status": "queued", "task": prompt.task, "question": prompt.question,
            "created_at": prompt.created_at}


def dead_fields(letter: DeadLetter, result: dict) -> dict:
    return {"from_stream": letter.stream, "error": letter.error, "attempts": letter.attempts,
            "worker": letter.worker}


def rollout_fields(group: RolloutGroup) -> dict:
    return {"policy_version": group.policy_version,
            "answers": [{"text": r.text, "tokens": len(r.token_ids), "finish_reason": r.finish_reason,
                         "final_answer": None} for r in group.rollouts]}


def anchor_fields(ref: ReferencedGroup, result: dict) -> dict:
    return {"estimator": ref.estimator, "reference": ref.reference, "reference_answer": ref.reference_answer,
            "majority_answer": ref.majority_answer, "primed": bool(result.get("answer_primed", False)),
            "format_fallback": ref.format_fallback, "rubric": list(ref.rubric),
            "anchor_version": ref.anchor_version}


def judge_fields(scored: ScoredGroup) -> dict:
    criteria = [{"criterion": c, "satisfied": satisfied_marks(scored, i)}
                for i, c in enumerate(scored.referenced.rubric)]
    return {"rewards": list(scored.rewards), "rollout_answers": list(scored.rollout_answers),
            "criteria": criteria}


STAGE_FIELDS: dict[Stream, Callable[[Any, dict], dict]] = {
    PROMPTS: ingest_fields, GROUPS: lambda group, result: rollout_fields(group),
    REFERENCES: anchor_fields, SCORED: lambda scored, result: judge_fields(scored), DEAD: dead_fields}
"""The stage each stream's entries record (:func:`catq.topology.stage_name`) and its fields;
``weights`` entries name no prompt and make no stage."""


def ingest_from(prompt_id: str, messages: list, result: dict) -> dict:
    """The ingest stage when its ``prompts`` entry is not listed (still queued, or trimmed): from
    the prompt any later message carries, else from the result hash."""
    prompt = next((m for _, _, m in messages if isinstance(m, RolloutGroup)), None)
    prompt = prompt.prompt if prompt else _nested_prompt(messages)
    if prompt is not None:
        return {"stage": INGEST, "stream": PROMPTS.name, "entry_id": None, "at": prompt.created_at,
                "status": "queued", "task": prompt.task, "question": prompt.question,
                "created_at": prompt.created_at}
    return {"stage": INGEST, "stream": PROMPTS.name, "entry_id": None, "at": None, "status": "queued",
            "task": result.get("task"), "question": result.get("question"), "created_at": None}


def _nested_prompt(messages: list) -> Prompt | None:
    for _, _, message in messages:
        if isinstance(message, ReferencedGroup):
            return message.group.prompt
        if isinstance(message, ScoredGroup):
            return message.group.prompt
    return None


def learner_stage(result: dict) -> dict | None:
    """Trained (in which version, at which step) or set aside (why): only the result says."""
    status = result.get("status")
    if status == "trained":
        return {"stage": LEARNER, "at": result.get("updated_at"), "status": status,
                "trained_in_version": result.get("trained_in_version"), "trained_step": result.get("trained_step")}
    if status == "set_aside":
        return {"stage": LEARNER, "at": result.get("updated_at"), "status": status,
                "set_aside": result.get("set_aside")}
    return None


def _add_latencies(stages: list[dict]) -> None:
    previous = None
    for stage in stages:
        at = stage.get("at")
        stage["latency_s"] = round(at - previous, 3) if at is not None and previous is not None else None
        previous = at if at is not None else previous


# -- printing -------------------------------------------------------------------------------------

def print_trace(trace: dict) -> None:
    from catq.ops.readable import console, print_block

    out = console()
    label = f"  label {trace['label']}" if trace.get("label") is not None else ""
    out.print(f"prompt {trace['prompt_id']}{label}  status {trace['status']}  task {trace['task']}",
              style="bold", overflow="ellipsis", no_wrap=True, crop=True)
    for stage in trace["stages"]:
        print_block(out, stage_title(stage), STAGE_ROWS[stage["stage"]](stage))
    for missing in trace["missing"]:
        out.print(f"(entry {missing} was trimmed from its stream)", style="dim")
    sys.stdout.flush()


def stage_title(stage: dict) -> str:
    when = clock(stage["at"]) if stage.get("at") else "—"
    latency = f"  {stage['latency_s']:+.3f}s" if stage.get("latency_s") is not None else ""
    where = f"  [{stage['stream']} {stage['entry_id']}]" if stage.get("entry_id") else ""
    return f"{stage['stage']:<8} {when}{latency}{where}"


def ingest_rows(stage: dict) -> Rows:
    return [("status", "queued"), ("question", preview(stage["question"]))]


def rollout_rows(stage: dict) -> Rows:
    out = [("policy", f"v{stage['policy_version']}")]
    for i, a in enumerate(stage["answers"]):
        final = f"→ {a['final_answer']}  " if a["final_answer"] is not None else ""
        out.append((f"answer {i}", f"{final}[{a['tokens']} tok, {a['finish_reason']}] {preview(a['text'], 80)}"))
    return out


def anchor_rows(stage: dict) -> Rows:
    out = [("estimator", stage["estimator"]), ("reference", preview(stage["reference"]))]
    if stage["reference_answer"] is not None or stage["majority_answer"] is not None:
        primed = " (primed)" if stage["primed"] else ""
        out += [("ref answer", f"{stage['reference_answer']}{primed}"), ("majority", str(stage["majority_answer"]))]
    return out + [(f"criterion {i}", preview(c, 100)) for i, c in enumerate(stage["rubric"])]


def judge_rows(stage: dict) -> Rows:
    rewards = stage["rewards"]
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    out = [("rewards", f"{numbers(rewards)}  (mean {mean:.2f})")]
    if stage["rollout_answers"]:
        out.append(("answers", " | ".join(str(a) for a in stage["rollout_answers"])))
    return out + [(f"criterion {i}", f"{c['satisfied']}  {preview(c['criterion'], 80)}")
                  for i, c in enumerate(stage["criteria"])]


def learner_rows(stage: dict) -> Rows:
    if stage["status"] == "trained":
        return [("trained", f"step {stage['trained_step']}, in policy v{stage['trained_in_version']}")]
    return [("set aside", str(stage["set_aside"]))]


def dead_rows(stage: dict) -> Rows:
    return [("from", stage["from_stream"]), ("attempts", str(stage["attempts"])),
            ("worker", stage["worker"] or "—"), ("reason", preview(stage["error"], 300))]


STAGE_ROWS = {INGEST: ingest_rows, ROLLOUT: rollout_rows, ANCHOR: anchor_rows, JUDGE: judge_rows,
              LEARNER: learner_rows, stage_name(DEAD): dead_rows}
"""How each stage reads in `catq trace`, by the stage names of :data:`STAGE_FIELDS`."""
