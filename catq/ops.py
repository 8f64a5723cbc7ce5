"""The operator commands of the ``catq`` CLI: submit, tail, status, health, worker.

Each handler is ``(args, config) -> exit code``; see catq/cli.py for the flags. They talk to
Redis through :class:`catq.bus.Bus` and fail fast (a few seconds) when Redis is unreachable
(exit 1), at once when it refuses the URL's password (exit 2). Error lines never show a URL's
password (:func:`catq.log.redact`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from typing import Any

from catq.bus import Bus, EntryId, RedisAuthError, RedisMemory, StreamStats, is_retryable, prompt_of
from catq.config import Config
from catq.log import redact, setup_cli_logging
from catq.messages import MessageDecodeError, decode, to_json
from catq.results import Status, reached
from catq.topology import DEAD, STREAM_NAMES

CLI_RECONNECT_S = 3.0
"""How long a CLI command retries an unreachable Redis before giving up."""


def _bus(config: Config) -> Bus:
    setup_cli_logging()
    return Bus(config.redis_url, config.run, config.bus, reconnect_timeout_s=CLI_RECONNECT_S)


def _fail(message: str, code: int = 1) -> int:
    print(f"catq: {redact(message)}", file=sys.stderr)
    return code


def _run(config: Config, coro) -> int:
    """asyncio.run a command; an unreachable Redis is a one-line error, not a traceback."""
    try:
        return asyncio.run(coro)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        return _fail(f"cannot reach Redis at {redact(config.redis_url)}: {exc}")


# -- submit ---------------------------------------------------------------------------------------

def submit_command(args: argparse.Namespace, config: Config) -> int:
    from catq.evaluation.formats import DatasetError
    from catq.ingest import PromptRequestError

    try:
        items = _submit_items(args, config)
    except (PromptRequestError, DatasetError) as exc:
        return _fail(str(exc), 2)
    return _run(config, _submit(config, items, args.wait and args.until, args.timeout))


def _submit_items(args: argparse.Namespace, config: Config) -> list:
    """The prompt TEXT and every prompt of ``--file``, read by the loader `catq eval` uses
    (:mod:`catq.evaluation.formats`): only the prompts go on, never a benchmark's answers."""
    from catq.evaluation.formats import DataItem, read_data
    from catq.ingest import PromptRequestError, parse_prompts

    items = []
    if args.text is not None:
        (prompt,) = parse_prompts({"text": args.text}, config.ingest, default_task=args.task, check_batch=False)
        items.append(DataItem(prompt, 0))
    if args.file:
        items += read_data(args.file, getattr(args, "format", "auto"), limits=config.ingest, default_task=args.task)
    if not items:
        raise PromptRequestError("give a prompt TEXT or --file prompts.jsonl")
    return items


async def _submit(config: Config, items: list, until: str | None, timeout: float) -> int:
    from catq.results import ResultStore

    bus = _bus(config)
    results = ResultStore(bus, config.bus.result_ttl_s)
    try:
        ids = await _enqueue_each(bus, results, items)
        if not until:
            return 0
        return await _wait_results(results, ids, Status(until), timeout)
    finally:
        await bus.close()


async def _enqueue_each(bus: Bus, results, items: list) -> list[str]:
    """Enqueue prompts one by one, each with its own Idempotency-Key made before its first try,
    so the Bus retrying a call whose reply was lost replays it instead of adding it twice. Prints
    each id as it is enqueued (a prompt_id already there is named on stderr, not added). A line's
    label and metadata go to its result (what `catq trace` and --wait show), not on the stream."""
    from catq.ingest import enqueue, idempotency_record

    ids = []
    for item in items:
        prompt = item.prompt
        key = idempotency_record("catq submit", uuid.uuid4().hex)
        done = await enqueue(bus, results, [prompt], request_key=key)
        if not done.new[0]:
            print(f"catq: {prompt.prompt_id} was already submitted (status {done.statuses[0]}); "
                  "not added again", file=sys.stderr)
        elif item.label is not None or item.metadata:
            await results.update(prompt.prompt_id, label=item.label, metadata=item.metadata)
        print(prompt.prompt_id, flush=True)
        ids.append(prompt.prompt_id)
    return ids


async def _wait_results(results, ids: list[str], until: Status, timeout: float) -> int:
    """Print each prompt's result once it reached ``until`` (or a final status: dead, set aside)."""
    deadline = time.monotonic() + timeout
    waiting, dead = list(ids), 0
    while waiting:
        for prompt_id in list(waiting):
            result = await results.get(prompt_id)
            if result and reached(result.get("status"), until):
                print(json.dumps(result, ensure_ascii=False), flush=True)
                waiting.remove(prompt_id)
                dead += result["status"] == Status.DEAD
        if waiting and time.monotonic() > deadline:
            for prompt_id in waiting:
                print(json.dumps(await results.get(prompt_id), ensure_ascii=False), flush=True)
            return _fail(f"timed out after {timeout:g}s waiting for {len(waiting)} result(s)")
        if waiting:
            await asyncio.sleep(0.5)
    return _fail(f"{dead} prompt(s) dead-lettered: see their error") if dead else 0


# -- tail -----------------------------------------------------------------------------------------

def tail_command(args: argparse.Namespace, config: Config) -> int:
    if args.stream not in STREAM_NAMES:
        return _fail(f"unknown stream {args.stream!r}; streams: {', '.join(STREAM_NAMES)}", 2)
    try:
        since_s = parse_duration(args.since) if args.since else None
    except ValueError as exc:
        return _fail(str(exc), 2)
    try:
        return _run(config, _tail(config, args, since_s))
    except KeyboardInterrupt:
        return 0


def parse_duration(text: str) -> float:
    """Seconds in "90", "30s", "10m", "2h" or "1d"."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration such as 30s, 10m, 2h or 1d") from None
    if seconds < 0:
        raise ValueError(f"--since {text!r}: must not be negative")
    return seconds


async def _tail(config: Config, args: argparse.Namespace, since_s: float | None) -> int:
    from catq.readable import console

    bus, out = _bus(config), console()
    try:
        newest = await bus.tail_raw(args.stream, 1)
        last = newest[0][0] if newest else "0-0"
        for entry_id, payload in await _tail_entries(bus, args, since_s, last):
            _show(out, args, entry_id, payload)
        while args.follow:
            for entry_id, payload in await bus.read_raw(args.stream, last, block_ms=5000):
                last = entry_id
                if not args.prompt or prompt_of(payload) == args.prompt:
                    _show(out, args, entry_id, payload)
        return 0
    finally:
        await bus.close()


async def _tail_entries(bus: Bus, args: argparse.Namespace, since_s: float | None,
                        last: str) -> list[tuple[str, bytes]]:
    """The entries to show before following, oldest first, none after ``last``: the newest
    ``--count``, or all since ``--since``; with ``--prompt`` only that prompt's (its trace)."""
    if args.prompt:
        traced = await bus.trace_entries(args.prompt)
        entries = [(i, p) for s, i, p in traced if s == args.stream and p is not None]
    elif since_s is not None:
        entries = await bus.read_range(args.stream, str(EntryId.at(time.time() - since_s)))
    else:
        entries = list(reversed(await bus.tail_raw(args.stream, args.count))) if args.count > 0 else []
    entries = [(i, p) for i, p in entries if EntryId.parse(i) <= EntryId.parse(last)]
    if since_s is not None:
        start = (time.time() - since_s) * 1000
        entries = [(i, p) for i, p in entries if EntryId.parse(i).ms >= start]
    return entries if since_s is not None else entries[-args.count:] if args.count > 0 else []


def _show(out, args: argparse.Namespace, entry_id: str, payload: bytes) -> None:
    if args.json:
        print(json_line(entry_id, payload), flush=True)
        return
    from catq.readable import entry_block, print_block

    print_block(out, *entry_block(args.stream, entry_id, payload))
    out.file.flush()


def json_line(entry_id: str, payload: bytes) -> str:
    """One JSON line per entry with every field of the message (:func:`catq.messages.to_json`)."""
    try:
        body = to_json(decode(payload))
    except MessageDecodeError as exc:
        body = {"type": "<undecodable>", "error": str(exc), "bytes": len(payload)}
    return json.dumps({"id": entry_id, **body}, ensure_ascii=False)


# -- migrate-keys ---------------------------------------------------------------------------------

def migrate_keys_command(args: argparse.Namespace, config: Config) -> int:
    """Carry a run made before keys were hash-tagged over to catq:{<run>}: (stop it first)."""
    async def migrate() -> list[str]:
        bus = _bus(config)
        try:
            return await bus.migrate_legacy_keys()
        finally:
            await bus.close()

    try:
        renamed = asyncio.run(migrate())
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"cannot migrate run {config.run!r} at {redact(config.redis_url)}: {exc}")
    print(f"run {config.run}: moved {len(renamed)} keys to catq:{{{config.run}}}:")
    return 0


# -- status ---------------------------------------------------------------------------------------

def status_command(args: argparse.Namespace, config: Config) -> int:
    try:
        stats, health, memory, dropped = asyncio.run(_stats(config))
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"cannot read run {config.run!r} at {redact(config.redis_url)}: {exc}")
    print(render_status(config.run, stats, health, memory, dropped))
    return 0


async def _stats(config: Config) -> tuple[dict[str, StreamStats], list, RedisMemory | None, int]:
    from catq.health import role_health

    bus = _bus(config)
    try:
        return (await bus.stream_stats(), await role_health(bus, config), await bus.memory(),
                await bus.dead_letters_dropped())
    finally:
        await bus.close()


def render_status(run: str, stats: dict[str, StreamStats], health: list | None = None,
                  memory: RedisMemory | None = None, dead_dropped: int = 0) -> str:
    from catq.health import starved

    lines = [f"run {run}"]
    if health is not None:
        lines.append("roles (alive/expected from heartbeats; restarts by catq up):")
        lines += [h.line() for h in health]
    for stream, info in stats.items():
        lines.append(f"  {stream:<11} length {info.length}")
        for g in info.groups:
            lag = "" if g.lag is None else f", lag {g.lag}"
            lines.append(f"    group {g.group}: pending {g.pending}{lag}, "
                         f"{len(g.consumers)} consumer(s)")
            for c in g.consumers:
                lines.append(f"      {c.name}: pending {c.pending}, idle {c.idle_ms / 1000:.1f}s")
    if health is not None:
        lines += [f"  STARVED {line}" for line in starved(stats, health)]
    dead = stats[DEAD.name].length if DEAD.name in stats else 0
    lines.append(f"  dead letters: {dead}" + ("  (catq tail dead)" if dead else "")
                 + (f"; {dead_dropped} dropped over [bus] max_dead_letters" if dead_dropped else ""))
    if memory is not None:
        lines.append(f"  {memory.line()}")
    return "\n".join(lines)


# -- health / worker ------------------------------------------------------------------------------

def health_command(args: argparse.Namespace, config: Config) -> int:
    try:
        live = asyncio.run(live_workers(config, args.role))
    except RedisAuthError as exc:
        return _fail(str(exc), 2)
    except Exception as exc:
        return _fail(f"{args.role}: cannot reach Redis at {redact(config.redis_url)}: {exc}")
    if not live:
        return _fail(f"{args.role}: no live worker (no fresh heartbeat in run {config.run!r})")
    print(f"{args.role}: {len(live)} live worker(s): {', '.join(sorted(live))}")
    return 0


async def live_workers(config: Config, role: str) -> list[str]:
    """Worker ids of ``role`` whose heartbeat key has not expired."""
    bus = _bus(config)
    try:
        return await bus.live_workers(role)
    finally:
        await bus.close()
