"""The teacher end to end: real Redis, a real catq engine on the default model, and the rollout,
anchor and judge workers as separate processes (`python -m catq worker ROLE --config F`).

One engine serves policy, anchor and judge (as in configs/demo.toml). Groups are small (G=4) and
generations short so this runs in minutes on two shared cores. The test config asks for only
one rubric criterion: SmolLM2-135M rarely writes five well-formed ones (see the report in
catq/teacher/prompts.py), and these tests are about the plumbing, not the model.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from catq.messages import (
    ChatMessage,
    DeadLetter,
    Prompt,
    ReferencedGroup,
    ScoredGroup,
    new_prompt_id,
)
from catq.results import ResultStore
from tests.helpers.engine_proc import EngineProcess
from tests.integration.procs import ROOT, stop_process, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

G = 4
MATH = "What is 12 + 7? Put the final answer in \\boxed{}."
OPEN = "Give me two tips for sleeping better."


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with EngineProcess("default", weights_dir=tmp_path_factory.mktemp("weights"), max_batch=16) as proc:
        yield proc


def write_config(path: Path, run: str, redis_url: str, engine_url: str) -> Path:
    path.write_text(f"""
run = "{run}"
redis_url = "{redis_url}"
run_dir = "{path.parent / 'run'}"

[engines]
policy_urls = ["{engine_url}"]
anchor_url = "{engine_url}"
judge_url = "{engine_url}"
request_timeout_s = 600

[bus]
claim_idle_ms = 3000
block_ms = 200

[worker]
concurrency = 2
heartbeat_s = 1
grace_period_s = 2

[rollout]
group_size = {G}

[rollout.math]
max_new_tokens = 24

[rollout.open]
max_new_tokens = 32

[anchor]
rubric_min_criteria = 1
rubric_attempts = 4

[anchor.sampling]
temperature = 0.0
max_new_tokens = 80

[judge]
max_new_tokens = 4
concurrency = 8
""")
    return path


class Workers:
    """Worker processes of one test; each logs to its own file, all are stopped at the end."""

    def __init__(self, config: Path, log_dir: Path):
        self.config, self.log_dir = config, log_dir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, role: str) -> subprocess.Popen:
        log_path = self.log_dir / f"{role}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "catq", "worker", role, "--config", str(self.config)],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.procs.append((role, proc, log_path))
        return proc

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for _, _, p in self.procs)

    def stop_all(self) -> None:
        for _, proc, _ in self.procs:
            stop_process(proc, timeout=15)


@pytest.fixture
def workers(tmp_path, run_name, redis_url, engine):
    w = Workers(write_config(tmp_path / "catq.toml", run_name, redis_url, engine.url), tmp_path)
    yield w
    w.stop_all()
    print(w.logs())


async def scored_groups(bus) -> list[ScoredGroup]:
    return [m for _, m in await bus.read_all("scored", ScoredGroup)]


def make_prompt(task: str, text: str) -> Prompt:
    return Prompt(new_prompt_id(), task, [ChatMessage("user", text)])


async def test_math_and_open_prompts_are_scored(bus, workers):
    for role in ("rollout", "anchor", "judge"):
        workers.start(role)
    prompts = [make_prompt("math", MATH), make_prompt("open", OPEN)]
    for prompt in prompts:
        await bus.publish("prompts", prompt)

    async def both_done_or_dead():
        return len(await scored_groups(bus)) >= 2 or await bus.read_all("dead", DeadLetter)

    await wait_for(both_done_or_dead, timeout=780, interval=1.0, what="two scored groups")
    assert not await bus.read_all("dead", DeadLetter)
    scored = {s.group.prompt.prompt_id: s for s in await scored_groups(bus)}
    assert set(scored) == {p.prompt_id for p in prompts}
    results = ResultStore(bus, 3600)
    for prompt in prompts:
        group = scored[prompt.prompt_id]
        assert len(group.group.rollouts) == G and len(group.rewards) == G
        assert all(0.0 <= r <= 1.0 for r in group.rewards)
        assert all(r.token_ids and len(r.logprobs) == len(r.token_ids) for r in group.group.rollouts)
        # The anchor engine scored every token under π0 for the learner's KL term; at version 0
        # the policy is π0, so they are the behaviour log-probs up to numerics.
        deltas = [abs(a - b) for r in group.group.rollouts
                  for a, b in zip(r.anchor_logprobs, r.logprobs, strict=True)]
        assert deltas and sum(deltas) / len(deltas) < 1e-3
        result = await results.get(prompt.prompt_id)
        assert result["status"] == "scored" and result["task"] == prompt.task
        assert result["cat_answer"] == group.referenced.reference and result["estimator"] == "synthesis"
        assert len(result["rollouts"]) == G and result["rewards"] == group.rewards
        assert result["policy_version"] == 0 and result["anchor_version"] == 0
        assert result["reward_mean"] == pytest.approx(sum(group.rewards) / G)
        print(prompt.task, "format_fallback:", group.referenced.format_fallback,
              "reference:", repr(group.referenced.reference[:200]), "rewards:", group.rewards)
    math, open_ = scored[prompts[0].prompt_id], scored[prompts[1].prompt_id]
    assert "majority_answer" in await results.get(prompts[0].prompt_id)
    assert len(math.rollout_answers) == G and not math.verdicts
    assert open_.referenced.rubric and len(open_.verdicts) == G * len(open_.referenced.rubric)
    assert (await results.get(prompts[1].prompt_id))["rubric"] == open_.referenced.rubric


async def test_killed_anchor_is_replaced_and_the_group_completes_once(bus, workers):
    workers.start("rollout")
    workers.start("judge")
    doomed = workers.start("anchor")
    prompt = make_prompt("math", MATH)
    await bus.publish("prompts", prompt)

    async def anchor_holds_the_group():
        stats = await bus.stats(("groups",))
        return any(g["group"] == "anchor" and g["pending"] > 0 for g in stats["groups"]["groups"])

    await wait_for(anchor_holds_the_group, timeout=600, interval=0.2, what="the anchor to take the group")
    doomed.kill()  # SIGKILL mid-group: no chance to clean up
    doomed.wait()
    workers.start("anchor")
    await wait_for(lambda: scored_groups(bus), timeout=600, interval=1.0, what="the scored group")
    await asyncio.sleep(4)  # > claim_idle_ms: a duplicate would have had time to appear
    scored = await scored_groups(bus)
    assert [s.group.prompt.prompt_id for s in scored] == [prompt.prompt_id]
    assert len(await bus.read_all("references", ReferencedGroup)) == 1
    assert not await bus.read_all("dead", DeadLetter)
    assert (await ResultStore(bus, 3600).get(prompt.prompt_id))["status"] == "scored"
