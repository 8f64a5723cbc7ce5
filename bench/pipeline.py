"""Rollouts per second, end to end: catq's pipeline against TRL's GRPOTrainer on the same workload.

    pip install -e '.[bench]'          # TRL 1.16.0 (not a core dependency)
    python bench/pipeline.py --compare-resources                     # the full run
    python bench/pipeline.py --smoke                                  # a few minutes

The workload, the same for every arm: 16 single-digit arithmetic questions (fixed: a seeded RNG,
:func:`arithmetic_prompts`), the default model (SmolLM2-135M-Instruct), G=8 completions of at most
48 new tokens at temperature 0.7 (top-p 0.8, top-k 20: configs/demo.toml's [rollout.math]), reward
= agreement with the group's majority final answer (catq's own answer extraction and vote, so both
arms score a group alike), no KL term, learning rate 1e-6, one group (1 prompt x G) per optimizer
step, one pass over the questions:

  catq   `catq up` on configs/demo.toml with the above (``anchor.estimator = "majority"``,
         ``learner.batch_groups = 1``, ``learner.lr = 1e-6``; the demo's ``kl_coef = 0`` and its
         checkpoint and weight publication after every step are kept): engines, rollout, anchor,
         judge, learner and syncer as separate processes over Redis, in-process through
         :class:`catq.launcher.Stack`. The clock starts when the questions are submitted (the
         stack is up, every model loaded) and stops when every question's group has been handled
         by the learner: trained (counted from metrics.jsonl as soon as its step's line is written,
         before the checkpoint) or set aside (status ``set_aside``: no signal, or stale).
  trl    ``trl.GRPOTrainer`` (``use_vllm=False``, ``beta=0``, ``per_device_train_batch_size =
         num_generations = G``, ``gradient_accumulation_steps=1``, one epoch) in this process on
         the CPU; the clock times ``trainer.train()`` only (model and trainer built before).
         Settings TRL 1.16 defaults differently from catq's learner are set to catq's: constant
         learning rate, plain AdamW, no gradient checkpointing (TRL's default would recompute
         every forward), the same top-p/top-k; its loss is "dapo" (mean over every completion
         token of the batch, as catq's).

Rate = rollouts (questions x G) / seconds, for both; the script prints each arm's rollouts,
seconds, steps and rollouts/s, then ``ratio catq/trl``. Goal: >= 1.5. What the ratio shows: the
pipeline overlaps generation (its own engine, continuous batching) with training and skips
groups with no signal, where TRL generates with ``model.generate`` and trains every group in turn.
On a 2-core CPU every process shares the same two cores, so the overlap can help only so much.

Two more catq arms, each compared with the same TRL run:

  synthesis            ``anchor.estimator = "synthesis"``: the anchor engine writes a reference
                       from the G answers for every group (skip with ``--no-synthesis``).
  --lora               the majority arm again with ``[learner.lora] enabled = true`` (an adapter
                       with [learner.lora]'s defaults is trained, published and served instead of
                       every weight); prints ``lora: X rollouts/s, ratio lora/full Y`` against the
                       majority arm of the same run. ``--no-trl`` skips the TRL arm (no extra).
  --compare-resources  the majority arm again with ``[resources] enabled = false``: `catq up`
                       gives no child a thread count, so every engine and the learner run torch's
                       default (every core) and oversubscribe the machine; prints ``resources:
                       allocated X rollouts/s, unallocated Y rollouts/s, ratio X/Y``. An
                       OMP_NUM_THREADS in this shell reaches the unallocated children: unset it.

TRL install (2026-12, this repository's CPU environment): ``pip install --dry-run trl==1.16.0``
adds only trl, datasets, dill, multiprocess, pandas, pyarrow and xxhash and leaves torch 2.13.0
(CPU) and transformers 5.25.0 alone, so the extra pins trl alone, without ``--no-deps``.

Each catq arm writes its run (stack.log, metrics.jsonl) under ``--out``/<arm>/; its checkpoints
and published weights (GBs) are deleted once measured.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import write_catq_config  # noqa: E402
from catq.config import Config, load_config  # noqa: E402
from catq.demo import DemoPrompt, fetch_results, submit  # noqa: E402
from catq.evaluation.command import free_port  # noqa: E402
from catq.evaluation.runner import read_metrics  # noqa: E402
from catq.launcher import Stack  # noqa: E402
from catq.results import Status  # noqa: E402
from catq.teacher.answers import answers_equivalent, final_answer  # noqa: E402
from catq.teacher.estimators import majority_vote  # noqa: E402

LR = 1e-6
POLL_S = 0.5
"""How often the catq arm looks for handled groups: the clock's resolution."""
PROGRESS_S = 15.0
SEED = 0


@dataclass
class Arm:
    name: str
    rollouts: int
    seconds: float
    steps: int
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.rollouts / self.seconds

    def line(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return (f"{self.name:<16} {self.rollouts:4d} rollouts in {self.seconds:7.1f}s, {self.steps:3d} steps"
                f"{detail}: {self.rate:.3f} rollouts/s")


def arithmetic_prompts(n: int, seed: int = SEED) -> list[str]:
    """``n`` single-digit questions in the bundled eval set's wording (catq/data/eval_single_digit.jsonl)."""
    rng = random.Random(seed)
    return [f"What is {rng.randint(1, 9)} {rng.choice('+-*')} {rng.randint(1, 9)}? "
            "Put your final answer in \\boxed{}." for _ in range(n)]


# ---- catq ---------------------------------------------------------------------------------


def write_arm_config(out: Path, args, estimator: str, allocate: bool, lora: bool = False) -> Path:
    """configs/demo.toml (via bench/learning.py's writer: run dir, G, free engine ports) with this
    benchmark's workload; the workers read the file, so every change must be in it. The arm's
    directory is emptied first: a learner would resume from a checkpoint left there, and its
    metrics.jsonl would count old steps."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    path = write_catq_config(out, args.group_size, (free_port(), free_port()))
    text = path.read_text()
    for old, new in (("lr = 1e-5", f"lr = {LR}"), ("batch_groups = 2     # 2 prompts x G=8", "batch_groups = 1     # 1 prompt x G"),
                     ('estimator = "majority"', f'estimator = "{estimator}"'),
                     ("max_new_tokens = 48", f"max_new_tokens = {args.max_new_tokens}")):
        if old not in text:
            raise SystemExit(f"configs/demo.toml changed: {old!r} not found; update bench/pipeline.py")
        text = text.replace(old, new, 1)
    # ingest is idle here (prompts go straight to Redis) but binds a port: a free one, so a stack
    # another job runs on this machine cannot collide with it
    text += f"\n[ingest]\nport = {free_port()}\n"
    if not allocate:
        text += "\n[resources]\nenabled = false\n"
    if lora:
        text += "\n[learner.lora]\nenabled = true\n"
    path.write_text(text)
    return path


def handled(metrics: list[dict], results: list[dict]) -> tuple[int, Counter]:
    """Groups the learner is done with: those in a step's metrics line (trained, or in the batch
    without signal) plus prompts it set aside or that died; and the fates, for the report."""
    trained = sum(m.get("groups_used", 0) + m.get("groups_skipped", 0) for m in metrics)
    fates = Counter(r.get("status") for r in results if r.get("status") in (Status.SET_ASIDE, Status.DEAD))
    fates["trained"] = trained
    return trained + fates[Status.SET_ASIDE] + fates[Status.DEAD], fates


async def run_catq(name: str, config_path: Path, prompts: list[str], args) -> Arm:
    config = load_config(config_path, run=f"bench-pipeline-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    check_workload(config, args)
    items = [DemoPrompt(text, "math", None) for text in prompts]
    log_path = config.run_path.parent / "stack.log"
    print(f"{name}: starting the stack (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        async with Stack(config, str(config_path), out=log):
            print(f"{name}: stack is up; submitting {len(items)} questions", flush=True)
            started = time.monotonic()
            await submit(config, items)
            done, fates = await wait_handled(config, items, started, name, args.arm_timeout_s)
            seconds = time.monotonic() - started
    steps = len(read_metrics(config))
    drop_checkpoints(config)
    if done < len(items):
        raise SystemExit(f"{name}: only {done}/{len(items)} groups handled in {args.arm_timeout_s:.0f}s; "
                         f"see {log_path}")
    detail = (f"{fates['trained']} groups trained, {fates[Status.SET_ASIDE]} set aside"
              + (f", {fates[Status.DEAD]} dead" if fates[Status.DEAD] else ""))
    return Arm(name, len(items) * args.group_size, seconds, steps, detail)


async def wait_handled(config: Config, items: list[DemoPrompt], started: float, name: str,
                       timeout_s: float) -> tuple[int, Counter]:
    """Poll until every group is handled (or the timeout); a progress line now and then."""
    next_progress = started + PROGRESS_S
    while True:
        done, fates = handled(read_metrics(config), await fetch_results(config, items))
        now = time.monotonic()
        if done >= len(items) or now - started > timeout_s:
            return done, fates
        if now >= next_progress:
            next_progress = now + PROGRESS_S
            print(f"{name}: [{now - started:6.0f}s] {done}/{len(items)} groups handled "
                  f"({fates['trained']} trained, {fates[Status.SET_ASIDE]} set aside)", flush=True)
        await asyncio.sleep(POLL_S)


def check_workload(config: Config, args) -> None:
    """The config the stack runs is the workload the docstring states (demo.toml could drift)."""
    math, learner = config.rollout.math, config.learner
    assert config.rollout.group_size == args.group_size and math.max_new_tokens == args.max_new_tokens
    assert (math.temperature, learner.kl_coef, learner.lr, learner.batch_groups) == (0.7, 0.0, LR, 1), \
        "configs/demo.toml changed: update bench/pipeline.py"


def drop_checkpoints(config: Config) -> None:
    """The learner checkpoints and publishes after every step: GBs per arm, not needed here."""
    for directory in (config.checkpoint_dir, config.weights_dir):
        shutil.rmtree(directory, ignore_errors=True)


# ---- TRL ----------------------------------------------------------------------------------


def majority_agreement(prompts, completions, qid, **_) -> list[float]:
    """TRL reward function: 1.0 for a completion whose final answer agrees with its group's
    majority answer, else 0.0. Exactly catq's majority estimator and math judge
    (catq.teacher.estimators.majority_reference, then catq.teacher.judging.score_math), per
    question (``qid``: the dataset column, one per completion)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(qid):
        groups.setdefault(q, []).append(i)
    rewards = [0.0] * len(texts)
    for members in groups.values():
        answers = [final_answer(texts[i]) for i in members]
        winners = majority_vote(answers)
        reference = answers[winners[0]] if winners else None
        for i, answer in zip(members, answers):
            rewards[i] = 1.0 if answers_equivalent(reference, answer) else 0.0
    return rewards


def run_trl(prompts: list[str], config: Config, args) -> Arm:
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        raise SystemExit("the TRL arm needs the bench extra: pip install -e '.[bench]'") from None
    from catq.engines.models import load_causal_lm
    from catq.engines.tokenizer import ChatTokenizer

    math = config.rollout.math
    model = load_causal_lm(config.model.policy, cache_dir=config.model.cache_dir or None)
    tokenizer = ChatTokenizer(config.model.policy, config.model.cache_dir or None).tokenizer
    # one user message, chat-templated by TRL with the model's template, as catq's rollout role does
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": text}], "qid": i}
                                 for i, text in enumerate(prompts)])
    with tempfile.TemporaryDirectory(prefix="catq-bench-trl-") as output_dir:
        trl_args = GRPOConfig(
            output_dir=output_dir, use_cpu=True, use_vllm=False, report_to=[], bf16=False, fp16=False,
            logging_steps=1, save_strategy="no", seed=SEED, num_train_epochs=1,
            per_device_train_batch_size=args.group_size, num_generations=args.group_size,
            gradient_accumulation_steps=1, max_completion_length=args.max_new_tokens,
            temperature=math.temperature, top_p=math.top_p, top_k=math.top_k,
            beta=0.0, learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch",
            weight_decay=0.0, max_grad_norm=config.learner.max_grad_norm, epsilon=config.learner.clip_eps,
            loss_type="dapo", scale_rewards="group", gradient_checkpointing=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=[majority_agreement], args=trl_args,
                              train_dataset=dataset, processing_class=tokenizer)
        print(f"trl: GRPOTrainer ready; training on {len(prompts)} questions", flush=True)
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        steps = trainer.state.global_step
    return Arm("trl", len(prompts) * args.group_size, seconds, steps, "every group trained")


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-synthesis", action="store_true", help="skip the synthesis-estimator arm")
    parser.add_argument("--lora", action="store_true", help="also run the majority arm with a LoRA policy")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL arm (no ratio catq/trl)")
    parser.add_argument("--compare-resources", action="store_true",
                        help="also run the majority arm with [resources] enabled = false")
    parser.add_argument("--smoke", action="store_true",
                        help="--prompts 2 --group-size 4 --max-new-tokens 8 --no-synthesis")
    parser.add_argument("--arm-timeout-s", type=float, default=3600.0,
                        help="give up on a catq arm whose groups are not all handled by then")
    parser.add_argument("--out", default=f"/tmp/catq-bench-pipeline-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompts, args.group_size, args.max_new_tokens, args.no_synthesis = 2, 4, 8, True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    prompts = arithmetic_prompts(args.prompts)
    print(f"workload: {len(prompts)} questions x G={args.group_size}, {args.max_new_tokens} new tokens, "
          f"lr {LR}, 1 group per step; out {out}", flush=True)

    arms = [("catq", "majority", True, False)]
    if not args.no_synthesis:
        arms.append(("synthesis", "synthesis", True, False))
    if args.lora:
        arms.append(("lora", "majority", True, True))
    if args.compare_resources:
        arms.append(("unallocated", "majority", False, False))
    catq: dict[str, Arm] = {}
    for name, estimator, allocate, lora in arms:
        config_path = write_arm_config(out / name, args, estimator, allocate, lora)
        catq[name] = asyncio.run(run_catq(name, config_path, prompts, args))
        print(catq[name].line(), flush=True)
    trl = None if args.no_trl else run_trl(prompts, load_config(out / "catq" / "catq.toml"), args)

    print()
    for arm in (*catq.values(), *([trl] if trl else [])):
        print(arm.line())
    if trl:
        print(f"ratio catq/trl {catq['catq'].rate / trl.rate:.2f}")
    if "lora" in catq:
        print(f"lora: {catq['lora'].rate:.3f} rollouts/s, ratio lora/full {catq['lora'].rate / catq['catq'].rate:.2f}")
    if "synthesis" in catq and trl:
        print(f"synthesis: {catq['synthesis'].rate:.3f} rollouts/s, ratio to trl "
              f"{catq['synthesis'].rate / trl.rate:.2f}")
    if "unallocated" in catq:
        allocated, unallocated = catq["catq"].rate, catq["unallocated"].rate
        print(f"resources: allocated {allocated:.3f} rollouts/s, unallocated {unallocated:.3f} rollouts/s, "
              f"ratio {allocated / unallocated:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
