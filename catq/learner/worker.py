"""The learner process: scored groups in, GRPO steps, checkpoints, published weights out.

    catq worker learner --config configs/demo.toml      (or python -m workers.learner)

One learner per run (it alone holds trainable weights). Its loop:

1. Read ``scored`` (consumer group "learner"). Each delivery is first checked: an entry already
   trained into the restored checkpoint is acked and skipped (redelivery after a crash); a group
   more than ``learner.max_staleness`` versions older than the current policy is dropped, counted
   and acked; a group whose rewards are all equal carries no signal and is skipped, counted and
   acked. Everything else waits in the batch buffer.
2. With ``batch_groups`` groups (or a partial batch after ``batch_timeout_s``), take one GRPO
   step (:mod:`catq.learner.grpo`) in a thread, so the event loop keeps the heartbeat going.
3. Append the step's line to ``<run_dir>/metrics.jsonl``. Every ``checkpoint_every`` steps —
   and always on a step that publishes — save a checkpoint (:mod:`catq.learner.checkpoint`)
   that lists the entry ids trained so far, and only then ack those entries. A crash therefore
   loses no scored work (unacked entries come back) and trains nothing twice (the checkpoint
   says what is in the weights). A restarted learner drops the metrics lines of steps newer
   than its checkpoint (they died with the process and are redone), so each step is logged once.
4. Every ``publish_every`` steps, bump the policy version, write ``<weights_dir>/v<version>/``,
   announce it on ``weights`` and set the run's policy version in Redis (rollout's backpressure
   reads it). A learner that died between checkpoint and announcement announces on restart.

Held entries must not be reclaimed from under the learner: a batch can take minutes on CPU,
longer than the bus's claim idle time, and a self-reclaim would count as a failed delivery. So
the learner uses a fixed consumer name and its own bus settings with a very long claim idle time,
and on start reclaims its previous incarnation's pending entries at once (the one moment a
short idle time is right: no other learner can be holding them). Each restart counts as a
delivery, so an entry held through more than ``bus.max_attempts`` learner crashes is
dead-lettered by the bus — which also ends a crash loop on a group that kills the learner.
Groups that cannot be trained on (mismatched lengths) are dead-lettered at intake.

Each ``metrics.jsonl`` line is one optimizer step; ``catq eval --run RUN --plot`` draws the
training curves from these keys (with ``learner.tensorboard`` the numeric ones are also written
to ``<run_dir>/tb/``, :mod:`catq.learner.tensorboard`):

- ``step``: optimizer steps taken, this one included.
- ``policy_version``: the version the weights carry after this step: the new version when the
  step publishes, else the last published one (which rollouts sample from; the weights already
  hold this step's unpublished update).
- ``time``: unix time the step finished. ``elapsed_s``: seconds since this learner process
  started (its LearnerLoop was made); a restarted learner counts from 0 again, so use ``time``
  for a curve across restarts.
- ``reward_mean``, ``kl``, ``clip_frac`` and the rest of :func:`catq.learner.grpo.train_step`'s
  metrics; ``kl`` and ``clip_frac`` are 0.0 on a step that took no update.
- ``signal_frac``: of the groups that reached the learner since the last line (this batch, plus
  zero-variance groups set aside at intake; stale and already-trained groups not counted), the
  fraction with signal: ``groups_used / (groups_used + groups_skipped +
  groups_skipped_zero_variance)``.
- ``reference_present_frac``: of those same groups, the fraction whose reference had a final
  answer (:func:`has_reference`).
- ``staleness`` (histogram: versions behind -> groups), the ``groups_*`` counts of
  :class:`Counts`, and ``entry_ids``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from catq.config import BusConfig, Config
from catq.learner.tensorboard import TensorBoardLog
from catq.log import default_worker_id, setup_logging
from catq.messages import ScoredGroup

ROLE = "learner"
GROUP = "learner"
CONSUMER = "learner"
"""Fixed consumer name: there is one learner, and a restart takes over its own pending entries."""
HOLD_CLAIM_IDLE_MS = 7 * 24 * 3600 * 1000
"""Claim idle time while running: never reclaim entries the learner itself is holding."""
STARTUP_CLAIM_IDLE_MS = 100
"""Claim idle time for the first reads after a (re)start: take back everything pending."""


@dataclass
class Counts:
    """Groups set aside since the last logged step."""

    dropped_stale: int = 0
    skipped_zero_variance: int = 0
    zero_variance_with_reference: int = 0
    """Of ``skipped_zero_variance``, those whose reference had a final answer."""
    skipped_trained: int = 0

    def as_dict(self) -> dict:
        return {
            "groups_dropped_stale": self.dropped_stale,
            "groups_skipped_zero_variance": self.skipped_zero_variance,
            "groups_skipped_already_trained": self.skipped_trained,
        }


@dataclass
class LearnerLoop:
    """The asynchronous side of the learner: bus, batching, acks, metrics. The training side
    (models, optimizer, files) is :class:`catq.learner.trainer.Trainer`, called in a thread."""

    config: Config
    bus: object
    trainer: object
    log: structlog.BoundLogger
    buffer: list = field(default_factory=list)
    """Deliveries accepted for training, oldest first."""
    held: list = field(default_factory=list)
    """Deliveries trained into the current weights but not yet checkpointed (not acked)."""
    counts: Counts = field(default_factory=Counts)
    buffer_since: float | None = None
    started: float = field(default_factory=time.monotonic)
    """Monotonic time this loop was made: ``elapsed_s`` counts from here."""
    tensorboard: TensorBoardLog | None = None
    """Mirror of the metrics lines; opened from ``learner.tensorboard`` when not given."""

    def __post_init__(self) -> None:
        if self.tensorboard is None:
            self.tensorboard = TensorBoardLog.open(self.config)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    @property
    def known_ids(self) -> set[str]:
        return {d.entry_id for d in self.buffer} | {d.entry_id for d in self.held}

    async def intake(self, deliveries: list) -> None:
        """Sort fresh deliveries into the buffer or ack them at once (trained/stale/no signal)."""
        from catq.learner.grpo import group_advantages

        known, trained = self.known_ids, self.trainer.trained_id_set
        done_now = []
        for delivery in deliveries:
            if delivery.entry_id in known:
                continue  # a redelivery of something we hold
            message: ScoredGroup = delivery.message
            if delivery.entry_id in trained:
                self.counts.skipped_trained += 1
                done_now.append(delivery)
            elif self.staleness(message) > self.config.learner.max_staleness:
                self.counts.dropped_stale += 1
                done_now.append(delivery)
            elif (problem := malformed(message)) is not None:
                await self.bus.dead_letter(delivery, GROUP, problem)
            elif group_advantages(message.rewards) is None:
                self.counts.skipped_zero_variance += 1
                self.counts.zero_variance_with_reference += has_reference(message)
                done_now.append(delivery)
            else:
                self.buffer.append(delivery)
                known.add(delivery.entry_id)
        if done_now:
            await self.bus.ack(done_now, GROUP)
            self.log.info("groups set aside", buffered=len(self.buffer), **self.counts.as_dict())
        if self.buffer and self.buffer_since is None:
            self.buffer_since = time.monotonic()

    def staleness(self, message: ScoredGroup) -> int:
        return self.trainer.state.policy_version - message.group.policy_version

    def batch_ready(self) -> bool:
        cfg = self.config.learner
        if len(self.buffer) >= cfg.batch_groups:
            return True
        waited = time.monotonic() - (self.buffer_since or time.monotonic())
        return bool(self.buffer) and cfg.batch_timeout_s > 0 and waited >= cfg.batch_timeout_s

    async def step(self) -> None:
        """Take one training step on the oldest buffered groups; checkpoint/publish when due."""
        cfg = self.config.learner
        batch, self.buffer = self.buffer[: cfg.batch_groups], self.buffer[cfg.batch_groups :]
        self.buffer_since = time.monotonic() if self.buffer else None
        fresh = [d for d in batch if self.staleness(d.message) <= cfg.max_staleness]
        stale = [d for d in batch if self.staleness(d.message) > cfg.max_staleness]
        if stale:  # the policy moved on while they waited in the buffer
            self.counts.dropped_stale += len(stale)
            await self.bus.ack(stale, GROUP)
        if not fresh:
            return
        histogram = Counter(str(self.staleness(d.message)) for d in fresh)
        metrics = await asyncio.to_thread(
            self.trainer.train, [d.message for d in fresh], [d.entry_id for d in fresh]
        )
        self.held.extend(fresh)
        publish = self.trainer.state.step % cfg.publish_every == 0
        line = self.metrics_line(metrics, fresh, histogram, publish)
        self.counts = Counts()
        self.write_metrics(line)
        if publish or self.trainer.state.step % cfg.checkpoint_every == 0:
            await self.commit(publish=publish)
        self.log.info(
            "step",
            step=line["step"],
            version=self.trainer.state.policy_version,
            loss=round(line.get("loss", 0.0), 5),
            reward=round(line["reward_mean"], 3),
            kl=round(line.get("kl", 0.0), 6),
            clip=round(line.get("clip_frac", 0.0), 4),
            groups=line["groups_used"],
            tokens_per_s=round(line.get("tokens_per_s", 0.0), 1),
            step_s=round(line["step_time_s"], 2),
        )

    def metrics_line(self, metrics: dict, fresh: list, histogram: Counter, publish: bool) -> dict:
        """The step's metrics.jsonl line (keys: see the module docstring)."""
        messages = [d.message for d in fresh]
        return {
            **metrics,
            "policy_version": self.trainer.state.policy_version + int(publish),
            "elapsed_s": time.monotonic() - self.started,
            **group_fractions(metrics, messages, self.counts),
            "staleness": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            **self.counts.as_dict(),
            "entry_ids": [d.entry_id for d in fresh],
        }

    async def commit(self, publish: bool = False) -> None:
        """Checkpoint (publishing first bumps the version), then ack the held entries the
        checkpoint covers, then write and announce the new weights."""
        if publish:
            self.trainer.state.policy_version += 1
        await asyncio.to_thread(self.trainer.save_checkpoint)
        if self.held:
            await self.bus.ack(self.held, GROUP)
            self.held = []
        if publish:
            await self.announce_current()

    async def announce_current(self) -> None:
        from catq.learner import publish

        state = self.trainer.state
        path = await asyncio.to_thread(self.trainer.write_weights)
        await publish.announce(self.bus, state.policy_version, path, state.step)
        await self.bus.set_policy_version(state.policy_version)
        removed = publish.prune_versions(self.config.weights_dir, self.config.learner.keep_versions)
        self.log.info("published", version=state.policy_version, path=str(path), pruned=removed)

    async def ensure_announced(self) -> None:
        """On start: if the checkpoint's version was never announced (crash in between), publish
        it now; then tell Redis the current version."""
        from catq.messages import WeightsPublished

        version = self.trainer.state.policy_version
        last = await self.bus.last("weights", WeightsPublished)
        announced = last[1].policy_version if last else 0
        if version > announced:
            await self.announce_current()
        await self.bus.set_policy_version(version)

    @property
    def metrics_path(self) -> Path:
        return self.config.run_path / "metrics.jsonl"

    def write_metrics(self, line: dict) -> None:
        path = self.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(line)

    def forget_lost_steps(self) -> int:
        """Drop metrics lines of steps newer than the restored checkpoint: those updates died
        with the previous process and are about to be redone (and logged again). Returns the
        number of lines dropped."""
        path, step = self.metrics_path, self.trainer.state.step
        if not path.exists():
            return 0
        lines = path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and _step_of(ln) <= step]
        if len(kept) == len(lines):
            return 0
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept))
        os.replace(tmp, path)
        return len(lines) - len(kept)

    async def read(self, bus) -> list:
        cfg = self.config.learner
        return await bus.read(
            "scored", GROUP, CONSUMER,
            count=max(1, cfg.batch_groups - len(self.buffer)),
            message_type=ScoredGroup,
            block_ms=self.config.bus.block_ms,
        )

    async def reclaim_previous(self) -> None:
        """Take back entries a previous learner process left pending, in one read with a short
        claim idle time (one read, so nothing is claimed twice). The learner never holds more
        than a few batches, far below the read's count."""
        from catq.bus import Bus

        cfg = self.config.learner
        count = max(1000, 4 * cfg.batch_groups * cfg.checkpoint_every)
        startup = Bus(self.config.redis_url, self.config.run, self._bus_config(STARTUP_CLAIM_IDLE_MS))
        try:
            await asyncio.sleep(2 * STARTUP_CLAIM_IDLE_MS / 1000)
            deliveries = await startup.read(
                "scored", GROUP, CONSUMER, count=count, message_type=ScoredGroup, block_ms=1
            )
            await self.intake(deliveries)
        finally:
            await startup.close()

    def _bus_config(self, claim_idle_ms: int) -> BusConfig:
        return self.config.bus.model_copy(update={"claim_idle_ms": claim_idle_ms})

    async def run(self, stop: asyncio.Event) -> None:
        try:
            dropped = self.forget_lost_steps()
            if dropped:
                self.log.info("metrics of uncheckpointed steps dropped; they will be redone",
                              lines=dropped)
            await self.ensure_announced()
            await self.reclaim_previous()
            max_steps = self.config.learner.max_steps
            while not stop.is_set() and self.trainer.state.step < max_steps:
                if self.batch_ready():
                    await self.step()
                    continue
                await self.intake(await self.read(self.bus))
            if self.held:
                await self.commit(publish=False)
        finally:
            self.close()


async def run(config: Config) -> None:
    """Run the learner until SIGTERM/SIGINT or ``learner.max_steps``."""
    from catq.bus import Bus
    from catq.learner.trainer import Trainer
    from catq.runtime import heartbeat_loop, install_stop_signals

    worker_id = default_worker_id(ROLE)
    log = setup_logging(ROLE, worker_id)
    stop = asyncio.Event()
    install_stop_signals(stop)
    bus_config = config.bus.model_copy(update={"claim_idle_ms": HOLD_CLAIM_IDLE_MS})
    bus = Bus(config.redis_url, config.run, bus_config)
    heartbeat = asyncio.create_task(heartbeat_loop(bus, ROLE, worker_id, config.worker.heartbeat_s))
    try:
        tensorboard = TensorBoardLog.open(config)  # before the model load: a missing extra fails fast
        trainer = await asyncio.to_thread(Trainer.from_config, config)
        log.info("learner ready", step=trainer.state.step, version=trainer.state.policy_version,
                 device=str(trainer.device))
        await LearnerLoop(config, bus, trainer, log, tensorboard=tensorboard).run(stop)
        log.info("learner stopped", step=trainer.state.step, version=trainer.state.policy_version)
    finally:
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await bus.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def has_reference(message: ScoredGroup) -> bool:
    """Whether the group's reference had a final answer: math, an extracted ``reference_answer``;
    open, a non-empty rubric."""
    referenced = message.referenced
    if message.group.prompt.task == "math":
        return referenced.reference_answer is not None
    return bool(referenced.rubric)


def group_fractions(metrics: dict, messages: list[ScoredGroup], counts: Counts) -> dict:
    """``signal_frac`` and ``reference_present_frac`` over this batch's groups (``messages``,
    used or skipped by the step) plus the zero-variance groups set aside at intake (``counts``)."""
    used = metrics.get("groups_used", 0)
    seen = used + metrics.get("groups_skipped", 0) + counts.skipped_zero_variance
    with_reference = sum(map(has_reference, messages)) + counts.zero_variance_with_reference
    return {
        "signal_frac": used / seen if seen else 0.0,
        "reference_present_frac": with_reference / seen if seen else 0.0,
    }


def malformed(message: ScoredGroup) -> str | None:
    """Why a scored group cannot be trained on (it is dead-lettered), or None."""
    from catq.learner.grpo import prepare_batch

    try:
        prepare_batch([message])
    except ValueError as exc:
        return f"malformed scored group: {exc}"
    if not message.group.prompt_token_ids:
        return "malformed scored group: no prompt_token_ids"
    return None
