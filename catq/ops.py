"""The operator commands of the ``catq`` CLI: submit, tail, status, health, worker.

Each handler is ``(args, config) -> exit code``; see catq/cli.py for the flags. They talk to
Redis through :class:`catq.bus.Bus` and fail fast (a few seconds) when Redis is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

import structlog

from catq.bus import STREAMS, Bus, is_retryable
from catq.config import Config
from catq.messages import MessageDecodeError, decode, describe

CLI_RECONNECT_S = 3.0
"""How long a CLI command retries an unreachable Redis before giving up."""
DONE_STATUSES = ("scored", "trained", "dead")
"""Statuses after which a prompt's result no longer changes ("dead": dead-lettered, see error)."""
"""``submit --wait`` stops waiting at these statuses."""
LIST_PREVIEW = 8
STR_PREVIEW = 300


def _bus(config: Config) -> Bus:
    _quiet_logging()
    return Bus(config.redis_url, config.run, config.bus, reconnect_timeout_s=CLI_RECONNECT_S)


def _quiet_logging() -> None:
    """CLI commands print results on stdout; library warnings (Redis retries) go to stderr."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        # sys.stderr looked up per logger, not bound once: tests swap and close it.
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
    )


def _fail(message: str, code: int = 1) -> int:
    print(f"catq: {message}", file=sys.stderr)
    return code


def _run(config: Config, coro) -> int:
    """asyncio.run a command; an unreachable Redis is a one-line error, not a traceback."""
    try:
        return asyncio.run(coro)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        return _fail(f"cannot reach Redis at {config.redis_url}: {exc}")


# -- submit ---------------------------------------------------------------------------------------

def submit_command(args: argparse.Namespace, config: Config) -> int:
    from catq.ingest import PromptRequestError, parse_prompts

    try:
        items = _submit_items(args)
        prompts = parse_prompts(items, config.ingest, default_task=args.task, check_batch=False)
    except PromptRequestError as exc:
        return _fail(str(exc), 2)
    return _run(config, _submit(config, prompts, args.wait, args.timeout))


def _submit_items(args: argparse.Namespace) -> list[Any]:
    from catq.ingest import PromptRequestError

    items: list[Any] = []
    if args.text is not None:
        items.append({"text": args.text})
    if args.file:
        try:
            lines = open(args.file, encoding="utf-8").read().splitlines()
        except OSError as exc:
            raise PromptRequestError(f"cannot read {args.file}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PromptRequestError(f"{args.file}:{number}: invalid JSON: {exc}") from None
    if not items:
        raise PromptRequestError("give a prompt TEXT or --file prompts.jsonl")
    return items


async def _submit(config: Config, prompts: list, wait: bool, timeout: float) -> int:
    from catq.ingest import enqueue
    from catq.results import ResultStore

    bus = _bus(config)
    results = ResultStore(bus, config.bus.result_ttl_s)
    try:
        ids = await enqueue(bus, results, prompts)
        for prompt_id in ids:
            print(prompt_id, flush=True)
        if not wait:
            return 0
        return await _wait_results(results, ids, timeout)
    finally:
        await bus.close()


async def _wait_results(results, ids: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    waiting, dead = list(ids), 0
    while waiting:
        for prompt_id in list(waiting):
            result = await results.get(prompt_id)
            if result and result.get("status") in DONE_STATUSES:
                print(json.dumps(result, ensure_ascii=False), flush=True)
                waiting.remove(prompt_id)
                dead += result["status"] == "dead"
        if waiting and time.monotonic() > deadline:
            for prompt_id in waiting:
                print(json.dumps(await results.get(prompt_id), ensure_ascii=False), flush=True)
            return _fail(f"timed out after {timeout:g}s waiting for {len(waiting)} result(s)")
        if waiting:
            await asyncio.sleep(0.5)
    return _fail(f"{dead} prompt(s) dead-lettered: see their error") if dead else 0


# -- tail -----------------------------------------------------------------------------------------

def tail_command(args: argparse.Namespace, config: Config) -> int:
    if args.stream not in STREAMS:
        return _fail(f"unknown stream {args.stream!r}; streams: {', '.join(STREAMS)}", 2)
    try:
        return _run(config, _tail(config, args.stream, args.count, args.follow))
    except KeyboardInterrupt:
        return 0


async def _tail(config: Config, stream: str, count: int, follow: bool) -> int:
    bus = _bus(config)
    try:
        entries = list(reversed(await bus.tail_raw(stream, count))) if count > 0 else []
        for entry_id, payload in entries:
            print(format_entry(entry_id, payload), flush=True)
        last = entries[-1][0] if entries else "$"
        while follow:
            if last == "$":  # nothing seen yet: start from the stream's current end
                newest = await bus.tail_raw(stream, 1)
                last = newest[0][0] if newest else "0"
            for entry_id, payload in await bus.read_raw(stream, last, block_ms=5000):
                print(format_entry(entry_id, payload), flush=True)
                last = entry_id
        return 0
    finally:
        await bus.close()


def format_entry(entry_id: str, payload: bytes) -> str:
    """One readable JSON line per entry: long lists and strings shortened."""
    try:
        body = shorten(describe(decode(payload)))
    except MessageDecodeError as exc:
        body = {"type": "<undecodable>", "error": str(exc), "bytes": len(payload)}
    return json.dumps({"id": entry_id, **body}, ensure_ascii=False)


def shorten(value: Any) -> Any:
    """Token-id and log-prob lists become their first items and a count; long text is cut."""
    if isinstance(value, dict):
        return {k: shorten(v) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > LIST_PREVIEW and all(isinstance(v, (int, float)) for v in value):
            head = [round(v, 3) if isinstance(v, float) else v for v in value[:LIST_PREVIEW]]
            return f"{head} ... ({len(value)} items)"
        return [shorten(v) for v in value]
    if isinstance(value, str) and len(value) > STR_PREVIEW:
        return value[:STR_PREVIEW] + f"... ({len(value)} chars)"
    if isinstance(value, float):
        return round(value, 4)
    return value


# -- status ---------------------------------------------------------------------------------------

def status_command(args: argparse.Namespace, config: Config) -> int:
    try:
        stats = asyncio.run(_stats(config))
    except Exception as exc:
        return _fail(f"cannot read run {config.run!r} at {config.redis_url}: {exc}")
    print(render_status(config.run, stats))
    return 0


async def _stats(config: Config) -> dict:
    bus = _bus(config)
    try:
        return await bus.stats()
    finally:
        await bus.close()


def render_status(run: str, stats: dict[str, Any]) -> str:
    lines = [f"run {run}"]
    for stream, info in stats.items():
        lines.append(f"  {stream:<11} length {info['length']}")
        for g in info["groups"]:
            lag = "" if g.get("lag") is None else f", lag {g['lag']}"
            lines.append(f"    group {g['group']}: pending {g['pending']}{lag}, "
                         f"{len(g['consumers'])} consumer(s)")
            for c in g["consumers"]:
                lines.append(f"      {c['name']}: pending {c['pending']}, idle {c['idle_ms'] / 1000:.1f}s")
    dead = stats.get("dead", {}).get("length", 0)
    lines.append(f"  dead letters: {dead}" + ("  (catq tail dead)" if dead else ""))
    return "\n".join(lines)


# -- health / worker ------------------------------------------------------------------------------

def health_command(args: argparse.Namespace, config: Config) -> int:
    try:
        live = asyncio.run(live_workers(config, args.role))
    except Exception as exc:
        return _fail(f"{args.role}: cannot reach Redis at {config.redis_url}: {exc}")
    if not live:
        return _fail(f"{args.role}: no live worker (no fresh heartbeat in run {config.run!r})")
    print(f"{args.role}: {len(live)} live worker(s): {', '.join(sorted(live))}")
    return 0


async def live_workers(config: Config, role: str) -> list[str]:
    """Worker ids of ``role`` whose heartbeat key has not expired."""
    bus = _bus(config)
    try:
        prefix = bus.key(f"heartbeat:{role}:")
        keys = await bus.retrying(lambda: _scan(bus, prefix + "*"), "health")
        return [k.decode()[len(prefix):] for k in keys]
    finally:
        await bus.close()


async def _scan(bus: Bus, pattern: str) -> list[bytes]:
    return [k async for k in bus.redis.scan_iter(match=pattern, count=1000)]


def worker_command(args: argparse.Namespace, config: Config) -> int:
    from catq.roles import UnknownRoleError, run_role

    try:
        run_role(args.role, config)
    except UnknownRoleError as exc:
        return _fail(str(exc), 2)
    return 0
