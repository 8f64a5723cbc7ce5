"""The learner loop's bookkeeping with a fake bus and trainer (no Redis, no model): what is
trained, dropped, skipped, and when entries are acked."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import structlog

from catq.bus import Delivery
from catq.config import load_config
from catq.learner.checkpoint import TrainingState
from catq.learner.worker import LearnerLoop
from tests.integration.test_learner_restart import make_scored


@dataclass
class FakeBus:
    acked: list[str] = field(default_factory=list)
    published: list = field(default_factory=list)
    version: int = 0
    dead: list = field(default_factory=list)

    async def ack(self, deliveries, group):
        self.acked += [d.entry_id for d in deliveries]

    async def publish(self, stream, message, source=None):
        self.published.append((stream, message))
        return f"{len(self.published)}-0"

    async def set_policy_version(self, version):
        self.version = version

    async def last(self, stream, message_type):
        return None

    async def dead_letter(self, delivery, group, error):
        self.dead.append((delivery.entry_id, error))


@dataclass
class FakeTrainer:
    state: TrainingState
    trained_batches: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    acked_at_checkpoint: list = field(default_factory=list)

    @property
    def trained_id_set(self):
        return set(self.state.trained_ids)

    def train(self, groups, entry_ids):
        self.trained_batches.append(entry_ids)
        self.state.step += 1
        self.state.add_trained(entry_ids)
        return {"step": self.state.step, "reward_mean": 0.5, "groups_used": len(groups),
                "step_time_s": 0.1, "loss": 0.0}

    def save_checkpoint(self):
        self.checkpoints.append((self.state.step, self.state.policy_version, list(self.state.trained_ids)))

    def write_weights(self):
        return f"/nowhere/v{self.state.policy_version}"


def delivery(entry_id, rewards, version):
    return Delivery("scored", entry_id, make_scored(hash(entry_id) % 1000, rewards, version), 1, b"")


def loop(tmp_path, state, **learner):
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"max_staleness": 2, "batch_groups": 2,
                                                        "checkpoint_every": 2, "publish_every": 2,
                                                        **learner})
    return LearnerLoop(config, FakeBus(), FakeTrainer(state), structlog.get_logger())


async def test_intake_drops_stale_skips_zero_variance_and_already_trained(tmp_path):
    lp = loop(tmp_path, TrainingState(step=3, policy_version=5, trained_ids=["1-0"]))
    await lp.intake([
        delivery("1-0", [1.0, 0.0], 5),   # already trained (redelivered after a crash)
        delivery("2-0", [1.0, 0.0], 2),   # 3 versions old > max_staleness 2
        delivery("3-0", [1.0, 1.0], 5),   # zero variance
        delivery("4-0", [1.0, 0.0], 3),   # 2 versions old: kept
        delivery("4-0", [1.0, 0.0], 3),   # redelivery of something held: ignored
        delivery("5-0", [1.0, 0.0, 0.5], 5),  # fine
    ])
    bad = delivery("6-0", [1.0, 0.0], 5)
    bad.message.group.rollouts[0].logprobs.pop()
    await lp.intake([bad])
    assert [e for e, _ in lp.bus.dead] == ["6-0"] and "log-probs" in lp.bus.dead[0][1]
    assert [d.entry_id for d in lp.buffer] == ["4-0", "5-0"]
    assert sorted(lp.bus.acked) == ["1-0", "2-0", "3-0"]
    assert (lp.counts.skipped_trained, lp.counts.dropped_stale, lp.counts.skipped_zero_variance) == (1, 1, 1)


async def test_acks_wait_for_the_checkpoint_and_publishing_bumps_the_version(tmp_path):
    lp = loop(tmp_path, TrainingState())
    await lp.intake([delivery(f"{i}-0", [1.0, 0.0], 0) for i in range(1, 5)])
    assert lp.batch_ready()
    await lp.step()                      # step 1: no checkpoint due (every 2)
    assert lp.bus.acked == [] and lp.trainer.checkpoints == []
    assert [d.entry_id for d in lp.held] == ["1-0", "2-0"]
    await lp.step()                      # step 2: checkpoint + publish v1, then ack
    assert lp.trainer.checkpoints == [(2, 1, ["1-0", "2-0", "3-0", "4-0"])]
    assert sorted(lp.bus.acked) == ["1-0", "2-0", "3-0", "4-0"] and lp.held == []
    assert lp.bus.version == 1 and lp.bus.published[0][1].policy_version == 1
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[0]["staleness"] == {"0": 2}


async def test_groups_gone_stale_in_the_buffer_are_dropped_at_step_time(tmp_path):
    lp = loop(tmp_path, TrainingState(policy_version=2))
    await lp.intake([delivery("1-0", [1.0, 0.0], 0), delivery("2-0", [0.0, 1.0], 2)])
    lp.trainer.state.policy_version = 3   # the policy moved on
    await lp.step()
    assert lp.trainer.trained_batches == [["2-0"]]
    assert "1-0" in lp.bus.acked


def test_restart_forgets_metrics_of_uncheckpointed_steps(tmp_path):
    lp = loop(tmp_path, TrainingState(step=2))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert lp.forget_lost_steps() == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
