"""`catq demo`'s before/after measurement, with `catq eval`'s code on the stack's own engines:
v0 on the anchor engine while the policy trains (it serves the same initial weights and is idle
on math groups scored by the vote), the final policy on the policy engine once the roles stopped.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from catq.config import Config

EVAL_CONCURRENCY = 16
"""Prompts in flight for the final measurement (half of it for v0's, beside training)."""


class EvalCounter:
    """A tqdm-like progress for an evaluation running in the background: only counts."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def update(self, n: int = 1) -> None:
        self.done += n

    def close(self) -> None:
        pass


def anchor_serves_initial_policy(config: Config) -> bool:
    """Whether the stack's anchor engine serves the initial policy (same model, launched by the
    stack as catq's engine), so v0 can be measured on it while the policy trains."""
    anchor = next((s for s in config.engines.launch if s.url == config.engines.anchor_url), None)
    return (anchor is not None and not anchor.policy and anchor.kind == "catq"
            and config.model.anchor == config.model.policy)


async def evaluate_one(config: Config, problems, estimators: list[str], version, policy_url: str,
                       anchor_url: str, progress: EvalCounter | None = None,
                       concurrency: int = EVAL_CONCURRENCY) -> dict:
    """One version's `catq eval` result, measured on the given engines (the policy engine loads
    ``version`` first when it has weights; a LoRA policy's version is measured on its adapter,
    :attr:`catq.evaluation.runner.PolicyVersion.lora_path`)."""
    from catq.evaluation.command import build_models, evaluate_versions
    from catq.teacher.registry import needs_policy

    models = build_models(config, policy_url, anchor_url, needs_policy(estimators))
    try:
        [result] = await evaluate_versions(
            problems, models, config, estimators, [version], load=version.path is not None,
            concurrency=concurrency, progress=(lambda total, label: progress) if progress else None,
            scaling=False)
        return result
    finally:
        for model in (models.policy, models.anchor, models.selector):
            if model is not None:
                await model.close()


def initial_version():
    from catq.evaluation.runner import PolicyVersion

    return PolicyVersion("v0", None, 0, 0)


def start_v0_measurement(config: Config, problems, estimators: str) -> tuple[asyncio.Task, EvalCounter] | None:
    """Measure v0 on the anchor engine in the background (None when it does not serve v0)."""
    if not anchor_serves_initial_policy(config):
        return None
    counter = EvalCounter(len(problems))
    url = config.engines.anchor_url
    task = asyncio.create_task(evaluate_one(config, problems, parse_estimators(estimators), initial_version(),
                                            url, url, counter, concurrency=EVAL_CONCURRENCY // 2))
    return task, counter


def parse_estimators(text: str) -> list[str]:
    from catq.evaluation.command import parse_estimators as parse

    return parse(text)


async def measure_final(config: Config, problems, estimators: str, v0_task: asyncio.Task | None) -> list[dict]:
    """[v0, final] results: the final policy on the stack's policy engine (the roles stopped),
    alongside v0 still finishing on the anchor engine (None when it was not measured there)."""
    from catq.evaluation.runner import resolve_versions

    final = asyncio.create_task(evaluate_one(
        config, problems, later_estimators(estimators) or parse_estimators(estimators),
        resolve_versions("latest", config)[0], config.engines.policy_urls[0], config.engines.anchor_url))
    if v0_task is None:
        return [None, await final]
    first, last = await asyncio.gather(v0_task, final)
    return [first, last]


async def measure_v0_apart(config: Config, held_out: Path, estimators: str) -> dict:
    """v0 on engines of its own, when the stack's anchor could not measure it."""
    from catq.evaluation.command import evaluate

    args = argparse.Namespace(data=str(held_out), group_size=None, estimators=estimators,
                              versions="0", limit=None, concurrency=EVAL_CONCURRENCY, use_stack=False,
                              scaling=False, later_estimators=None)
    return (await evaluate(args, config, config.run_path / "eval-v0"))["versions"][0]


def assemble_results(config: Config, held_out: Path, problems, estimators: str, versions: list[dict],
                     wall_s: float) -> dict:
    from catq.evaluation.command import differences, meta

    args = argparse.Namespace(data=str(held_out))
    return {"meta": meta(args, config, problems, parse_estimators(estimators), wall_s),
            "versions": versions, "differences": differences(versions)}


def later_estimators(estimators: str) -> list[str] | None:
    """The final policy is measured without synthesis: the anchor's reading of the initial
    policy's rollouts is the figure the demo shows, and on CPU each synthesis costs a long
    prefill (about half the evaluation's time at 135M)."""
    names = [n.strip() for n in estimators.split(",") if n.strip() and n.strip() != "synthesis"]
    return names or None
