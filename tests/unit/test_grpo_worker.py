"""The learner loop's bookkeeping with a fake bus and trainer (no Redis, no model): what is
trained, dropped, skipped, and when entries are acked."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import pytest
import structlog

from catq.bus import Delivery, LeaseLost
from catq.config import load_config
from catq.learner.checkpoint import TrainingState
from catq.learner.grpo import StepCancelled, prepare_group
from catq.learner.worker import LearnerLoop
from tests.integration.test_learner_restart import make_scored


@dataclass
class FakeBus:
    acked: list[str] = field(default_factory=list)
    published: list = field(default_factory=list)
    version: int = 0
    dead: list = field(default_factory=list)
    announced: tuple | None = None
    """What ``last("weights")`` answers."""
    fenced_out: bool = False
    """Another learner holds the lease: fenced writes fail."""
    trained_pairs_recorded: set = field(default_factory=set)

    async def ack(self, deliveries, group):
        self.acked += [d.entry_id for d in deliveries]

    async def publish(self, stream, message, source=None):
        self.published.append((stream, message))
        return f"{len(self.published)}-0"

    async def set_policy_version(self, version):
        self.version = version

    async def publish_policy_version(self, lease, token, version, message=None):
        if self.fenced_out:
            raise LeaseLost("fenced out")
        if message is not None:
            self.published.append(("weights", message))
        self.version = version

    async def holds_lease(self, name, token):
        return not self.fenced_out

    async def record_trained(self, pairs, ttl_s):
        self.trained_pairs_recorded.update(pairs)

    async def trained_pairs(self, pairs):
        return set(pairs) & self.trained_pairs_recorded

    async def last(self, stream, message_type):
        return self.announced

    async def dead_letter(self, delivery, group, error):
        self.dead.append((delivery.entry_id, error))


@dataclass
class FakeTrainer:
    state: TrainingState
    trained_batches: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    acked_at_checkpoint: list = field(default_factory=list)
    vocab_size: int = 49_152

    @property
    def trained_id_set(self):
        return set(self.state.trained_ids)

    def prepare(self, message):
        return prepare_group(message, self.vocab_size)

    def train(self, groups, entry_ids, should_stop=None):
        if should_stop is not None and should_stop():
            raise StepCancelled("stopping")
        self.trained_batches.append(entry_ids)
        self.state.step += 1
        self.state.add_trained(entry_ids)
        return {"step": self.state.step, "reward_mean": 0.5, "groups_used": len(groups),
                "step_time_s": 0.1, "loss": 0.0}

    def snapshot(self):
        return None  # as a sharded trainer: the loop writes synchronously

    def save_checkpoint(self):
        self.checkpoints.append((self.state.step, self.state.policy_version, list(self.state.trained_ids)))

    def write_weights(self):
        return f"/nowhere/v{self.state.policy_version}"


class FakeResults:
    def __init__(self):
        self.updates = []

    async def update(self, prompt_id, **fields):
        self.updates.append((prompt_id, fields))


def delivery(entry_id, rewards, version):
    return Delivery("scored", entry_id, make_scored(hash(entry_id) % 1000, rewards, version), 1, b"")


def loop(tmp_path, state, **learner):
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.learner = config.learner.model_copy(update={"max_staleness": 2, "batch_groups": 2,
                                                        "checkpoint_every": 2, "publish_every": 2,
                                                        **learner})
    return LearnerLoop(config, FakeBus(), FakeTrainer(state), structlog.get_logger(), results=FakeResults())


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
    told = {fields["status"]: fields["set_aside"] for _, fields in lp.results.updates}
    assert set(told) == {"set_aside"} and len(lp.results.updates) == 2  # stale and no-signal; not 1-0
    assert [f["set_aside"].split(":")[0] for _, f in lp.results.updates] == ["stale", "no signal"]


async def test_acks_wait_for_the_checkpoint_and_publishing_bumps_the_version(tmp_path):
    lp = loop(tmp_path, TrainingState())
    groups = [delivery(f"{i}-0", [1.0, 0.0], 0) for i in range(1, 5)]
    await lp.intake(groups)
    assert lp.batch_ready()
    await lp.step()                      # step 1: no checkpoint due (every 2)
    assert lp.bus.acked == [] and lp.trainer.checkpoints == [] and lp.results.updates == []
    assert [d.entry_id for d in lp.held] == ["1-0", "2-0"]
    await lp.step()                      # step 2: checkpoint + publish v1, then ack
    assert lp.trainer.checkpoints == [(2, 1, ["1-0", "2-0", "3-0", "4-0"])]
    assert sorted(lp.bus.acked) == ["1-0", "2-0", "3-0", "4-0"] and lp.held == []
    assert lp.bus.version == 1 and lp.bus.published[0][1].policy_version == 1
    trained = [(pid, f["status"], f["trained_in_version"]) for pid, f in lp.results.updates]
    prompt_ids = [d.message.group.prompt.prompt_id for d in groups]
    assert sorted(trained) == sorted((pid, "trained", 1) for pid in prompt_ids)
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


async def test_a_step_stopped_midway_trains_nothing_and_keeps_its_groups_pending(tmp_path):
    lp = loop(tmp_path, TrainingState())
    await lp.intake([delivery(f"{i}-0", [1.0, 0.0], 0) for i in range(1, 3)])
    stop = asyncio.Event()
    stop.set()
    await lp.step(stop)
    assert lp.trainer.trained_batches == [] and lp.trainer.state.step == 0
    assert [d.entry_id for d in lp.buffer] == ["1-0", "2-0"] and lp.bus.acked == [] and lp.held == []
    assert not (tmp_path / "metrics.jsonl").exists()
    await lp.step()  # the next learner (or this one, not stopping) trains them
    assert lp.trainer.trained_batches == [["1-0", "2-0"]]


def test_restart_forgets_metrics_of_uncheckpointed_steps(tmp_path):
    lp = loop(tmp_path, TrainingState(step=2))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert lp.forget_lost_steps() == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


async def test_resuming_from_an_older_checkpoint_never_reuses_an_announced_version(tmp_path):
    from catq.messages import WeightsPublished

    lp = loop(tmp_path, TrainingState(step=3, policy_version=3))
    lp.bus.announced = ("9-0", WeightsPublished(policy_version=4, path="/w/v4", step=4))
    await lp.ensure_announced()
    assert lp.trainer.state.policy_version == 4 and lp.bus.version == 4 and lp.bus.published == []


async def test_a_prompt_and_version_is_trained_once_whatever_entries_carry_it(tmp_path):
    lp = loop(tmp_path, TrainingState(), batch_groups=1, checkpoint_every=1, publish_every=1)
    first, twin = delivery("1-0", [1.0, 0.0], 0), delivery("2-0", [1.0, 0.0], 0)
    twin.message = first.message  # the same group in a second entry (a retried XADD upstream)
    await lp.intake([first, twin])
    assert [d.entry_id for d in lp.buffer] == ["1-0"] and lp.bus.acked == ["2-0"]
    await lp.step()
    late = delivery("3-0", [1.0, 0.0], 0)
    late.message = first.message  # after the commit: known from the recorded pair
    await lp.intake([late])
    await lp.step()
    assert lp.trainer.trained_batches == [["1-0"]] and lp.buffer == []
    assert sorted(lp.bus.acked) == ["1-0", "2-0", "3-0"]
    assert [f["status"] for _, f in lp.results.updates] == ["trained"]  # duplicates' status untouched
    assert lp.counts.skipped_duplicate == 1  # the second since the step's line
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["groups_skipped_duplicate"] == 1


async def test_a_learner_fenced_out_neither_checkpoints_nor_acks_nor_publishes(tmp_path):
    lp = loop(tmp_path, TrainingState(), batch_groups=1, checkpoint_every=1, publish_every=1)
    await lp.intake([delivery("1-0", [1.0, 0.0], 0)])
    lp.bus.fenced_out = True
    with pytest.raises(LeaseLost):
        await lp.step()
    assert lp.trainer.checkpoints == [] and lp.bus.acked == [] and lp.bus.published == []
    assert lp.trainer.state.policy_version == 0 and lp.results.updates == []
