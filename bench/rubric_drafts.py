"""How many of the anchor's rubric criteria the rubric filter keeps, on real drafts (issue 31).

    python -m catq engine --model default --port 31999 &            # one engine: policy and anchor
    python bench/rubric_drafts.py collect --url http://127.0.0.1:31999 --trials 10 --out drafts.json
    python bench/rubric_drafts.py table drafts.json

``collect`` runs each open prompt through the teacher's own code as the anchor role does:
:func:`sample_group` for the G rollouts, :func:`estimate_reference` for the synthesized reference,
then ``max(rubric_drafts, rubric_attempts)`` rubric drafts with :func:`rubric_messages` and
:data:`RUBRIC_PREFIX`, the first at the anchor's sampling and the rest at ``rubric_temperature``
(exactly :func:`draft_rubric`'s calls; all of them are written, so the stopping rule can be
replayed). Two settings: ``test`` is tests/integration/test_teacher_pipeline.py's config and open
prompt, ``demo`` is configs/demo.toml with the demo's open questions.

``table`` reads the drafts back and counts, per prompt, the criteria each draft gives before the
filter (the scanner's placeholder and length rules only) and after it (:func:`parse_criteria`
with ``drop_self_referential``),
and how many trials :func:`draft_rubric` would dead-letter either way (no usable criterion within
``rubric_attempts`` drafts). No model is needed for it, so a filter change can be re-measured on
the same drafts. ``--show`` lists each dropped criterion. ``redraft`` asks for the drafts again
from the stored references with the request shown to the anchor (``rubric_messages``'s
``question``), a candidate fallback; its file reads with ``table`` too.

bench/results/rubric_drafts.json holds the drafts measured for issue 31 (default model, CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catq.config import Config, load_config  # noqa: E402
from catq.messages import ChatMessage, Prompt, new_prompt_id  # noqa: E402
from catq.teacher.rubric import RubricParseError, normalise_criterion, parse_criteria  # noqa: E402


def test_setting(url: str) -> tuple[Config, list[str]]:
    """test_teacher_pipeline's config (written by its own helper) and its open prompt."""
    from tests.integration import test_teacher_pipeline as pipeline

    path = Path(tempfile.mkdtemp(prefix="rubric-drafts-")) / "catq.toml"
    pipeline.write_config(path, "rubric-drafts", "redis://127.0.0.1:6379", url)
    return load_config(path), [pipeline.OPEN]


def demo_setting(url: str) -> tuple[Config, list[str]]:
    """configs/demo.toml with both engines at ``url`` (and a long request timeout), and the
    demo's open questions."""
    from catq.demo import load_demo_prompts

    text = (ROOT / "configs" / "demo.toml").read_text()
    text = text.replace("http://127.0.0.1:30000", url).replace("http://127.0.0.1:30001", url)
    text = text.replace("[engines]\n", "[engines]\nrequest_timeout_s = 3600\n", 1)  # trials queue on one engine
    path = Path(tempfile.mkdtemp(prefix="rubric-drafts-")) / "demo.toml"
    path.write_text(text)
    return load_config(path), [p.text for p in load_demo_prompts() if p.task == "open"]


SETTINGS = {"test": test_setting, "demo": demo_setting}


async def one_trial(config: Config, text: str) -> dict:
    """Rollouts, reference and every rubric draft of one open prompt, through catq's own code."""
    from catq.engines.client import EngineClient
    from catq.engines.tokenizer import chat_tokenizer
    from catq.teacher.chat import engine_chat
    from catq.teacher.estimators import estimate_reference
    from catq.teacher.rollout import sample_group

    options = config.anchor
    prompt = Prompt(new_prompt_id(), "open", [ChatMessage("user", text)])
    policy = EngineClient.from_config(config.engines, config.engines.policy_urls[0])
    anchor = engine_chat(config, config.engines.anchor_url, config.model.anchor, options.sampling)
    try:
        group = await sample_group(policy, chat_tokenizer(config, config.model.policy), prompt, config)
        question = prompt.question if options.include_question else None
        ref = await estimate_reference(group, options.estimator, anchor=anchor,
                                       include_question=options.include_question, options=options)
        drafts = await all_drafts(anchor, options, ref.reference, question)
    finally:
        await policy.close()
        await anchor.close()
    return {"rollouts": [r.text for r in group.rollouts], "reference": ref.reference, "drafts": drafts}


async def all_drafts(anchor, options, reference: str, question: str | None) -> list[str]:
    """Every rubric draft draft_rubric could ask for, with its prompt, prefix and temperatures."""
    from catq.teacher.prompts import RUBRIC_PREFIX, rubric_messages

    messages = rubric_messages(reference, options.rubric_min_criteria, question)
    drafts = []
    for number in range(max(options.rubric_drafts, options.rubric_attempts)):
        temperature = options.rubric_temperature if number else None
        drafts.append(await anchor(messages, temperature=temperature, prefix=RUBRIC_PREFIX))
    return drafts


async def redraft(args) -> None:
    """The drafts again from the same references, with the request shown to the anchor (a
    candidate fallback for an anchor whose drafts give no usable criterion)."""
    from catq.teacher.chat import engine_chat

    record = json.loads(Path(args.path).read_text())
    out = {"configs": {f"{k}+question": v for k, v in record["configs"].items()}, "trials": []}
    limit = asyncio.Semaphore(args.concurrency)

    async def run(trial: dict) -> None:
        config = SETTINGS[trial["setting"]](args.url)[0]
        anchor = engine_chat(config, config.engines.anchor_url, config.model.anchor, config.anchor.sampling)
        async with limit:
            try:
                drafts = await all_drafts(anchor, config.anchor, trial["reference"], trial["prompt"])
            finally:
                await anchor.close()
        out["trials"].append({**trial, "setting": trial["setting"] + "+question", "drafts": drafts})
        Path(args.out).write_text(json.dumps(out, indent=1))
        print(f"redrafted {len(out['trials'])}/{len(record['trials'])}", flush=True)

    await asyncio.gather(*(run(t) for t in record["trials"]))


async def collect(args) -> None:
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"trials": []}
    limit = asyncio.Semaphore(args.concurrency)  # the engine batches concurrent requests

    async def run(name: str, config: Config, text: str, trial: int) -> None:
        async with limit:
            started = time.monotonic()
            result = await one_trial(config, text)
        record["trials"].append({"setting": name, "prompt": text, **result})
        out.write_text(json.dumps(record, indent=1))
        print(f"{name} trial {trial + 1}/{args.trials} ({time.monotonic() - started:.0f}s): {text[:50]}", flush=True)

    jobs = []
    for name in args.settings:
        config, texts = SETTINGS[name](args.url)
        record.setdefault("configs", {})[name] = {
            "rubric_min_criteria": config.anchor.rubric_min_criteria,
            "rubric_attempts": config.anchor.rubric_attempts, "rubric_drafts": config.anchor.rubric_drafts}
        jobs += [run(name, config, text, trial) for trial in range(args.trials) for text in texts]
    await asyncio.gather(*jobs)


def criteria(draft: str, drop_self_referential: bool) -> list[str]:
    """A draft's usable criteria as merge_drafts takes them, without or with the filter."""
    try:
        return [c for c in parse_criteria(draft, drop_self_referential=drop_self_referential)
                if normalise_criterion(c)]
    except RubricParseError:
        return []


def dead_lettered(drafts: list[list[str]], min_criteria: int, drafts_bound: int, attempts: int) -> bool:
    """Whether draft_rubric's stopping rule, replayed on each draft's usable criteria (merged as
    merge_drafts merges them), ends with no criterion at all."""
    merged: set[str] = set()
    for number, criteria in enumerate(drafts, start=1):
        merged.update(normalise_criterion(c) for c in criteria)
        if len(merged) >= min_criteria or number >= (drafts_bound if merged else attempts):
            break
    return not merged


def table(args) -> None:
    record = json.loads(Path(args.path).read_text())
    rows: dict[tuple[str, str], dict] = {}
    for trial in record["trials"]:
        config = record["configs"][trial["setting"]]
        row = rows.setdefault((trial["setting"], trial["prompt"]), {
            "trials": 0, "drafts": 0, "before": 0, "after": 0, "empty_before": 0, "empty_after": 0,
            "dead_before": 0, "dead_after": 0, "dropped": []})
        before = [criteria(d, False) for d in trial["drafts"]]
        after = [criteria(d, True) for d in trial["drafts"]]
        row["trials"] += 1
        row["drafts"] += len(before)
        row["before"] += sum(map(len, before))
        row["after"] += sum(map(len, after))
        row["empty_before"] += sum(not b for b in before)
        row["empty_after"] += sum(not a for a in after)
        rule = (config["rubric_min_criteria"], config["rubric_drafts"], config["rubric_attempts"])
        row["dead_before"] += dead_lettered(before, *rule)
        row["dead_after"] += dead_lettered(after, *rule)
        row["dropped"] += [c for b, a in zip(before, after) for c in b if c not in a]
    print("| setting | prompt | trials | drafts | criteria before | after | drafts with none before | after "
          "| dead-lettered before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (setting, prompt), r in rows.items():
        print(f"| {setting} | {prompt[:40]} | {r['trials']} | {r['drafts']} | {r['before']} | {r['after']} "
              f"| {r['empty_before']} | {r['empty_after']} | {r['dead_before']} | {r['dead_after']} |")
    if args.show:
        for (setting, prompt), r in rows.items():
            print(f"\n{setting}: {prompt[:60]} — dropped:")
            for criterion in r["dropped"]:
                print(f"  - {criterion}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="drafts from a running engine")
    c.add_argument("--url", required=True)
    c.add_argument("--trials", type=int, default=10, help="per prompt")
    c.add_argument("--concurrency", type=int, default=4, help="trials at a time")
    c.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["test", "demo"])
    c.add_argument("--out", default="rubric_drafts.json", help="appended to when it exists")
    t = sub.add_parser("table", help="criteria kept before/after the filter")
    t.add_argument("path")
    t.add_argument("--show", action="store_true", help="list the dropped criteria")
    r = sub.add_parser("redraft", help="the drafts again from the same references, the request shown")
    r.add_argument("path")
    r.add_argument("--url", required=True)
    r.add_argument("--concurrency", type=int, default=4)
    r.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "collect":
        asyncio.run(collect(args))
    elif args.command == "redraft":
        asyncio.run(redraft(args))
    else:
        table(args)


if __name__ == "__main__":
    main()
