"""Learning per minute: catq's asynchronous pipeline against a minimal synchronous GRPO loop.

    python bench/learning.py                          # 10 minutes of training per arm, 40 held-out
    python bench/learning.py --budget-s 120 --max-steps 2 --held-out 4 --group-size 4   # smoke

Both arms start from the same model (the config's policy: the default one), train on the same
questions (the training half of :func:`catq.evaluation.datasets.training_split`, questions only)
with the same reward (agreement with the group's majority answer), G, sampling settings, prompts
per step and learning rate, for the same wall-clock budget:

  catq   `catq up` on configs/demo.toml (majority estimator, 2 groups per step, no KL): engines,
         rollout, anchor, judge, learner and syncer as separate processes over Redis; the clock
         starts when the questions are submitted and stops when the budget is spent or the
         learner has taken ``--max-steps``. Start-up and model loading are not counted.
  sync   bench/minimal_grpo.py: generate, score, one on-policy step, repeat, in one process;
         the clock starts after the model is loaded.

Then one policy engine evaluates v0, catq's final weights and the sync loop's final weights on
the same held-out problems with `catq eval`'s code (single-sample accuracy over G samples, 95%
intervals, paired differences), and the script prints each arm's gain and ``ratio catq/sync`` of
the gains. On a 2-core CPU both arms compete for the same cores, so the pipeline's overlap of
generation and training cannot help much; what this catches is a pipeline that learns less per
minute than the loop because of staleness, dropped groups or idle stages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.minimal_grpo import print_batch, train_minimal_grpo  # noqa: E402
from catq.config import load_config  # noqa: E402
from catq.demo import DemoPlan, DemoPrompt, submit, watch_training  # noqa: E402
from catq.evaluation.command import evaluate, free_port  # noqa: E402
from catq.evaluation.datasets import to_jsonl, training_split  # noqa: E402
from catq.evaluation.report import render  # noqa: E402
from catq.evaluation.runner import read_metrics  # noqa: E402
from catq.launcher import Stack  # noqa: E402
from catq.learner.publish import published_versions, version_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.toml"


def write_catq_config(out: Path, group_size: int, ports: tuple[int, int]) -> Path:
    """configs/demo.toml with this run's directory, G and engine ports (the workers read the file,
    so the changes must be in it)."""
    text = DEMO_CONFIG.read_text()
    for old, new in (('run_dir = "runs/{run}"', f'run_dir = "{out / "catq"}"'),
                     ("group_size = 8", f"group_size = {group_size}"),
                     ("30000", str(ports[0])), ("30001", str(ports[1]))):
        if old not in text:
            raise SystemExit(f"configs/demo.toml changed: {old!r} not found; update bench/learning.py")
        text = text.replace(old, new)
    path = out / "catq.toml"
    path.write_text(text)
    return path


async def train_catq(config_path: Path, train: list[dict], args) -> tuple[Path, int, float]:
    """(final weights, learner steps, training seconds) of the pipeline."""
    config = load_config(config_path, run=f"bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")
    plan = DemoPlan(steps=args.max_steps, train_s=args.budget_s)
    with open(config.run_path.parent / "stack.log", "w") as log:
        async with Stack(config, str(config_path), out=log):
            started = time.monotonic()
            await submit(config, [DemoPrompt(p["text"], "math", None) for p in train])
            await watch_training(config, plan, [], sys.stdout)
            elapsed = time.monotonic() - started
    published = published_versions(config.weights_dir)
    if not published:
        raise SystemExit("catq arm: the learner published no version; see stack.log")
    return version_dir(config.weights_dir, published[-1]), len(read_metrics(config)), elapsed


def measure(config_path: Path, held_out: Path, weights: list[Path], args, out: Path) -> dict:
    config = load_config(config_path, run="bench-learning-eval")
    eval_args = argparse.Namespace(data=str(held_out), group_size=args.group_size, estimators="majority",
                                   versions=",".join(["0", *map(str, weights)]), limit=None, concurrency=8,
                                   use_stack=False, scaling=False)
    return asyncio.run(evaluate(eval_args, config, out / "eval"))


def labelled(link: Path, weights: Path) -> Path:
    """A link named after the arm: `catq eval` labels a weight directory by its name."""
    link.unlink(missing_ok=True)
    link.symlink_to(weights.resolve(), target_is_directory=True)
    return link


def gain_line(name: str, diff: dict, steps: int, seconds: float) -> str:
    d = diff["difference"]
    return (f"{name:<5} {steps:>3} steps in {seconds:5.0f}s   single {diff['single_from']['value']:.2f} -> "
            f"{diff['single_to']['value']:.2f}   gain {d['value']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=600.0, help="training wall time per arm")
    parser.add_argument("--max-steps", type=int, help="also stop each arm after this many steps")
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--out", default=f"/tmp/catq-bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = training_split(args.held_out)
    held_out_path = out / "held_out.jsonl"
    held_out_path.write_text(to_jsonl(held_out))
    config_path = write_catq_config(out, args.group_size, (free_port(), free_port()))
    config = load_config(config_path)
    math = config.rollout.math

    print(f"catq arm: {args.budget_s:.0f}s budget, G={args.group_size}, {len(train)} training questions")
    catq_weights, catq_steps, catq_s = asyncio.run(train_catq(config_path, train, args))
    print(f"sync arm: {args.budget_s:.0f}s budget")
    sync = train_minimal_grpo(
        config.model.policy, [p["text"] for p in train], budget_s=args.budget_s, out_dir=out / "sync",
        group_size=args.group_size, prompts_per_step=config.learner.batch_groups, lr=config.learner.lr,
        max_new_tokens=math.max_new_tokens, temperature=math.temperature, top_p=math.top_p,
        top_k=math.top_k, max_steps=args.max_steps, cache_dir=config.model.cache_dir or None,
        log=print_batch)

    print(f"evaluating v0, catq and sync on {len(held_out)} held-out problems...")
    arms = [labelled(out / "catq-final", catq_weights), labelled(out / "sync-final", sync.weights_dir)]
    results = measure(config_path, held_out_path, arms, args, out)
    (out / "eval" / "results.json").write_text(json.dumps(results, indent=1))
    (out / "report.txt").write_text(render(results))
    catq_diff, sync_diff = results["differences"]
    print(render(results))
    print(gain_line("catq", catq_diff, catq_steps, catq_s))
    print(gain_line("sync", sync_diff, sync.steps, sync.elapsed_s))
    sync_gain = sync_diff["difference"]["value"]
    ratio = catq_diff["difference"]["value"] / sync_gain if sync_gain else float("nan")
    print(f"ratio catq/sync (gain in held-out single-sample accuracy) {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
