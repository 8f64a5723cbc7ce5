"""Checkpoints and published weight directories (files only, tiny model, no Redis)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

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


def test_prune_removes_what_a_killed_writer_left_but_not_a_live_write(tmp_path):
    weights = tmp_path / "weights"
    for name in ("v4", "v5", ".v1-x8vuvfv5", ".old-v3-abc", ".v5-live", ".v6-live"):
        (weights / name).mkdir(parents=True)
    publish.prune_versions(weights, keep=2)
    # A temp dir for a version older than the newest published has no writer any more; one for
    # the newest (being replaced) or the next (being written) may still be in use.
    assert sorted(p.name for p in weights.iterdir()) == [".v5-live", ".v6-live", "v4", "v5"]


def test_is_inside_weights_dir(tmp_path):
    weights = tmp_path / "weights"
    (weights / "v1").mkdir(parents=True)
    assert publish.is_inside(weights / "v1", weights)
    assert not publish.is_inside(weights, weights)
    assert not publish.is_inside(weights / ".." / "elsewhere", weights)
    assert not publish.is_inside("/etc", weights)
    (weights / "link").symlink_to(tmp_path)
    assert not publish.is_inside(weights / "link" / "x", weights)


def test_published_files_and_directories_are_fsynced_before_they_appear(tmp_path, monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, os.replace
    weights = tmp_path / "weights"

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        if Path(dst).parent == weights:  # the rename that makes a version visible
            inside = {p.relative_to(src) for p in Path(src).rglob("*")}
            assert inside and inside <= {p.relative_to(src) for p in synced if p.is_relative_to(src)}
            assert Path(src) in synced
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = publish.write_weights(tiny_model(), None, weights, 1)
    assert synced[-1] == weights and (path / "config.json").exists()


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_truncated(tmp_path):
    model = tiny_model()
    opt = grpo.make_optimizer(model, lr=1e-2)
    checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainingState(step=1, trained_ids=["1-0"]))
    saved = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    newest = checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainingState(step=2))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a partial write

    restored = tiny_model(seed=9)
    with capture_logs() as logs:
        state = checkpoint.load_latest(tmp_path, restored, grpo.make_optimizer(restored, lr=1e-2))
    assert state.step == 1 and state.trained_ids == ["1-0"]
    assert all(torch.equal(a, b) for a, b in zip(saved, restored.parameters()))
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["checkpoint"] == str(newest)


def test_resume_refuses_to_start_over_when_no_checkpoint_is_readable(tmp_path):
    model = tiny_model()
    opt = grpo.make_optimizer(model, lr=1e-2)
    path = checkpoint.save_checkpoint(tmp_path, model, opt, checkpoint.TrainingState(step=1))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="step-00000001.pt"):
        checkpoint.load_latest(tmp_path, model, opt)
