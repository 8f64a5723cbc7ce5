"""`catq dead`: what failed, and putting it back once the cause is fixed.

    catq dead list [--count N]              every dead letter: id, stream, prompt, deliveries, reason
    catq dead replay ID [ID ...] | --all    back onto its original stream (the same message, so the
                                            same prompt id); the letter leaves ``dead``
    catq dead drop ID [ID ...] | --all      delete for good

``dead`` is never trimmed: it holds the only copy of the work that failed. A replayed prompt's
result goes back to the status it had while waiting on that stream, with ``replayed_from`` (the
dead letter's id) and ``replayed_error`` (why it had failed).
"""

from __future__ import annotations

import argparse
import time

from catq.bus import Bus
from catq.config import Config
from catq.messages import DeadLetter, MessageDecodeError, decode, prompt_id_of
from catq.ops.common import _bus, _fail, _run
from catq.results import WAITING_ON, ResultStore
from catq.topology import STREAM_NAMES


def dead_command(args: argparse.Namespace, config: Config) -> int:
    if args.action == "list":
        return _run(config, _list(config, args.count))
    if not args.ids and not args.all:
        return _fail(f"dead {args.action}: name dead-letter ids (see `catq dead list`) or --all", 2)
    if args.ids and args.all:
        return _fail(f"dead {args.action}: ids or --all, not both", 2)
    action = _replay if args.action == "replay" else _drop
    return _run(config, action(config, args.ids or None))


async def _letters(bus: Bus, ids: list[str] | None) -> list[tuple[str, DeadLetter | None]]:
    """(dead id, letter or None when undecodable) for ``ids`` (all when None), oldest first."""
    wanted = set(ids) if ids is not None else None
    found = []
    for dead_id, payload in await bus.dead_letters():
        if wanted is None or dead_id in wanted:
            try:
                found.append((dead_id, decode(payload, expected=DeadLetter)))
            except MessageDecodeError:
                found.append((dead_id, None))
    return found


async def _list(config: Config, count: int | None) -> int:
    bus = _bus(config)
    try:
        letters = await _letters(bus, None)
    finally:
        await bus.close()
    shown = letters[-count:] if count else letters
    for dead_id, letter in shown:
        print(describe_letter(dead_id, letter))
    print(f"{len(letters)} dead letter(s) in run {config.run!r}" + (f", newest {len(shown)} shown" if count else ""))
    return 0


def describe_letter(dead_id: str, letter: DeadLetter | None) -> str:
    if letter is None:
        return f"{dead_id}  (undecodable dead letter: drop it)"
    try:
        prompt = prompt_id_of(decode(letter.payload))
    except MessageDecodeError:
        prompt = "(undecodable message)"
    age = time.time() - letter.created_at
    return (f"{dead_id}  {letter.stream} entry {letter.entry_id}  prompt {prompt}  "
            f"deliveries {letter.attempts}  {age:.0f}s ago  worker {letter.worker or '-'}\n"
            f"    reason: {letter.error}")


async def _replay(config: Config, ids: list[str] | None) -> int:
    bus = _bus(config)
    results = ResultStore(bus, config.bus.result_ttl_s)
    replayed = 0
    try:
        letters = await _letters(bus, ids)
        for dead_id, letter in letters:
            if letter is None or letter.stream not in STREAM_NAMES:
                print(f"{dead_id}: not replayable (undecodable, or from an unknown stream); drop it")
                continue
            new_id = await bus.replay_dead(dead_id, letter)
            if new_id is None:
                print(f"{dead_id}: already gone (replayed or dropped meanwhile)")
                continue
            await _mark_replayed(results, dead_id, letter)
            print(f"{dead_id}: replayed onto {letter.stream} as {new_id}")
            replayed += 1
    finally:
        await bus.close()
    missing = set(ids or ()) - {dead_id for dead_id, _ in letters}
    for dead_id in sorted(missing):
        print(f"{dead_id}: no such dead letter")
    print(f"{replayed} replayed")
    return 1 if missing else 0


async def _mark_replayed(results: ResultStore, dead_id: str, letter: DeadLetter) -> None:
    try:
        prompt_id = prompt_id_of(decode(letter.payload))
    except MessageDecodeError:
        return
    if prompt_id is not None and letter.stream in WAITING_ON:
        await results.update(prompt_id, status=WAITING_ON[letter.stream], error=None,
                             replayed_from=dead_id, replayed_error=letter.error)


async def _drop(config: Config, ids: list[str] | None) -> int:
    bus = _bus(config)
    try:
        targets = ids if ids is not None else [dead_id for dead_id, _ in await bus.dead_letters()]
        dropped = await bus.drop_dead(targets)
    finally:
        await bus.close()
    print(f"{dropped} dropped")
    return 0 if ids is None or dropped == len(set(ids)) else 1
