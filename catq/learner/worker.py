"""The learner process: scored groups in, GRPO steps, checkpoints, published weights out.

    catq worker learner --config configs/demo.toml      (or python -m workers.learner)

One learner per run (it alone holds trainable weights), enforced by a lease in Redis with a
fencing token (:mod:`catq.learner.lease`): a learner takes it before loading its checkpoint (a
second one waits for it), every commit and announcement is fenced by it, and a learner that lost
it exits 1 with a one-line message instead of publishing. :class:`LearnerLoop` puts the parts
together:

1. Read ``scored`` (consumer group "learner") and sort each delivery into the batch buffer or
   set it aside: :mod:`catq.learner.intake`.
2. With ``batch_groups`` groups (or a partial batch after ``batch_timeout_s``), take one GRPO
   step (:mod:`catq.learner.grpo`) in a thread, so the event loop keeps the heartbeat going.
   A stop signal abandons the step at the next micro-batch boundary (nothing applied, nothing
   acked: the groups are trained by the next learner). A step whose loss or gradient norm is
   NaN or infinite applies nothing either: it is logged and counted, and its groups are acked
   with status "set_aside" (why: "non-finite loss" or "non-finite gradient norm").
3. Append the step's line to ``<run_dir>/metrics.jsonl`` (:mod:`catq.learner.metrics_log`).
4. Checkpoint, ack and publish when due (:mod:`catq.learner.commit`), in the background.
5. At ``learner.max_steps`` it stops, and a learner started at ``max_steps`` reads nothing (a
   read would count as a delivery of each pending entry, dead-lettering them after a few
   restarts).
The role's wiring (lease, torchrun ranks, the bus it reads with) is :mod:`catq.roles.learner`.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import structlog

from catq.bus import Delivery
from catq.config import Config
from catq.learner.commit import Committer
from catq.learner.grpo import NonFiniteStep, StepCancelled
from catq.learner.intake import Counts, Intake, has_reference, pair_of, prepare  # noqa: F401
from catq.learner.lease import Lease
from catq.learner.metrics_log import LEARNER_SUMMARY, MetricsLog, group_fractions  # noqa: F401
from catq.learner.protocols import Broadcaster, LearnerBus, LearnerTrainer, ResultSink
from catq.learner.tensorboard import TensorBoardLog

ROLE = "learner"


class LearnerLoop:
    """The asynchronous side of the learner: the intake, the steps, the committer and the
    metrics log. The training side (models, optimizer, files) is
    :class:`catq.learner.trainer.Trainer`, called in a thread.

    ``results``: the ResultStore the learner writes its verdicts to (None: nobody is told).
    ``tensorboard``: mirror of the metrics lines; opened from ``learner.tensorboard`` when not
    given. ``lease``: the learner lease this process holds, which fences commits and
    announcements; when not given, an unacquired one (its token is none Redis handed out, so it
    can publish nothing). ``broadcaster``: sends each version to the replicas before it is
    announced (``weight_sync = "distributed"``)."""

    def __init__(self, config: Config, bus: LearnerBus, trainer: LearnerTrainer, log: structlog.BoundLogger, *,
                 results: ResultSink | None = None, tensorboard: TensorBoardLog | None = None,
                 lease: Lease | None = None, broadcaster: Broadcaster | None = None) -> None:
        self.config, self.bus, self.trainer, self.log = config, bus, trainer, log
        self.metrics = MetricsLog(config, bus, log, tensorboard if tensorboard is not None else TensorBoardLog.open(config))
        self.lease = lease if lease is not None else Lease(bus, ROLE)
        self.broadcaster = broadcaster
        self.inbox = Intake(config, bus, trainer, log, results)
        self.committer = Committer(config, bus, trainer, log, self.lease, results, broadcaster)

    @property
    def results(self) -> ResultSink | None:
        return self.inbox.results

    @results.setter
    def results(self, results: ResultSink | None) -> None:
        self.inbox.results = self.committer.results = results

    # The parts' state, read where tests and the loop look for it.
    buffer = property(lambda self: self.inbox.buffer, doc="Deliveries accepted for training, oldest first.")
    prepared = property(lambda self: self.inbox.prepared, doc="Entry id -> its group prepared for training.")
    counts = property(lambda self: self.inbox.counts, doc="Groups set aside since the last line.")
    held = property(lambda self: self.committer.held, doc="Trained, not yet checkpointed (not acked).")
    writing = property(lambda self: self.committer.writing, doc="Being committed in the background.")
    committing = property(lambda self: self.committer.committing, doc="The background commit, if any.")
    started = property(lambda self: self.metrics.started, doc="When ``elapsed_s`` began.")

    async def intake(self, deliveries: list[Delivery]) -> None:
        await self.inbox.take(deliveries, self.committer.holding)

    def batch_ready(self) -> bool:
        return self.inbox.batch_ready()

    async def settle(self) -> None:
        await self.committer.settle()

    async def ensure_announced(self) -> None:
        await self.committer.ensure_announced()

    def forget_lost_steps(self) -> int:
        return self.metrics.forget_lost_steps(self.trainer.state.step)

    def close(self) -> None:
        self.metrics.close()

    async def step(self, stop: asyncio.Event | None = None) -> None:
        """Take one training step on the oldest buffered groups; checkpoint/publish when due.
        When ``stop`` is set mid-step, the step is abandoned at a micro-batch boundary and its
        groups go back to the buffer (unacked: a restarted learner trains them)."""
        cfg = self.config.learner
        fresh = await self.inbox.next_batch()
        if not fresh:
            return
        histogram = Counter(str(self.inbox.staleness(d.message)) for d in fresh)
        try:
            metrics = await asyncio.to_thread(
                self.trainer.train, [self.inbox.prepared[d.entry_id] for d in fresh], [d.entry_id for d in fresh],
                stop.is_set if stop is not None else None,  # a bool read: safe from the training thread
            )
        except StepCancelled:
            self.inbox.buffer[:0] = fresh
            self.log.info("step abandoned: stopping", groups=len(fresh))
            return
        except NonFiniteStep as exc:
            await self.inbox.skip_nonfinite(fresh, str(exc))
            return
        self.inbox.forget(fresh)
        self.committer.held.extend(fresh)
        publish = self.trainer.state.step % cfg.publish_every == 0
        line = self.metrics.line(metrics, fresh, histogram, self.inbox.counts,
                                 self.trainer.state.policy_version + int(publish))
        self.inbox.counts = Counts()
        self.metrics.write(line)
        await self.metrics.report(line)
        if publish or self.trainer.state.step % cfg.checkpoint_every == 0:
            await self.committer.commit(publish=publish)
        self.log.info(
            "step", step=line["step"], version=self.trainer.state.policy_version,
            loss=round(line.get("loss", 0.0), 5), reward=round(line["reward_mean"], 3),
            kl=round(line.get("kl", 0.0), 6), clip=round(line.get("clip_frac", 0.0), 4),
            groups=line["groups_used"], tokens_per_s=round(line.get("tokens_per_s", 0.0), 1),
            step_s=round(line["step_time_s"], 2),
        )

    def done(self) -> bool:
        return self.trainer.state.step >= self.config.learner.max_steps

    async def run(self, stop: asyncio.Event) -> None:
        try:
            dropped = self.forget_lost_steps()
            if dropped:
                self.log.info("metrics of uncheckpointed steps dropped; they will be redone", lines=dropped)
            await self.ensure_announced()
            if self.done():
                # Read nothing: each read of a pending entry counts as a delivery, and a learner
                # restarted at max_steps again and again would dead-letter work it never does.
                self.log.info("max_steps reached: reading nothing", step=self.trainer.state.step,
                              max_steps=self.config.learner.max_steps)
                return
            await self.intake(await self.inbox.reclaim_previous())
            while not stop.is_set() and not self.done():
                if self.committer.finished():
                    await self.settle()  # a failed background commit (lease lost) stops us now
                if self.batch_ready():
                    await self.step(stop)
                    continue
                await self.intake(await self.inbox.read(self.bus))
            await self.settle()
            if self.held:
                await self.committer.commit(publish=False)
            await self.settle()
        finally:
            self.committer.abandon()  # failing: its entries stay unacked and come back
            self.close()
            if self.broadcaster is not None:
                await self.broadcaster.aclose()
