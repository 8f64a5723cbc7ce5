"""`catq eval`: how good are the references, and did training make the policy better?

    catq eval --data single_digit --group-size 8 --versions 0,latest --run RUN
    catq eval --data problems.jsonl --estimators synthesis,majority --limit 20 --out DIR
    catq eval --data math500.jsonl --format math500       (benchmarks as published; see formats.py)
    catq eval --data healthbench.jsonl --estimators synthesis,min_ppl   (scored by the judge)
    catq eval --data word --use-stack --config configs/demo.toml     (a running `catq up`)
    catq eval --run RUN --plot                                       (training curves only)

By default it starts the engines it needs (a policy engine that loads each version in turn, and
a frozen anchor engine, both catq's own, models from the config), like the demo does; with
``--use-stack`` it uses the config's engine URLs and evaluates the version they serve.
Writes ``results.json`` (every per-prompt record), ``report.md`` and PNG plots to ``--out``
(default ``<run_dir>/eval-<time>``) and prints the tables. Math is scored by final answers against
the known ones; HealthBench by the configured judge against each prompt's physician rubric (with
its own engines, an engine judge of the anchor's model is served by the anchor engine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sys
import time
from pathlib import Path

from catq.config import Config
from catq.evaluation.records import PromptRecord, scaling_sizes, summarize, summarize_groups
from catq.evaluation.runner import (
    EvalError,
    EvalModels,
    Failure,
    PolicyVersion,
    evaluate_version,
    load_version,
    read_metrics,
    served_version,
)
from catq.evaluation.stats import paired_difference

EVAL_REQUEST_TIMEOUT_S = 3600.0
"""Per engine call: an eval queues many calls at once, and on CPU the last may wait long."""


def eval_command(args, config: Config) -> int:
    from catq.children import LaunchError
    from catq.evaluation.datasets import DatasetError

    try:
        return asyncio.run(until_signalled(run_eval(args, config, sys.stdout)))
    except asyncio.CancelledError:
        print("catq eval: interrupted; the engines it started are stopped", file=sys.stderr)
        return 130
    except (EvalError, DatasetError) as exc:
        print(f"catq eval: {exc}", file=sys.stderr)
        return 2
    except LaunchError as exc:
        print(f"catq eval: {exc}", file=sys.stderr)
        return 1


async def until_signalled(work):
    """Run ``work``, cancelling it on SIGINT/SIGTERM so the engines it started are stopped
    (a plain SIGTERM would end the process and orphan them)."""
    import signal

    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await work


async def run_eval(args, config: Config, out) -> int:
    out_dir = Path(args.out) if args.out else config.run_path / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    if not args.data:
        if not args.plot:
            raise EvalError("--data is required (or --plot with --run to draw a run's training curves)")
        paths = plot_training_only(config, out_dir)
        out.write("".join(f"wrote {p}\n" for p in paths))
        return 0
    results = await evaluate(args, config, out_dir)
    out.write(write_outputs(results, config, out_dir, with_training=args.plot))
    return 0


async def evaluate(args, config: Config, out_dir: Path) -> dict:
    from catq.evaluation.datasets import load_problems

    started = time.monotonic()
    problems = load_problems(args.data, args.limit, getattr(args, "format", "auto"))
    if not problems:
        raise EvalError(f"{args.data}: no problems to evaluate")
    estimators = parse_estimators(args.estimators, rubric=scoring_of(problems) == "rubric")
    if scoring_of(problems) == "rubric" and not args.use_stack:
        check_own_engine_judge(config)  # before minutes of engine loading, not after
    config = with_group_size(config, args.group_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.use_stack:
        if args.versions not in (None, "", "current"):
            raise EvalError("--use-stack evaluates the version the running engines serve; drop --versions")
        versions = await evaluate_on_engines(problems, config, estimators, args, None,
                                             config.engines.policy_urls[0], config.engines.anchor_url)
    else:
        from catq.evaluation.runner import resolve_versions

        chosen = resolve_versions(args.versions or "0", config)
        async with OwnEngines(config, out_dir / "engines.log", chosen) as engines:
            versions = await evaluate_on_engines(problems, config, estimators, args, chosen,
                                                 engines.policy_url, engines.anchor_url)
    return {"meta": meta(args, config, problems, estimators, time.monotonic() - started),
            "versions": versions, "differences": differences(versions)}


def parse_estimators(text: str, rubric: bool = False) -> list[str]:
    """The named estimators; for rubric-scored prompts without those that serve math only
    ("majority": a vote needs final answers; on open prompts it is synthesis again, so it would
    only repeat that row). What each serves is the registry's ``tasks``."""
    from catq.teacher.registry import ESTIMATORS, serving

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in ESTIMATORS]
    if unknown or not names:
        raise EvalError(f"--estimators: unknown {unknown or names}; known: {', '.join(ESTIMATORS)}")
    if rubric:
        open_ones = serving("open")
        dropped = [n for n in names if n not in open_ones]
        names = [n for n in names if n in open_ones]
        if dropped and not names:
            choices = " or ".join(filter(None, [", ".join(open_ones[:-1]), open_ones[-1]]))
            raise EvalError(f"--estimators: {', '.join(dropped)} needs final answers; rubric-scored "
                            f"prompts take {choices}")
    return names


def scoring_of(problems) -> str:
    """"rubric" when the prompts are scored against rubrics by the judge, else "answer"."""
    return "rubric" if any(p.rubric is not None for p in problems) else "answer"


def with_group_size(config: Config, group_size: int | None) -> Config:
    if not group_size:
        return config
    if group_size < 1:
        raise EvalError("--group-size must be at least 1")
    return config.model_copy(update={"rollout": config.rollout.model_copy(update={"group_size": group_size})})


async def evaluate_on_engines(problems, config: Config, estimators: list[str], args,
                              versions: list[PolicyVersion] | None, policy_url: str, anchor_url: str) -> list[dict]:
    """Every version on the same prompts; ``versions`` None: whatever the engine serves."""
    from catq.teacher.registry import needs_policy

    judged = scoring_of(problems) == "rubric"
    models = build_models(config, policy_url, anchor_url, needs_policy(estimators),
                          judge=judged, own_engines=versions is not None)
    try:
        load = versions is not None
        if versions is None:
            from catq.engines.client import parse_version

            versions = [served_version(config, parse_version(await models.policy.weight_version()))]
        return await evaluate_versions(problems, models, config, estimators, versions, load=load,
                                       concurrency=args.concurrency, progress=progress_bar,
                                       scaling=getattr(args, "scaling", True),
                                       later_estimators=getattr(args, "later_estimators", None))
    finally:
        for model in (models.policy, models.anchor, models.selector, models.judge):
            if model is not None:
                await model.close()


async def evaluate_versions(problems, models: EvalModels, config: Config, estimators: list[str],
                            versions: list[PolicyVersion], *, load: bool = True, concurrency: int = 8,
                            progress=None, scaling: bool = True,
                            later_estimators: list[str] | None = None) -> list[dict]:
    """One result per version, in order; with ``load`` the policy engine is moved to each
    version first. A LoRA version's adapter is loaded in any case (unless the engine has it) and
    every policy call of that version names it. ``progress(total, label)`` makes a tqdm-like bar
    (or None). Without ``scaling`` the estimators run only at the full G (each extra g is one
    more anchor call).
    ``later_estimators``: the estimators of every version after the first, when they differ
    (the demo measures synthesis on v0 only: on CPU each synthesis is a long prefill)."""
    group_size = config.rollout.group_size
    sizes = scaling_sizes(group_size) if scaling else [group_size]
    results = []
    for i, version in enumerate(versions):
        if load or version.lora_path:
            await load_version(models.policy, version, first=i == 0)
        bar = progress(len(problems), version.label) if progress else None
        failures: list[Failure] = []
        names = estimators if i == 0 or later_estimators is None else later_estimators
        on_version = models.on_adapter(version.lora_path)
        try:
            records = await evaluate_version(problems, on_version, config, names, sizes,
                                             concurrency=concurrency, progress=bar, failures=failures)
        finally:
            if bar is not None:
                bar.close()
        if not records:
            raise EvalError(f"{version.label}: every prompt failed; first error: {failures[0].error}")
        results.append(version_result(version, records, names, failures))
    return results


def progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"eval {label}", unit="prompt", file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 10.0)


def build_models(config: Config, policy_url: str, anchor_url: str, with_selector: bool, *,
                 judge: bool = False, own_engines: bool = True) -> EvalModels:
    from catq.engines.client import EngineClient
    from catq.engines.tokenizer import chat_tokenizer
    from catq.teacher.anchor import SELECTION_SAMPLING
    from catq.teacher.chat import engine_chat

    engines = config.engines
    if engines.request_timeout_s < EVAL_REQUEST_TIMEOUT_S:
        config = config.model_copy(update={"engines": engines.model_copy(
            update={"request_timeout_s": EVAL_REQUEST_TIMEOUT_S})})
        engines = config.engines
    policy = EngineClient.from_config(engines, policy_url)
    tokenizer = chat_tokenizer(config, config.model.policy)
    anchor = engine_chat(config, anchor_url, config.model.anchor, config.anchor.sampling)
    selector = (engine_chat(config, policy_url, config.model.policy, SELECTION_SAMPLING)
                if with_selector else None)
    return EvalModels(policy, tokenizer, anchor, selector,
                      build_judge(config, anchor_url, own_engines) if judge else None)


def build_judge(config: Config, anchor_url: str, own_engines: bool):
    """The configured judge. With eval's own engines, an engine judge (SGLang API) of the
    anchor's model is the anchor engine eval started (as the default stack serves it); one of
    another model is not started here."""
    from catq.teacher.chat import judge_chat

    engines = config.engines
    if not own_engines or engines.judge_api == "openai":
        return judge_chat(config)
    check_own_engine_judge(config)
    return judge_chat(config.model_copy(update={"engines": engines.model_copy(update={"judge_url": anchor_url})}))


def check_own_engine_judge(config: Config) -> None:
    """An engine judge eval can serve from its anchor engine, or an OpenAI-compatible one."""
    engines = config.engines
    if engines.judge_api == "sglang" and engines.judge_model not in ("", config.model.anchor):
        raise EvalError(f"the judge model {engines.judge_model!r} is not the anchor's: serve it and use "
                        "--use-stack, or point engines.judge_api at an OpenAI-compatible endpoint")


def version_result(version: PolicyVersion, records: list[PromptRecord], estimators: list[str],
                   failures: list[Failure] = ()) -> dict:
    return {"label": version.label, "policy_version": version.policy_version, "step": version.step,
            "weights": str(version.path) if version.path else None,
            "by_g": summarize(records, estimators), "by_group": summarize_groups(records, estimators),
            "prompts": [r.as_dict() for r in records],
            "failed": [dataclasses.asdict(f) for f in failures]}


def differences(versions: list[dict]) -> list[dict]:
    """Single-sample accuracy of each later version against the first, paired by prompt."""
    if len(versions) < 2:
        return []
    first = versions[0]
    return [version_difference(first, v) for v in versions[1:]]


def version_difference(before: dict, after: dict) -> dict:
    """Paired over the prompts both versions finished (a failed prompt drops out of the pair)."""
    singles = {p["question"]: single_of(p) for p in before["prompts"]}
    pairs = [(single_of(p), singles[p["question"]]) for p in after["prompts"] if p["question"] in singles]
    return {"from": before["label"], "to": after["label"],
            "single_from": before["by_g"][-1]["single"], "single_to": after["by_g"][-1]["single"],
            "difference": paired_difference([a for a, _ in pairs], [b for _, b in pairs])}


def single_of(prompt: dict) -> float:
    scores = prompt.get("rollout_scores")
    scores = [float(c) for c in prompt["rollout_correct"]] if scores is None else scores
    return sum(scores) / len(scores) if scores else 0.0


def meta(args, config: Config, problems, estimators: list[str], wall_time_s: float) -> dict:
    return {"data": args.data, "format": getattr(args, "format", "auto"), "scoring": scoring_of(problems),
            "prompts": len(problems), "group_size": config.rollout.group_size,
            "estimators": estimators, "policy": config.model.policy, "anchor": config.model.anchor,
            "math_match": config.reward.math_match, "synthesis_prompt": config.anchor.prompt,
            "anchor_estimator_prompt_sampling": config.anchor.sampling.model_dump(),
            "rollout_math_sampling": config.rollout.math.model_dump(),
            "run": config.run, "wall_time_s": wall_time_s, "finished_at": time.time()}


def write_outputs(results: dict, config: Config, out_dir: Path, with_training: bool) -> str:
    """results.json, report.md and the plots; returns the text report with the paths written."""
    from catq.evaluation.plots import plot_all
    from catq.evaluation.report import render, render_markdown

    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "report.md").write_text(render_markdown(results))
    metrics = read_metrics(config) if with_training else None
    paths = plot_all(results, out_dir, metrics or None)
    written = [out_dir / "results.json", out_dir / "report.md", *paths]
    return render(results) + "\n" + "".join(f"wrote {p}\n" for p in written)


def plot_training_only(config: Config, out_dir: Path) -> list[Path]:
    from catq.evaluation.plots import plot_training

    metrics = read_metrics(config)
    if not metrics:
        raise EvalError(f"no learner steps in {config.run_path / 'metrics.jsonl'} (is --run right?)")
    out_dir.mkdir(parents=True, exist_ok=True)
    return [plot_training(metrics, out_dir / "training.png")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OwnEngines:
    """A policy engine (starting on the initial policy, allowed to load the chosen versions) and
    a frozen anchor engine, catq's own, on free local ports; their output goes to ``log_path``."""

    def __init__(self, config: Config, log_path: Path, versions: list[PolicyVersion]):
        self.config = config
        self.log_path = log_path
        self.weights_root = common_parent([v.path for v in versions if v.path is not None])
        self.lora_flags = lora_flags(versions)
        self.policy_url = self.anchor_url = ""
        self.children = []

    async def __aenter__(self) -> OwnEngines:
        from catq.children import Child, engine_healthy, wait_until

        self.log = open(self.log_path, "a")
        policy_port, anchor_port = free_port(), free_port()
        self.policy_url, self.anchor_url = (f"http://127.0.0.1:{p}" for p in (policy_port, anchor_port))
        extra = (["--weights-dir", str(self.weights_root)] if self.weights_root else []) + self.lora_flags
        for name, model, port, args in (("policy", self.config.model.policy, policy_port, extra),
                                        ("anchor", self.config.model.anchor, anchor_port, [])):
            argv = [sys.executable, "-m", "catq", "engine", "--model", model, "--port", str(port), *args]
            child = Child(f"engine.{name}", argv, {})
            child.process = await asyncio.create_subprocess_exec(*argv, stdout=self.log, stderr=self.log)
            self.children.append(child)
        try:
            for url in (self.policy_url, self.anchor_url):
                await wait_until(lambda u=url: engine_healthy(u), 600.0, f"engine at {url}", self.died)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    def died(self) -> str | None:
        return next((f"{c.name} exited with {c.process.returncode}; see {self.log_path}"
                     for c in self.children if c.process.returncode is not None), None)

    async def __aexit__(self, *exc) -> None:
        from catq.children import stop_child

        await asyncio.gather(*(stop_child(c, 30.0) for c in self.children))
        self.log.close()


def lora_flags(versions: list[PolicyVersion]) -> list[str]:
    """The policy engine's LoRA flags when some versions are LoRA adapters (fitting all of them),
    else none: full-weight versions start the engine as before."""
    from catq.engines.lora import flags_fitting

    adapters = [v.path for v in versions if v.lora_path is not None]
    return flags_fitting(adapters) if adapters else []


def common_parent(paths: list[Path]) -> Path | None:
    if not paths:
        return None
    parents = [p.resolve().parent for p in paths]
    root = parents[0]
    while not all(p.is_relative_to(root) for p in parents):
        root = root.parent
    return root
