"""Checkpoints and published weight directories (files only, tiny model, no Redis)."""

from __future__ import annotations

import random

import torch

from catq.learner import checkpoint, grpo, publish
from tests.unit.test_grpo import scored_group, tiny_model


def test_checkpoint_round_trip_restores_model_optimizer_state_and_rng(tmp_path):
    model = tiny_model()
    opt = grpo.make_optimizer(model, lr=1e-2)
    g = scored_group(model, [1, 2], [[3, 4], [5, 6, 7]], [1.0, 0.0])
    grpo.train_step(model, opt, grpo.prepare_batch([g]), grpo.StepConfig())
    state = checkpoint.TrainingState(step=1, policy_version=1, trained_ids=["1-0", "2-0"])
    torch.manual_seed(123)
    random.seed(7)
    checkpoint.save_checkpoint(tmp_path, model, opt, state)
    expected = (torch.rand(3), random.random())

    restored, ropt = tiny_model(seed=9), None
    ropt = grpo.make_optimizer(restored, lr=1e-2)
    loaded = checkpoint.load_latest(tmp_path, restored, ropt)
    assert loaded.step == 1 and loaded.policy_version == 1 and loaded.trained_ids == ["1-0", "2-0"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), restored.parameters()))
    assert ropt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_checkpoints_are_pruned_and_latest_wins(tmp_path):
    model = tiny_model()
    opt = grpo.make_optimizer(model, lr=1e-2)
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainingState(step=step), keep=2)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path)] == [2, 3]
    assert checkpoint.load_latest(tmp_path, model, opt).step == 3
    assert not list(tmp_path.glob(".*tmp"))
    assert checkpoint.load_latest(tmp_path / "none", model, opt) is None


def test_trained_ids_are_bounded(monkeypatch):
    monkeypatch.setattr(checkpoint, "MAX_TRAINED_IDS", 3)
    state = checkpoint.TrainingState()
    state.add_trained(["a", "b"])
    state.add_trained(["c", "d"])
    assert state.trained_ids == ["b", "c", "d"]


def test_publish_writes_loadable_versions_and_prunes(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    weights = tmp_path / "weights"
    for version in (1, 2, 3):
        path = publish.write_weights(model, None, weights, version)
        assert path == weights / f"v{version}"
    publish.write_weights(model, None, weights, 3)  # re-publishing a version replaces it
    assert publish.published_versions(weights) == [1, 2, 3]
    assert publish.prune_versions(weights, keep=2) == [1]
    assert publish.published_versions(weights) == [2, 3]
    assert [p.name for p in weights.iterdir()] and not list(weights.glob(".*"))
    loaded = AutoModelForCausalLM.from_pretrained(str(weights / "v3"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), loaded.parameters()))


def test_is_inside_weights_dir(tmp_path):
    weights = tmp_path / "weights"
    (weights / "v1").mkdir(parents=True)
    assert publish.is_inside(weights / "v1", weights)
    assert not publish.is_inside(weights, weights)
    assert not publish.is_inside(weights / ".." / "elsewhere", weights)
    assert not publish.is_inside("/etc", weights)
    (weights / "link").symlink_to(tmp_path)
    assert not publish.is_inside(weights / "link" / "x", weights)
