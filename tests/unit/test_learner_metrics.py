"""The learner's metrics.jsonl lines (the training curves' source) and their TensorBoard copy:
a real Trainer on a tiny random model, a fake bus (no Redis)."""

from __future__ import annotations

import json
import sys
import time

import pytest
import structlog

from catq.bus import Delivery
from catq.config import ConfigError, load_config
from catq.learner import grpo
from catq.learner.trainer import Trainer
from catq.learner.worker import Counts, LearnerLoop, group_fractions
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.integration.test_learner_restart import make_scored
from tests.unit.test_grpo_worker import FakeBus

CURVE_KEYS = {"step", "policy_version", "time", "elapsed_s", "reward_mean", "kl", "clip_frac",
              "signal_frac", "reference_present_frac"}


def delivery(index: int, rewards: list[float], version: int = 3, *, task: str = "math",
             answer: str | None = "4", rubric: tuple[str, ...] = ()) -> Delivery:
    scored = make_scored(index, rewards, version)
    scored.group.prompt.task = task
    scored.referenced.reference_answer = answer if task == "math" else None
    scored.referenced.rubric = list(rubric)
    return Delivery("scored", f"{index}-0", scored, 1, b"")


def make_loop(tmp_path, model_path, **learner) -> LearnerLoop:
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.model = config.model.model_copy(update={"policy": str(model_path), "anchor": str(model_path)})
    config.learner = config.learner.model_copy(update={
        "device": "cpu", "lr": 1e-3, "batch_groups": 3, "micro_batch_rollouts": 4,
        "max_staleness": 1, "checkpoint_every": 1, "publish_every": 2, **learner,
    })
    trainer = Trainer.from_config(config)
    trainer.state.policy_version = 3
    return LearnerLoop(config, FakeBus(), trainer, structlog.get_logger())


def lines(tmp_path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


async def test_step_line_has_curve_keys_with_group_fractions(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path)
    lp.trainer.state.add_trained(["9-0"])
    await lp.intake([
        delivery(1, [1.0, 0.0]),                                    # signal, answer
        delivery(2, [0.0, 1.0, 0.5], task="open", rubric=("polite",)),  # signal, rubric
        delivery(3, [1.0, 0.0], answer=None),                       # signal, no answer
        delivery(4, [1.0, 1.0], answer=None),                       # zero variance, no answer
        delivery(5, [0.0, 0.0], task="open"),                       # zero variance, no rubric
        delivery(6, [1.0, 0.0], version=1),                         # stale: not counted
        delivery(9, [1.0, 0.0]),                                    # already trained: not counted
    ])
    before = time.time()
    await lp.step()                                                 # step 1: no publish
    await lp.intake([delivery(i, [1.0, 0.0]) for i in (10, 11, 12)] + [delivery(13, [1.0, 1.0])])
    await lp.step()                                                 # step 2: publishes v4
    await lp.settle()                                               # (written in the background)
    first, second = lines(tmp_path)
    assert CURVE_KEYS <= set(first) and CURVE_KEYS <= set(second)
    assert (first["step"], first["policy_version"]) == (1, 3)
    assert (second["step"], second["policy_version"]) == (2, 4) and lp.bus.version == 4
    assert before <= first["time"] <= second["time"] <= time.time()
    assert 0 < first["elapsed_s"] <= second["elapsed_s"] <= time.monotonic() - lp.started
    assert first["reward_mean"] == pytest.approx((1 + 0 + 0 + 1 + 0.5 + 1 + 0) / 7)
    assert first["updated"] and first["kl"] >= 0.0 and 0.0 <= first["clip_frac"] <= 1.0
    assert first["signal_frac"] == pytest.approx(3 / 5)
    assert first["reference_present_frac"] == pytest.approx(2 / 5)
    assert (first["groups_skipped_zero_variance"], first["groups_dropped_stale"],
            first["groups_skipped_already_trained"]) == (2, 1, 1)
    assert second["signal_frac"] == pytest.approx(3 / 4)   # counts restart after each line
    assert second["reference_present_frac"] == pytest.approx(1.0)


def test_groups_skipped_within_the_batch_count_against_signal():
    message = delivery(1, [1.0, 1.0]).message
    counts = Counts(skipped_zero_variance=1, zero_variance_with_reference=0)
    fractions = group_fractions({"groups_used": 2, "groups_skipped": 1}, [message] * 3, counts)
    assert fractions["signal_frac"] == pytest.approx(2 / 4)
    assert fractions["reference_present_frac"] == pytest.approx(3 / 4)


def test_a_step_without_update_still_reports_kl_and_clip_frac():
    metrics = grpo.train_step(None, None, grpo.PreparedBatch(samples=[]), grpo.StepConfig())
    assert (metrics["updated"], metrics["kl"], metrics["clip_frac"]) == (False, 0.0, 0.0)


async def test_line_without_update_keeps_the_curve_keys(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, batch_groups=1)
    empty = delivery(1, [1.0, 0.0])
    for rollout in empty.message.group.rollouts:
        rollout.token_ids, rollout.logprobs = [], []
    await lp.intake([empty])
    await lp.step()
    (line,) = lines(tmp_path)
    assert CURVE_KEYS <= set(line) and not line["updated"]
    assert (line["kl"], line["clip_frac"], line["signal_frac"]) == (0.0, 0.0, 1.0)


async def test_tensorboard_mirrors_numeric_scalars_per_step(tmp_path, tiny_model_path):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lp = make_loop(tmp_path, tiny_model_path, batch_groups=2, tensorboard=True)
    for step in range(2):
        await lp.intake([delivery(10 * step + i, [1.0, 0.0, 0.5 * i]) for i in range(2)])
        await lp.step()
    lp.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{k}" for k in CURVE_KEYS} <= tags
    assert not {"train/updated", "train/entry_ids", "train/staleness"} & tags
    logged = [(m["step"], m["reward_mean"]) for m in lines(tmp_path)]
    read_back = [(e.step, e.value) for e in events.Scalars("train/reward_mean")]
    assert [s for s, _ in read_back] == [1, 2]
    assert [v for _, v in read_back] == pytest.approx([v for _, v in logged])


def test_missing_tensorboard_fails_at_start_up_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import now fails
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"tensorboard": True})
    with pytest.raises(ImportError, match=r"pip install -e '\.\[tensorboard\]'"):
        LearnerLoop(config, FakeBus(), trainer=None, log=structlog.get_logger())


def test_tensorboard_flag_validates(tmp_path):
    path = tmp_path / "c.toml"
    assert load_config(None).learner.tensorboard is False
    path.write_text("[learner]\ntensorboard = true\n")
    assert load_config(path).learner.tensorboard is True
    path.write_text("[learner]\ntensorboard = 'maybe'\n")
    with pytest.raises(ConfigError, match="learner.tensorboard"):
        load_config(path)
