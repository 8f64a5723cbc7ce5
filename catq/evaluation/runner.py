"""Sampling and estimating for `catq eval`, through the pipeline's own code.

For each policy version and each prompt: G rollouts with the rollout role's sampling
(:func:`catq.teacher.rollout.sample_group`), each estimator's reference for the first g of
them through :func:`catq.teacher.estimators.estimate_reference` on the anchor engine, and the
judge's math rewards (:func:`catq.teacher.judging.score_math`). The estimators get a
:class:`~catq.messages.Prompt` built from the question alone; the known answer is compared only
afterwards (:mod:`catq.evaluation.records`).

Policy versions are served one after another by one policy engine: it starts on the initial
weights (version 0) and loads each later version with ``/update_weights_from_disk``, the path
the syncer takes in a run. A LoRA policy's version (an adapter directory) is loaded with
``/load_lora_adapter`` instead, and every policy call of that version names it as ``lora_path``
(:attr:`PolicyVersion.lora_path`), as rollout does in a run; without it the engine would answer
with the base model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from catq.config import Config
from catq.evaluation.datasets import EvalProblem
from catq.evaluation.records import Outcome, PromptRecord, is_correct, judge_outcome
from catq.messages import Prompt, RolloutGroup, new_prompt_id


class EvalError(ValueError):
    """A request `catq eval` cannot carry out (unknown version, nothing to evaluate...)."""


@dataclass
class PolicyVersion:
    label: str
    """"v0", "v12" or a weight directory's name."""
    path: Path | None
    """Weights to load; None for the initial policy (what the engine starts with)."""
    policy_version: int | None = None
    step: int | None = None
    """The learner step that published it (0 for the initial policy), from metrics.jsonl."""
    lora_path: str | None = field(init=False, default=None)
    """The adapter name every policy request of this version names (``path`` is a LoRA adapter
    directory); None: the engine's own weights."""

    def __post_init__(self):
        from catq.engines.adapters import lora_path_for

        self.lora_path = lora_path_for(self.path, self.policy_version, self.label)


@dataclass
class EvalModels:
    """What one evaluation talks to: the policy engine (client + tokenizer) for rollouts, the
    anchor as a chat model for synthesis, the policy as a chat model for self best-of-N."""

    policy: object
    tokenizer: object
    anchor: object
    selector: object | None = None
    judge: object | None = None
    """Grades rubric-scored (HealthBench) responses; None when every prompt is math."""
    lora_path: str | None = None
    """The LoRA adapter the policy engine serves the measured version with; None: its own weights."""

    def on_adapter(self, lora_path: str | None) -> EvalModels:
        """These models with every policy call (rollouts, the self best-of-N selector) on the
        adapter ``lora_path``; themselves when it is None."""
        if lora_path is None:
            return self
        selector = self.selector.on_adapter(lora_path) if self.selector is not None else None
        return dataclasses.replace(self, selector=selector, lora_path=lora_path)


EstimateFn = Callable[..., Awaitable]


def resolve_versions(spec: str, config: Config) -> list[PolicyVersion]:
    """``"0,latest"``, explicit numbers (weights/v<N> of the run) or weight directories;
    the initial policy first, the rest in the order given, duplicates dropped."""
    from catq.learner.publish import published_versions, version_dir

    versions: list[PolicyVersion] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in ("0", "v0", "initial"):
            versions.append(PolicyVersion("v0", None, 0, 0))
            continue
        if item == "latest":
            published = published_versions(config.weights_dir)
            if not published:
                raise EvalError(f"--versions latest: no published version in {config.weights_dir}")
            item = str(published[-1])
        if re.fullmatch(r"v?\d+", item):
            number = int(item.removeprefix("v"))
            path = version_dir(config.weights_dir, number)
            if not path.is_dir():
                raise EvalError(f"version {number}: {path} does not exist (pruned, or another run?)")
            versions.append(PolicyVersion(f"v{number}", path, number, step_of_version(config, number)))
        elif Path(item).is_dir():
            versions.append(PolicyVersion(Path(item).name, Path(item).resolve()))
        else:
            raise EvalError(f"--versions: {item!r} is neither 0, latest, a version number nor a directory")
    unique = list({v.label: v for v in versions}.values())
    return sorted(unique, key=lambda v: v.path is not None)  # stable: the initial policy first


def step_of_version(config: Config, version: int) -> int | None:
    """The learner step after which ``version`` was published, read from metrics.jsonl."""
    steps = [line["step"] for line in read_metrics(config) if line.get("policy_version") == version]
    return min(steps) if steps else None


def read_metrics(config: Config) -> list[dict]:
    """The learner's ``metrics.jsonl`` lines of the run, one per optimizer step ([] before any)."""
    path = config.run_path / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def evaluate_problem(problem: EvalProblem, models: EvalModels, config: Config, estimators: list[str],
                           sizes: list[int], estimate: EstimateFn) -> PromptRecord:
    from catq.teacher.answers import response_answer
    from catq.teacher.rollout import sample_group

    match = config.reward.math_match
    prompt = Prompt(prompt_id=new_prompt_id(), task=problem.task, messages=list(problem.messages))
    group = await sample_group(models.policy, models.tokenizer, prompt, config, lora_path=models.lora_path)
    if problem.rubric is not None:
        return await evaluate_rubric_problem(problem, group, models, config, estimators, sizes, estimate)
    answers = [response_answer(r.text, match, r.finish_reason) for r in group.rollouts]
    record = PromptRecord(problem.text, problem.answer, [r.text for r in group.rollouts], answers,
                          [is_correct(a, problem.answer, match) for a in answers], label=problem.label,
                          metadata=problem.metadata, groups=problem.groups)
    jobs = [(g, name) for g in sizes for name in estimators]
    outcomes = await asyncio.gather(*(
        reference_outcome(dataclasses.replace(group, rollouts=group.rollouts[:g]), name, problem.answer,
                          models, estimate, config)
        for g, name in jobs))
    for (g, name), outcome in zip(jobs, outcomes):
        record.references.setdefault(g, {})[name] = outcome
    return record


async def evaluate_rubric_problem(problem: EvalProblem, group: RolloutGroup, models: EvalModels, config: Config,
                                  estimators: list[str], sizes: list[int], estimate: EstimateFn) -> PromptRecord:
    """A HealthBench prompt: the rollouts and each estimator's reference graded by the judge
    against the physicians' rubric (:mod:`catq.evaluation.healthbench`)."""
    from catq.evaluation.healthbench import RubricGrader

    if models.judge is None:
        raise EvalError("rubric-scored prompts need a judge model")
    grader = RubricGrader(models.judge, config.judge, problem.messages, problem.rubric)
    texts = [r.text for r in group.rollouts]
    graded = await grader.grade(texts)
    record = PromptRecord(problem.text, "", texts, [None] * len(texts), [], label=problem.label,
                          metadata=problem.metadata, groups=problem.groups,
                          rollout_scores=[g.score for g in graded],
                          rollout_criteria_met=[g.criteria_met for g in graded])
    jobs = [(g, name) for g in sizes for name in estimators]
    refs = await asyncio.gather(*(
        estimate(dataclasses.replace(group, rollouts=group.rollouts[:g]), name, anchor=models.anchor,
                 policy=models.selector, include_question=config.anchor.include_question, options=config.anchor)
        for g, name in jobs))
    scores = await grader.grade([ref.reference for ref in refs])
    for (g, name), ref, score in zip(jobs, refs, scores):
        record.references.setdefault(g, {})[name] = Outcome(None, False, False, [], ref.reference,
                                                            ref.format_fallback, score=score.score)
    return record


async def reference_outcome(group: RolloutGroup, estimator: str, known: str, models: EvalModels,
                            estimate: EstimateFn, config: Config):
    from catq.teacher.judging import math_reference_answer, score_math
    from catq.teacher.verify_pool import off_loop

    match = config.reward.math_match
    ref = await estimate(group, estimator, anchor=models.anchor, policy=models.selector,
                         include_question=config.anchor.include_question, options=config.anchor)
    answer = math_reference_answer(ref.reference, ref.anchor_output, ref.reference_answer, match)
    rewards, _ = await off_loop(score_math, group.rollouts, answer, match)
    return judge_outcome(answer, known, ref.majority_answer, rewards,
                         ref.reference, ref.format_fallback, ref.answer_primed, match)


@dataclass
class Failure:
    question: str
    error: str


async def evaluate_version(problems: list[EvalProblem], models: EvalModels, config: Config,
                           estimators: list[str], sizes: list[int], *, estimate: EstimateFn | None = None,
                           concurrency: int = 4, progress=None, failures: list[Failure] | None = None,
                           ) -> list[PromptRecord]:
    """Records in the order of ``problems``; up to ``concurrency`` prompts in flight, so the
    engines batch them. A prompt whose engine calls fail is left out and added to ``failures``
    with the reason (when given; else the error propagates), so one bad request does not
    throw away an hour of measurement. ``progress`` (tqdm-like) is updated once per prompt."""
    from catq.engines.client import EngineError

    if estimate is None:
        from catq.teacher.estimators import estimate_reference as estimate
    slots = asyncio.Semaphore(concurrency)

    async def one(problem: EvalProblem) -> PromptRecord | None:
        try:
            async with slots:
                return await evaluate_problem(problem, models, config, estimators, sizes, estimate)
        except EngineError as exc:
            if failures is None:
                raise
            failures.append(Failure(problem.text, str(exc)))
            return None
        finally:
            if progress is not None:
                progress.update(1)

    records = await asyncio.gather(*(one(p) for p in problems))
    return [r for r in records if r is not None]


def served_version(config: Config, number: int) -> PolicyVersion:
    """The version a running stack's policy engine reports: its own weights, or for a LoRA
    policy the adapter ``weights/v<N>`` (which requests must name)."""
    from catq.learner.publish import version_dir

    adapter = PolicyVersion(f"v{number}", version_dir(config.weights_dir, number), number)
    return adapter if adapter.lora_path else PolicyVersion(f"v{number}", None, number)


async def load_version(client, version: PolicyVersion, first: bool) -> None:
    """Make the policy engine serve ``version``. The initial policy is what the engine was
    started with, so it can only come first. A LoRA version's adapter is loaded beside the
    base weights (unless the engine has it already)."""
    if version.lora_path is not None:
        await load_adapter(client, version)
        return
    if version.path is None:
        if not first:
            raise EvalError("the initial policy must be evaluated first (the engine starts on it)")
        return
    await client.update_weights_from_disk(str(version.path), weight_version=version.label)


async def load_adapter(client, version: PolicyVersion) -> None:
    from catq.engines.client import EngineError
    from catq.engines.adapters import ensure_loaded

    try:
        await ensure_loaded(client, version.lora_path, version.path)
    except EngineError as exc:
        raise EvalError(f"{version.label}: the policy engine did not load the LoRA adapter "
                        f"{version.path}: {exc}") from exc
