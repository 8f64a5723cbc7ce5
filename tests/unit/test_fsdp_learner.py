"""The learner sharded with FSDP2 on 2 ranks (gloo, CPU) takes the single-process step.

The same prepared batch (5 rollouts: the ranks get 3 and 2, so with 2 rollouts per micro-batch
rank 1 runs one forward/backward that contributes nothing) is trained for 2 AdamW steps, with
gradient clipping binding, by one process and by 2 ranks (tests/helpers/fsdp_learner.py); then a
second Trainer in each resumes from the checkpoint just written and takes a third step. Losses,
gradient norms, checkpoints (model and optimizer) and the published HF directory agree within
1e-5, and a 1-process Trainer resumes from the 2-rank checkpoint.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catq.learner import checkpoint, distributed, grpo
from catq.learner.distributed import Ranks

pytestmark = pytest.mark.slow  # four learner processes on a tiny model: ~40 s on two cores

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_learner(world: int, model: Path, batch: Path, run: Path, mode: str = "--resume") -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "tests.helpers.fsdp_learner", "--world", str(world), "--port", str(free_port()),
           "--model", str(model), "--batch", str(batch), "--run", str(run), "--steps", "2", "--micro", "2",
           mode]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(run / ("loop.pt" if mode == "--loop" else "metrics.pt"), weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from catq.engines.models import load_causal_lm, tiny_model_dir
    from tests.unit.test_grpo import scored_group

    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = tiny_model_dir(tmp)
    model = load_causal_lm(str(model_dir), device="cpu")
    g1 = scored_group(model, [1, 2, 3], [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], [1.0, 0.0, 0.0])
    g2 = scored_group(model, [4, 5], [[20, 21], [22, 23, 24]], [0.0, 1.0])
    batch = tmp / "batch.pkl"
    batch.write_bytes(pickle.dumps([grpo.prepare_group(g1), grpo.prepare_group(g2)]))
    one = run_learner(1, model_dir, batch, tmp / "one")
    two = run_learner(2, model_dir, batch, tmp / "two")
    return {"model": model_dir, "batch": batch, "one": (tmp / "one", one), "two": (tmp / "two", two)}


def max_diff(a: dict, b: dict) -> float:
    assert list(a) == list(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_split_gives_every_rank_a_contiguous_share():
    samples = list(range(5))
    assert [distributed.split(samples, Ranks(r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [distributed.split(samples, Ranks(r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    assert [distributed.split([7], Ranks(r, 2)) for r in range(2)] == [[7], []]
    assert distributed.split(samples, distributed.SINGLE) == samples


def test_two_ranks_take_the_single_process_steps(runs):
    (_, one), (_, two) = runs["one"], runs["two"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["updated"] and b["updated"]
        assert b["rollouts"] == a["rollouts"] == 5 and b["tokens"] == a["tokens"] == 17
        assert b["loss"] == pytest.approx(a["loss"], abs=TOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=TOL)  # > max_grad_norm: clipping binds
        for key in ("kl", "clip_frac", "ratio_mean", "entropy", "reward_mean", "adv_std", "groups_used"):
            assert b[key] == pytest.approx(a[key], abs=TOL), key
    assert one[0]["grad_norm"] > 1.0


def test_checkpoints_are_the_single_process_ones(runs):
    (dir_one, _), (dir_two, _) = runs["one"], runs["two"]
    for step in (2, 3):
        a = torch.load(checkpoint.checkpoint_path(dir_one / "checkpoints", step), weights_only=True)
        b = torch.load(checkpoint.checkpoint_path(dir_two / "checkpoints", step), weights_only=True)
        assert sorted(a) == sorted(b) and a["step"] == b["step"] == step
        assert max_diff(a["model"], b["model"]) < TOL
        assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
        assert sorted(a["optimizer"]["state"]) == sorted(b["optimizer"]["state"])
        for i, state in a["optimizer"]["state"].items():
            assert max_diff(state, b["optimizer"]["state"][i]) < TOL


def test_published_weights_are_the_single_process_ones(runs):
    from safetensors.torch import load_file

    (dir_one, _), (dir_two, _) = runs["one"], runs["two"]
    v_one, v_two = dir_one / "weights" / "v1", dir_two / "weights" / "v1"
    assert sorted(p.name for p in v_one.iterdir()) == sorted(p.name for p in v_two.iterdir())
    assert (v_one / "config.json").read_text() == (v_two / "config.json").read_text()
    a, b = load_file(v_one / "model.safetensors"), load_file(v_two / "model.safetensors")
    assert sorted(a) == sorted(b) and "lm_head.weight" not in b  # tied: saved once, as one process does
    assert max_diff(dict(sorted(a.items())), dict(sorted(b.items()))) < TOL


def test_a_one_process_trainer_resumes_from_a_two_rank_checkpoint(runs):
    from catq.learner.trainer import Trainer
    from tests.helpers.fsdp_learner import make_config

    groups = pickle.loads(runs["batch"].read_bytes())
    trainers = [Trainer.from_config(make_config(str(runs["model"]), str(runs[name][0]))) for name in ("one", "two")]
    assert [t.state.step for t in trainers] == [3, 3]
    metrics = [t.train(groups, ["3-0"]) for t in trainers]
    assert metrics[1]["loss"] == pytest.approx(metrics[0]["loss"], abs=TOL)
    assert max_diff(trainers[0].policy.state_dict(), trainers[1].policy.state_dict()) < TOL


def test_the_learner_loop_on_two_ranks_is_the_single_process_loop(runs):
    """The worker's LearnerLoop (fake bus) with a Leader on rank 0 and a follower: same steps,
    acks, checkpoints and published version as one process; a step asked to stop is abandoned by
    both ranks (nothing hangs, the groups go back to the buffer)."""
    import json

    from safetensors.torch import load_file

    tmp = runs["model"].parent
    one = run_learner(1, runs["model"], runs["batch"], tmp / "loop-one", "--loop")
    two = run_learner(2, runs["model"], runs["batch"], tmp / "loop-two", "--loop")
    assert one == two == {"acked": ["1-0", "2-0", "3-0", "4-0"], "published": [("weights", 1)],
                          "buffer": ["5-0", "6-0"], "step": 2, "version": 1}
    lines = [[json.loads(x) for x in (tmp / d / "metrics.jsonl").read_text().splitlines()]
             for d in ("loop-one", "loop-two")]
    assert [x["step"] for x in lines[1]] == [1, 2]
    for a, b in zip(*lines):
        for key, value in a.items():
            if isinstance(value, float) and key not in ("time", "elapsed_s", "step_time_s", "tokens_per_s"):
                assert b[key] == pytest.approx(value, abs=TOL, rel=TOL), key
            elif not isinstance(value, float):
                assert b[key] == value, key
    a = load_file(tmp / "loop-one" / "weights" / "v1" / "model.safetensors")
    b = load_file(tmp / "loop-two" / "weights" / "v1" / "model.safetensors")
    assert max_diff(dict(sorted(a.items())), dict(sorted(b.items()))) < TOL
