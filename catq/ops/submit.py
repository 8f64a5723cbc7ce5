"""`catq submit`: enqueue prompts (a TEXT or --file), each once, and optionally wait for them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid

from catq.bus import Bus
from catq.config import Config
from catq.ops.common import _bus, _fail, _run
from catq.results import Status, reached


def submit_command(args: argparse.Namespace, config: Config) -> int:
    from catq.evaluation.formats import DatasetError
    from catq.prompt_requests import PromptRequestError

    try:
        items = _submit_items(args, config)
    except (PromptRequestError, DatasetError) as exc:
        return _fail(str(exc), 2)
    return _run(config, _submit(config, items, args.wait and args.until, args.timeout))


def _submit_items(args: argparse.Namespace, config: Config) -> list:
    """The prompt TEXT and every prompt of ``--file``, read by the loader `catq eval` uses
    (:mod:`catq.evaluation.formats`): only the prompts go on, never a benchmark's answers."""
    from catq.evaluation.formats import DataItem, read_data
    from catq.prompt_requests import PromptRequestError, parse_prompts

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
    from catq.prompt_requests import enqueue, idempotency_record

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
