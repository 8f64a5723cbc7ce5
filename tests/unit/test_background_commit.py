"""learner.background_commit: the checkpoint and published version of a step are written from a
snapshot while the next step trains. A real Trainer on a tiny random model, a fake bus."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from catq.bus import LeaseLost
from catq.learner.checkpoint import checkpoint_path, list_checkpoints
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.unit.test_learner_metrics import delivery, make_loop


def checkpoint(lp, step: int) -> dict:
    return torch.load(checkpoint_path(lp.config.checkpoint_dir, step), weights_only=True)


def live_state(lp) -> dict:
    return {name: t.detach().clone() for name, t in lp.trainer.policy.state_dict().items()}


async def two_steps(lp) -> dict:
    """Train two one-group steps, each publishing; returns the policy right after step 1."""
    await lp.intake([delivery(1, [1.0, 0.0]), delivery(2, [0.0, 1.0])])
    await lp.step()
    after_first = live_state(lp)
    await lp.step()
    await lp.settle()
    return after_first


async def test_a_background_commit_writes_its_own_steps_state_and_acks_after_it(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, batch_groups=1, publish_every=1, background_commit=True)
    await lp.intake([delivery(1, [1.0, 0.0]), delivery(2, [0.0, 1.0])])
    await lp.step()
    after_first = live_state(lp)
    assert lp.committing is not None and [d.entry_id for d in lp.writing] == ["1-0"]
    assert lp.bus.acked == [] and lp.trainer.state.policy_version == 4

    await lp.intake([delivery(1, [1.0, 0.0])])  # redelivered while its commit is written: known
    assert [d.entry_id for d in lp.buffer] == ["2-0"]
    await lp.step()  # trains while step 1's files are written; its own commit waits for them
    await lp.settle()

    assert lp.bus.acked == ["1-0", "2-0"] and lp.writing == [] and lp.held == []
    assert [m.policy_version for s, m in lp.bus.published if s == "weights"] == [4, 5]
    first, second = checkpoint(lp, 1), checkpoint(lp, 2)
    assert (first["step"], first["policy_version"], first["trained_ids"]) == (1, 4, ["1-0"])
    assert all(torch.equal(first["model"][k], v) for k, v in after_first.items())
    assert all(torch.equal(second["model"][k], v) for k, v in live_state(lp).items())
    assert not all(torch.equal(after_first[k], v) for k, v in live_state(lp).items())  # step 2 moved it
    published = load_file(str(lp.config.weights_dir / "v4" / "model.safetensors"))
    assert published and all(torch.equal(t, after_first[name]) for name, t in published.items())


async def test_background_and_waiting_commits_write_the_same_checkpoints(tmp_path, tiny_model_path):  # noqa: F811
    runs = {}
    for background in (False, True):
        (tmp_path / str(background)).mkdir()
        lp = make_loop(tmp_path / str(background), tiny_model_path, batch_groups=1, publish_every=1,
                       background_commit=background)
        torch.manual_seed(0)
        await two_steps(lp)
        runs[background] = [checkpoint(lp, step) for step in (1, 2)]
    for waited, written in zip(runs[False], runs[True]):
        assert waited["trained_ids"] == written["trained_ids"] and waited["step"] == written["step"]
        assert waited["model"].keys() == written["model"].keys()
        assert all(torch.equal(waited["model"][k], written["model"][k]) for k in waited["model"])
        for a, b in zip(waited["optimizer"]["state"].values(), written["optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a)


async def test_a_learner_fenced_out_before_its_background_write_writes_and_acks_nothing(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, batch_groups=1, publish_every=1, background_commit=True)
    await lp.intake([delivery(1, [1.0, 0.0])])
    await lp.step()
    lp.bus.fenced_out = True  # another learner took over while this step's files wait to be written
    with pytest.raises(LeaseLost):
        await lp.settle()
    assert lp.bus.acked == [] and lp.bus.published == []
    assert list_checkpoints(lp.config.checkpoint_dir) == []
