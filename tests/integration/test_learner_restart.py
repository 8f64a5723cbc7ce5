"""The learner as a real process on real Redis: SIGKILLed between steps and restarted, it resumes
at the right step and version, loses no scored group and trains none twice."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from catq.bus import Bus
from catq.learner import checkpoint
from catq.messages import (
    ChatMessage,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
    WeightsPublished,
)
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (fixture: one tiny model a session)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def make_scored(index: int, rewards: list[float], policy_version: int = 0, seed: int = 0) -> ScoredGroup:
    """A hand-made scored group: random prompt/completion ids, made-up behaviour log-probs."""
    rng = random.Random(seed * 1000 + index)
    rollouts = []
    for _ in rewards:
        ids = [rng.randrange(100, 2000) for _ in range(rng.randrange(3, 9))]
        rollouts.append(Rollout(text="x", token_ids=ids, logprobs=[-rng.uniform(5, 12) for _ in ids],
                                finish_reason="stop"))
    prompt = Prompt(prompt_id=f"p{index}", task="math", messages=[ChatMessage("user", f"q{index}")])
    group = RolloutGroup(prompt=prompt, prompt_token_ids=[rng.randrange(100, 2000) for _ in range(5)],
                         rollouts=rollouts, policy_version=policy_version)
    referenced = ReferencedGroup(group=group, reference="s", estimator="synthesis", anchor_output="s")
    return ScoredGroup(referenced=referenced, rewards=rewards)


def write_config(tmp_path: Path, run: str, redis_url: str, model: Path, extra: str = "",
                 **learner) -> Path:
    settings = {"batch_groups": 2, "micro_batch_rollouts": 3, "lr": 1e-3, "checkpoint_every": 1,
                "publish_every": 1, "keep_versions": 2, "max_staleness": 100, **learner}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path = tmp_path / "learner.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "{redis_url}"
run_dir = "{tmp_path}/runs/{{run}}"

[model]
policy = "{model}"
anchor = "{model}"

[bus]
block_ms = 200

[worker]
heartbeat_s = 1

[learner]
{lines}
{extra}
""")
    return path


def start_learner(config: Path, log: Path, role: str = "learner") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "catq", "worker", role, "--config", str(config)],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
    )


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"learner exited with {proc.returncode} while waiting for {what}")
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_sigkill_between_steps_resumes_without_loss_or_double_training(
    tmp_path, run_name, redis_url, tiny_model_path  # noqa: F811
):
    model = tiny_model_path
    config = write_config(tmp_path, run_name, redis_url, model)
    run_dir = tmp_path / "runs" / run_name
    log = tmp_path / "learner.log"
    bus = Bus(redis_url, run_name)
    ids: list[str] = []
    try:
        # 6 groups with signal and 2 without, then SIGKILL once two steps are logged.
        for i in range(6):
            ids.append(await bus.publish("scored", make_scored(i, [1.0, 0.0, 0.5])))
        zero = [await bus.publish("scored", make_scored(90 + i, [1.0, 1.0, 1.0])) for i in range(2)]
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 2, 120, "two steps", proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        killed_at = checkpoint.list_checkpoints(run_dir / "checkpoints")[-1][0]
        assert killed_at >= 1  # the kill may land before or after step 2's checkpoint

        # More work arrives while it is down; then it restarts and finishes everything.
        for i in range(6, 10):
            ids.append(await bus.publish("scored", make_scored(i, [0.0, 1.0])))
        proc = start_learner(config, log)
        try:
            await wait_for(lambda: len(metrics(run_dir)) >= 5, 120, "five steps", proc)
            for _ in range(100):  # the last step's ack lands right after its checkpoint
                if (await bus.stats(("scored",)))["scored"]["groups"][0]["pending"] == 0:
                    break
                await asyncio.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]

        ready = [json.loads(line) for line in log.read_text().splitlines()
                 if '"learner ready"' in line]
        assert [(r["step"], r["version"]) for r in ready] == [(0, 0), (killed_at, killed_at)]
        lines = metrics(run_dir)
        assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
        trained = [e for m in lines for e in m["entry_ids"]]
        assert sorted(trained) == sorted(ids), "every scored group trained exactly once"
        assert sum(m["groups_skipped_zero_variance"] for m in lines) <= 2
        state = checkpoint.load_latest(run_dir / "checkpoints", *_model_and_optimizer(model))
        assert state.step == 5 and state.policy_version == 5
        assert sorted(state.trained_ids) == sorted(ids)
        assert await bus.get_policy_version() == 5
        published = await bus.read_all("weights", WeightsPublished)
        versions = [m.policy_version for _, m in published]
        assert versions == sorted(set(versions)) and versions[-1] == 5
        assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["v4", "v5"]
        stats = await bus.stats(("scored",))
        assert stats["scored"]["groups"][0]["pending"] == 0
        assert all(z not in trained for z in zero)
    finally:
        await bus.close()


def _model_and_optimizer(model_dir: Path):
    from catq.engines.models import load_causal_lm
    from catq.learner.grpo import make_optimizer

    model = load_causal_lm(str(model_dir))
    return model, make_optimizer(model, 1e-3)
