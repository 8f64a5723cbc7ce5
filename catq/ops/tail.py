"""`catq tail`: a stream's newest entries (--count, --since, --prompt), then follow (-f)."""

from __future__ import annotations

import argparse
import json
import time

from catq.bus import Bus, EntryId, prompt_of
from catq.config import Config
from catq.messages import MessageDecodeError, decode, to_json
from catq.ops.common import _bus, _fail, _run
from catq.topology import STREAM_NAMES


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
    from catq.ops.readable import console

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
    from catq.ops.readable import entry_block, print_block

    print_block(out, *entry_block(args.stream, entry_id, payload))
    out.file.flush()


def json_line(entry_id: str, payload: bytes) -> str:
    """One JSON line per entry with every field of the message (:func:`catq.messages.to_json`)."""
    try:
        body = to_json(decode(payload))
    except MessageDecodeError as exc:
        body = {"type": "<undecodable>", "error": str(exc), "bytes": len(payload)}
    return json.dumps({"id": entry_id, **body}, ensure_ascii=False)
