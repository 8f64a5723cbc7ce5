"""CaT-RL against TTRL: does the anchor's synthesized reference teach better than the vote?

    python bench/cat_rl.py --budget-s 900 --out bench/results/cat_rl_135m.json      # default model
    python bench/cat_rl.py --model /work/models/qwen05 --budget-s 1800 --out cat_rl_q05.json
    python bench/cat_rl.py --resume DIR --out ...      # continue a stopped run where it was
    python bench/cat_rl.py --smoke --dir DIR --out DIR/table.json                    # a test

Three arms on the same budget (``--budget-s`` of training wall clock, ``--max-steps`` learner
steps, whichever comes first), from the same model, which is also the frozen anchor:

  cat   `catq up` with ``anchor.estimator = "synthesis"``: reward = agreement with the anchor's
        synthesized reference (CaT).
  ttrl  the same with ``"majority"``: reward = agreement with the group's majority answer (TTRL).
  none  no training: its final policy is v0, so its gain is 0 by construction.

Both training arms run configs/demo.toml (via bench/learning.py's writer) with the same G,
sampling, lr, KL, batch, seed and anchor prompt, and get the same training questions, in the same
order, *without their answers* (two-step word problems from :mod:`catq.evaluation.wordgen`).
The known answers stay in the benchmark's directory: they are read only to score, afterwards,

  reward accuracy     the share of training rollouts whose reward equals their true correctness
  reference accuracy  the share of training groups whose reference answer is right

from each training group as the pipeline recorded it (the per-prompt results in Redis, saved to
``<dir>/<arm>/groups.jsonl``), and to evaluate v0 and each arm's final policy on the held-out
questions with `catq eval`'s code (single-sample accuracy over G samples, 95% intervals, paired
differences). Prints one table and ``ratio cat/ttrl`` of the single-sample gains; writes the
table as JSON to ``--out``, a PNG of training-rollout accuracy (by known answers) over learner
steps for both arms next to it, and everything else under ``--dir``.

A stopped run continues with ``--resume DIR``: a finished arm is kept, an unfinished one restarts
its stack on the same run (the learner resumes from its last checkpoint; the questions already
in the run's prompt stream are not submitted again, so their order is unchanged) with the
training time it has left.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import labelled, write_catq_config  # noqa: E402
from catq.config import load_config  # noqa: E402
from catq.demo import DemoPrompt, fetch_results, submit  # noqa: E402
from catq.evaluation.command import evaluate, free_port  # noqa: E402
from catq.evaluation.datasets import to_jsonl  # noqa: E402
from catq.evaluation.records import is_correct  # noqa: E402
from catq.evaluation.runner import read_metrics  # noqa: E402
from catq.evaluation.stats import mean_interval  # noqa: E402
from catq.evaluation.wordgen import word_split  # noqa: E402
from catq.launcher import Stack  # noqa: E402
from catq.learner.publish import published_versions, version_dir  # noqa: E402

ARMS = {"cat": "synthesis", "ttrl": "majority"}
"""Training arm -> anchor.estimator."""
POLL_S = 10.0
REQUEST_TIMEOUT_S = 3600.0
"""Per engine call: on a CPU shared with other jobs a group of G long rollouts can take minutes,
and a call that times out is retried from scratch (the default 300 s lost whole groups)."""
SMOKE = {"budget_s": 900.0, "max_steps": 2, "train": 24, "held_out": 3, "group_size": 4,
         "max_new_tokens": 40, "batch_groups": 1, "anchor_tokens": 48, "parallel": True, "poll_s": 2.0}
"""The cheapest run that still takes two learner steps per arm through the real stack (both arms
side by side: a test's wall time is what it costs)."""


# ---- settings and state ---------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="policy = anchor: 'default' or an HF directory")
    parser.add_argument("--budget-s", type=float, help="training wall time per arm (default 900; "
                        "with --resume: a new, larger budget continues finished arms too)")
    parser.add_argument("--max-steps", type=int, help="learner steps per arm, at most (default 200)")
    parser.add_argument("--train", type=int, default=300, help="training questions submitted per arm")
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="data split and learner seed")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int,
                        help="samples per held-out question in the evaluation (default: --group-size)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="rollout tokens (math)")
    parser.add_argument("--anchor-tokens", type=int, default=128, help="anchor synthesis tokens")
    parser.add_argument("--batch-groups", type=int, default=2, help="prompts (groups) per learner step")
    parser.add_argument("--micro-batch", type=int, help="learner.micro_batch_rollouts (default: the config's 8); "
                        "at 0.5B a micro-batch of 8 x 300 tokens holds ~8 GB of activations")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--anchor-prompt", default="", help="anchor.prompt (default: the config's)")
    parser.add_argument("--no-background-commit", action="store_true",
                        help="learner.background_commit = false (saves a host copy of the weights)")
    parser.add_argument("--lora", action="store_true",
                        help="train a LoRA adapter ([learner.lora] with its defaults) instead of every weight: "
                             "a 0.5B model's full fine-tune needs ~10 GB a learner, an adapter's ~3 GB")
    parser.add_argument("--parallel", action="store_true",
                        help="train both arms at the same time, so they share whatever load the machine has")
    parser.add_argument("--poll-s", type=float, default=POLL_S, help="how often an arm checks its budget")
    parser.add_argument("--dir", help="work directory (default /tmp/catq-cat-rl-<time>)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR with its settings")
    parser.add_argument("--out", help="the table as JSON (default <dir>/cat_rl.json)")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny run for a test: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def settings(args: argparse.Namespace) -> tuple[Path, argparse.Namespace]:
    """(work directory, the run's settings): fresh ones, or those saved by the run resumed."""
    if args.resume:
        directory = Path(args.resume).resolve()
        saved = json.loads((directory / "args.json").read_text())
        extended = {k: getattr(args, k) for k in ("budget_s", "max_steps", "micro_batch") if getattr(args, k) is not None}
        saved.update(out=args.out or saved.get("out"), resume=str(directory), **extended)
        (directory / "args.json").write_text(json.dumps(saved, indent=1))
        return directory, argparse.Namespace(**saved)
    args.budget_s = 900.0 if args.budget_s is None else args.budget_s
    args.max_steps = 200 if args.max_steps is None else args.max_steps
    directory = Path(args.dir or f"/tmp/catq-cat-rl-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "args.json").write_text(json.dumps(vars(args), indent=1))
    return directory, args


def write_data(directory: Path, args) -> None:
    """train.jsonl (with answers: the benchmark's copy, never submitted) and held_out.jsonl."""
    if (directory / "held_out.jsonl").exists():
        return
    train, held_out = word_split(args.train, args.held_out, args.seed)
    (directory / "train.jsonl").write_text(to_jsonl([i.record() for i in train]))
    (directory / "held_out.jsonl").write_text(to_jsonl([i.record() for i in held_out]))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class ArmState:
    """What survives a stop: saved to ``<dir>/<arm>/state.json`` after every poll."""

    run: str
    prompt_ids: list[str] = field(default_factory=list)
    """The submitted training questions' ids, in submission order ([] before submitting)."""
    trained_s: float = 0.0
    """Training wall time spent so far (stack start-up not counted)."""
    done: bool = False
    peak_rss_mb: float = 0.0
    """Largest total resident memory of the stack's processes seen at a poll."""
    peak_process_rss_mb: float = 0.0
    """Largest single process (the learner, as a rule)."""

    @staticmethod
    def load(path: Path, run: str) -> ArmState:
        return ArmState(**json.loads(path.read_text())) if path.exists() else ArmState(run)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))


# ---- one training arm -----------------------------------------------------------------------

def set_key(text: str, section: str, key: str, value: str) -> str:
    """``key = value`` in ``[section]`` of a TOML text: replaced where present, else added."""
    header = f"[{section}]\n"
    start = text.index(header) + len(header)
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    body, line = text[start:end], f"{key} = {value}"
    pattern = re.compile(rf"^{re.escape(key)} = .*$", re.M)
    body = pattern.sub(line, body, count=1) if pattern.search(body) else f"{line}\n{body}"
    return text[:start] + body + text[end:]


def write_arm_config(arm_dir: Path, args, estimator: str, run: str) -> Path:
    """configs/demo.toml with this arm's run, estimator and the shared settings; written again at
    every (re)start, for fresh engine ports."""
    path = write_catq_config(arm_dir, args.group_size, (free_port(), free_port()))
    text = path.read_text().replace('run = "demo"', f'run = "{run}"')
    if args.model != "default":
        text = text.replace('"default"', json.dumps(str(Path(args.model).resolve())))
    for section, key, value in (
            ("engines", "request_timeout_s", REQUEST_TIMEOUT_S),
            ("rollout.math", "max_new_tokens", args.max_new_tokens),
            ("anchor", "estimator", json.dumps(estimator)),
            ("anchor.sampling", "max_new_tokens", args.anchor_tokens),
            ("learner", "lr", args.lr), ("learner", "kl_coef", args.kl_coef),
            ("learner", "batch_groups", args.batch_groups), ("learner", "max_steps", args.max_steps),
            ("learner", "seed", args.seed),
            ("learner", "background_commit", "false" if args.no_background_commit else "true")):
        text = set_key(text, section, key, str(value))
    if args.anchor_prompt:
        text = set_key(text, "anchor", "prompt", json.dumps(args.anchor_prompt))
    text += f"\n[ingest]\nport = {free_port()}\n"  # idle here, but it binds a port
    if getattr(args, "micro_batch", None):
        text = set_key(text, "learner", "micro_batch_rollouts", str(args.micro_batch))
    if getattr(args, "lora", False):
        text += "\n[learner.lora]\nenabled = true\n"
    path.write_text(text)
    return path


async def train_arm(arm: str, directory: Path, args) -> ArmState:
    arm_dir = directory / arm
    arm_dir.mkdir(exist_ok=True)
    state_path = arm_dir / "state.json"
    state = ArmState.load(state_path, run=f"cat-rl-{arm}-{time.strftime('%Y%m%d-%H%M%S')}")
    if state.done and not budget_left(state, arm_dir, args):
        return state
    (directory / "eval" / "results.json").unlink(missing_ok=True)  # measured before this training
    config_path = write_arm_config(arm_dir, args, ARMS[arm], state.run)
    config = load_config(config_path)
    print(f"{arm}: starting the stack (run {state.run}, log {arm_dir / 'stack.log'})", flush=True)
    with open(arm_dir / "stack.log", "a") as log:
        async with Stack(config, str(config_path), out=log) as stack:
            if not state.prompt_ids:
                state.prompt_ids = await submit_questions(config, directory)
                state.save(state_path)
            await watch(arm, stack, args, state, state_path)
    state.done = True
    state.save(state_path)
    save_groups(arm_dir, await fetch_results(config, prompts_of(state)))
    return state


def budget_left(state: ArmState, arm_dir: Path, args) -> bool:
    """Whether a finished arm has time and steps left (a resume with a larger budget)."""
    steps = len(read_metrics(load_config(arm_dir / "catq.toml")))
    return state.trained_s < args.budget_s and steps < args.max_steps


async def submit_questions(config, directory: Path) -> list[str]:
    """The training questions, questions only, in file order; their ids."""
    prompts = [DemoPrompt(p["text"], "math", None) for p in read_jsonl(directory / "train.jsonl")]
    await submit(config, prompts)
    return [p.prompt_id for p in prompts]


def prompts_of(state: ArmState) -> list[DemoPrompt]:
    return [DemoPrompt("", "math", None, prompt_id) for prompt_id in state.prompt_ids]


async def watch(arm: str, stack: Stack, args, state: ArmState, state_path: Path) -> None:
    """Until the arm's budget (time left, or learner steps) is spent; saves the state each poll."""
    resumed_at, started = state.trained_s, time.monotonic()
    while True:
        await asyncio.sleep(getattr(args, "poll_s", POLL_S))
        state.trained_s = resumed_at + time.monotonic() - started
        note_memory(state, stack)
        state.save(state_path)
        metrics = read_metrics(stack.config)
        reward = metrics[-1]["reward_mean"] if metrics else float("nan")
        print(f"{arm}: [{state.trained_s:6.0f}s] learner step {len(metrics)}/{args.max_steps}  "
              f"reward {reward:.2f}  stack RSS {state.peak_rss_mb:.0f} MB peak", flush=True)
        if len(metrics) >= args.max_steps or state.trained_s >= args.budget_s:
            return
        if await all_groups_final(stack.config, state):
            print(f"{arm}: every training group is trained or set aside; nothing left to learn from", flush=True)
            return


async def all_groups_final(config, state: ArmState) -> bool:
    """Whether every submitted question's group has ended (trained, set aside or dead): the
    learner can take no further step, so waiting out the budget would only idle."""
    from catq.results import Status

    final = (Status.TRAINED, Status.SET_ASIDE, Status.DEAD)
    results = await fetch_results(config, prompts_of(state))
    return bool(results) and all(r.get("status") in final for r in results)


def note_memory(state: ArmState, stack: Stack) -> None:
    """Resident memory of this arm's engines and roles (and their children), not the other arm's."""
    import psutil

    sizes = []
    for child in [stack.redis_child, *stack.engines, *(c for cs in stack.roles.values() for c in cs)]:
        if child is None or child.process is None:
            continue
        try:
            process = psutil.Process(child.process.pid)
            sizes += [p.memory_info().rss / 2**20 for p in (process, *process.children(recursive=True))]
        except psutil.Error:
            continue  # a process that just exited
    if sizes:
        state.peak_rss_mb = max(state.peak_rss_mb, sum(sizes))
        state.peak_process_rss_mb = max(state.peak_process_rss_mb, max(sizes))


def save_groups(arm_dir: Path, results: list[dict]) -> None:
    """The per-prompt results (rollouts, answers, rewards, reference) as the pipeline wrote them."""
    (arm_dir / "groups.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def final_weights(directory: Path, arm: str) -> Path | None:
    """The arm's newest published version (a link named after the arm); None when the learner
    published none in the budget (its final policy is then v0)."""
    config = load_config(directory / arm / "catq.toml")
    published = published_versions(config.weights_dir)
    if not published:
        print(f"{arm}: the learner published no version in the budget; its final policy is v0", flush=True)
        return None
    return labelled(directory / f"{arm}-final", version_dir(config.weights_dir, published[-1]))


# ---- what the training groups show (known answers, read only here) ---------------------------

def answer_key(directory: Path, state: ArmState) -> dict[str, str]:
    """prompt id -> known answer: the submitted ids are in train.jsonl's order."""
    answers = [p["answer"] for p in read_jsonl(directory / "train.jsonl")]
    return dict(zip(state.prompt_ids, answers, strict=True))


def scored_groups(groups: list[dict]) -> list[dict]:
    return [g for g in groups if g.get("rewards") and g.get("rollout_answers")]


def rollout_correctness(group: dict, known: str) -> list[bool]:
    return [is_correct(a, known) for a in group["rollout_answers"]]


def reward_accuracy(groups: list[dict], key: dict[str, str]) -> dict:
    """Share of rollouts whose reward (0/1) equals their true correctness."""
    hits = [float((reward >= 0.5) == correct)
            for g in scored_groups(groups)
            for reward, correct in zip(g["rewards"], rollout_correctness(g, key[g["prompt_id"]]))]
    return mean_interval(hits)


def reference_accuracy(groups: list[dict], key: dict[str, str]) -> dict:
    """Share of groups whose reference answer is the known answer (no answer: wrong)."""
    return mean_interval([float(is_correct(g.get("reference_answer"), key[g["prompt_id"]]))
                          for g in scored_groups(groups)])


def accuracy_by_version(groups: list[dict], key: dict[str, str]) -> dict[int, float]:
    """Training-rollout accuracy (known answers) per policy version that sampled the group."""
    by_version: dict[int, list[bool]] = {}
    for g in scored_groups(groups):
        by_version.setdefault(int(g.get("policy_version", 0)), []).extend(
            rollout_correctness(g, key[g["prompt_id"]]))
    return {v: sum(c) / len(c) for v, c in sorted(by_version.items())}


# ---- evaluation and the table ---------------------------------------------------------------

def measure(directory: Path, args) -> dict:
    """v0, cat-final and ttrl-final on the held-out questions (`catq eval`'s code), once."""
    path = directory / "eval" / "results.json"
    if path.exists():
        return json.loads(path.read_text())
    weights = [w for w in (final_weights(directory, arm) for arm in ARMS) if w is not None]
    config = load_config(directory / "cat" / "catq.toml")
    samples = getattr(args, "eval_samples", None) or args.group_size
    eval_args = argparse.Namespace(data=str(directory / "held_out.jsonl"), group_size=samples,
                                   estimators="majority", versions=",".join(["0", *map(str, weights)]),
                                   limit=None, concurrency=8, use_stack=False, scaling=False)
    results = asyncio.run(evaluate(eval_args, config, directory / "eval"))
    path.write_text(json.dumps(results, indent=1))
    return results


def arm_row(diff: dict | None, state: ArmState | None = None, groups: list[dict] = (),
            key: dict[str, str] | None = None, steps: int = 0) -> dict:
    """One arm's figures; ``diff`` None: its final policy is v0 (no training, or no version
    published), so its gain is 0 by construction."""
    gain = ({"gain": diff["difference"]["value"],
             "gain_ci": [diff["difference"]["low"], diff["difference"]["high"]], "single_after": diff["single_to"]}
            if diff else {"gain": 0.0, "gain_ci": [0.0, 0.0]})
    if state is None:
        return {**gain, "steps": 0, "train_s": 0.0, "reward_accuracy": None, "reference_accuracy": None}
    rewards, references = reward_accuracy(groups, key), reference_accuracy(groups, key)
    return {**gain, "steps": steps, "train_s": round(state.trained_s, 1),
            "reward_accuracy": rewards["value"] if rewards["n"] else None, "reward_accuracy_ci": rewards,
            "reference_accuracy": references["value"] if references["n"] else None,
            "reference_accuracy_ci": references,
            "groups_scored": len(scored_groups(groups)),
            "peak_rss_mb": round(state.peak_rss_mb), "peak_process_rss_mb": round(state.peak_process_rss_mb),
            "accuracy_by_version": accuracy_by_version(groups, key)}


def table(directory: Path, args, results: dict, states: dict[str, ArmState]) -> dict:
    diffs = {d["to"].removesuffix("-final"): d for d in results["differences"]}
    arms = {"none": arm_row(None)}
    for arm, state in states.items():
        groups = read_jsonl(directory / arm / "groups.jsonl")
        steps = len(read_metrics(load_config(directory / arm / "catq.toml")))
        arms[arm] = arm_row(diffs.get(arm), state, groups, answer_key(directory, state), steps)
    ttrl_gain = arms["ttrl"]["gain"]
    return {"model": args.model, "data": "two-step word problems (catq.evaluation.wordgen)",
            "v0_single": results["versions"][0]["by_g"][-1]["single"],
            "held_out": results["meta"]["prompts"], "train_questions": args.train,
            "settings": {k: getattr(args, k) for k in ("budget_s", "max_steps", "group_size", "max_new_tokens",
                                                        "anchor_tokens", "batch_groups", "lr", "kl_coef",
                                                        "anchor_prompt", "seed", "no_background_commit", "lora", "eval_samples", "micro_batch")
                         if hasattr(args, k)},
            "arms": arms, "ratio_cat_ttrl": arms["cat"]["gain"] / ttrl_gain if ttrl_gain else None}


def render(summary: dict) -> str:
    lines = [f"model {summary['model']}; {summary['held_out']} held-out two-step word problems; "
             f"v0 single-sample {summary['v0_single']['value']:.3f}",
             f"{'arm':<5} {'steps':>5} {'train s':>8} {'gain':>7} {'95% CI':>17} {'reward acc':>10} {'ref acc':>8}"]
    for name, row in summary["arms"].items():
        lo, hi = row["gain_ci"]
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{name:<5} {row['steps']:>5} {row['train_s']:>8.0f} {row['gain']:>+7.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] {fmt(row['reward_accuracy']):>10} {fmt(row['reference_accuracy']):>8}")
    ratio = summary["ratio_cat_ttrl"]
    lines.append(f"ratio cat/ttrl (gain in held-out single-sample accuracy) "
                 f"{'nan' if ratio is None else f'{ratio:.2f}'}")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> Path:
    from catq.evaluation.plots import plt

    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    for arm in ARMS:
        series = summary["arms"][arm]["accuracy_by_version"]
        ax.plot(list(series), list(series.values()), marker="o", label=f"{arm} ({ARMS[arm]})")
    ax.axhline(summary["v0_single"]["value"], color="grey", linestyle="--", label="v0 held-out single")
    ax.set_xlabel("policy version that sampled the group (= learner steps before it)")
    ax.set_ylabel("training-rollout accuracy (known answers)")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(f"CaT vs TTRL on two-step word problems, {Path(summary['model']).name}")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


async def train_arms(directory: Path, args) -> dict[str, ArmState]:
    """Both training arms, one after the other or (``--parallel``) side by side."""
    if getattr(args, "parallel", False):
        states = await asyncio.gather(*(train_arm(arm, directory, args) for arm in ARMS))
        return dict(zip(ARMS, states))
    return {arm: await train_arm(arm, directory, args) for arm in ARMS}


def main(argv: list[str] | None = None) -> int:
    directory, args = settings(parse_args(argv))
    write_data(directory, args)
    states = asyncio.run(train_arms(directory, args))
    print(f"evaluating v0, cat and ttrl on {args.held_out} held-out questions...", flush=True)
    summary = table(directory, args, measure(directory, args), states)
    out = Path(args.out or directory / "cat_rl.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1).replace("NaN", "null"))  # no groups: no interval
    print(render(summary))
    print(f"wrote {out} and {plot(summary, out.with_suffix('.png'))}; run directory {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
