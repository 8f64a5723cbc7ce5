"""The learner's committer: checkpoint, then trained records + acks + verdicts, then the new
weights written and announced; one commit at a time, in order.

Every ``checkpoint_every`` steps — and always on a step that publishes — save a checkpoint
(:mod:`catq.learner.checkpoint`) that lists the entry ids trained so far, and only then record
their (prompt, version) pairs, ack those entries and set their prompts' status to "trained"
(with ``trained_in_version``). A crash therefore loses no scored work (unacked entries come
back) and trains nothing twice (the checkpoint says what is in the weights).

Every ``publish_every`` steps, bump the policy version, write ``<weights_dir>/v<version>/``
(fsynced), then announce it on ``weights`` and set the run's policy version in Redis (rollout's
backpressure reads it) in one fenced step. A learner that died between checkpoint and
announcement announces on restart (:meth:`Committer.ensure_announced`).

With ``learner.background_commit`` (the default, one process), these writes run in a task while
the next step trains: the loop copies the policy, optimizer and training state to host memory
between steps and writes the checkpoint and the version from that copy; acks and the
announcement still follow the fsynced checkpoint, and the next commit waits for this one.
Entries being written count as held, so a redelivery of one is ignored. On 2 CPU cores the
checkpoint took 2–4 s of each 6–12 s step (bench/pipeline.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from catq.bus import Delivery
from catq.config import Config
from catq.learner.intake import GROUP, pair_of
from catq.learner.lease import Lease
from catq.learner.protocols import Broadcaster, LearnerBus, LearnerTrainer, ResultSink
from catq.results import Status
from catq.topology import WEIGHTS


@dataclass
class Committer:
    config: Config
    bus: LearnerBus
    trainer: LearnerTrainer
    log: structlog.BoundLogger
    lease: Lease
    """Fences every commit and announcement."""
    results: ResultSink | None = None
    """Where the "trained" verdicts go (None: nobody is told)."""
    broadcaster: Broadcaster | None = None
    """A :class:`~catq.learner.broadcast.WeightBroadcaster` (``weight_sync = "distributed"``):
    each version goes to the replicas over a process group before it is announced."""
    held: list[Delivery] = field(default_factory=list)
    """Deliveries trained into the current weights but not yet checkpointed (not acked)."""
    writing: list[Delivery] = field(default_factory=list)
    """Deliveries whose checkpoint is being written in the background (not acked yet)."""
    committing: asyncio.Task | None = None
    """The commit being written in the background (``learner.background_commit``), if any."""

    @property
    def holding(self) -> list[Delivery]:
        """Everything trained and not yet acked."""
        return self.held + self.writing

    def finished(self) -> bool:
        """Whether a background commit has ended (done or failed) and waits to be settled."""
        return self.committing is not None and self.committing.done()

    async def commit(self, publish: bool = False) -> None:
        """Checkpoint (publishing first bumps the version), then record the held groups'
        (prompt, version) pairs as trained, ack the entries and tell their clients, then write and
        announce the new weights. With ``learner.background_commit`` all of that runs in a task,
        from a snapshot, while the next step trains (:meth:`settle` waits for it); commits stay
        one at a time and in order either way. Raises LeaseLost, before writing anything, once
        another learner holds the lease."""
        await self.settle()
        await self.lease.check()  # a replaced learner must not overwrite its successor's checkpoint
        if publish:
            self.trainer.state.policy_version += 1
        state = self.trainer.state
        version, step = state.policy_version + (not publish), state.step
        snapshot = await asyncio.to_thread(self.trainer.snapshot) if self.config.learner.background_commit else None
        if snapshot is None:
            await self.write_commit(None, self.held, publish, version, step)
            self.held = []
            return
        self.writing, self.held = self.held, []
        self.committing = asyncio.create_task(self.write_commit(snapshot, self.writing, publish, version, step))

    async def write_commit(self, snapshot, held: list[Delivery], publish: bool, version: int, step: int) -> None:
        """The writes of one :meth:`commit`: checkpoint, then trained records and acks, then the
        announced weights (of ``snapshot`` when given, else of the live state)."""
        taken = [snapshot] if snapshot is not None else []
        if taken:
            await self.lease.check()  # the lease may have gone while the step trained
        await asyncio.to_thread(self.trainer.save_checkpoint, *taken)
        if held:
            await self.bus.record_trained([pair_of(d.message) for d in held], self.config.bus.result_ttl_s)
            await self.bus.ack(held, GROUP)
            await self.tell_trained(held, version, step)
        if publish:
            await self.announce_current(snapshot)
        if taken:
            self.writing = []

    async def settle(self) -> None:
        """Wait for the commit being written in the background, if any; raises what it raised."""
        task, self.committing = self.committing, None
        if task is not None:
            await task

    def abandon(self) -> None:
        """Cancel a background commit (the loop is failing): its entries stay unacked and come back."""
        if self.committing is not None:
            self.committing.cancel()

    async def tell_trained(self, deliveries: list[Delivery], version: int, step: int) -> None:
        """Status "trained" for each group's prompt; ``trained_in_version``: the first published
        version whose weights include it (this one when it publishes now, else the next)."""
        self.log.info("trained on", step=step, version=version,
                      prompt_ids=[d.message.group.prompt.prompt_id for d in deliveries])
        if self.results is None:
            return
        for d in deliveries:
            await self.results.update(d.message.group.prompt.prompt_id, status=Status.TRAINED,
                                      trained_in_version=version, trained_step=step)

    async def announce_current(self, snapshot=None) -> None:
        """Write, broadcast (``weight_sync = "distributed"``) and announce the current version:
        ``snapshot``'s when given, else the live policy's."""
        from catq.learner import publish

        state = snapshot.state if snapshot is not None else self.trainer.state
        taken = [snapshot] if snapshot is not None else []
        path = await asyncio.to_thread(self.trainer.write_weights, *taken)
        if self.broadcaster is not None:
            await self.broadcaster.push(self.trainer.published_weights(*taken), state.policy_version)
        await publish.announce(self.lease, state.policy_version, path, state.step)
        removed = publish.prune_versions(self.config.weights_dir, self.config.learner.keep_versions)
        self.log.info("published", version=state.policy_version, path=str(path), pruned=removed)

    async def ensure_announced(self) -> None:
        """On start: if the checkpoint's version was never announced (crash in between), publish
        it now; then tell Redis the current version. A checkpoint older than the announced
        version (the newest was unreadable) continues from the announced number, so versions
        never repeat: engines and rollouts already carry it."""
        from catq.messages import WeightsPublished

        version = self.trainer.state.policy_version
        last = await self.bus.last(WEIGHTS.name, WeightsPublished)
        announced = last[1].policy_version if last else 0
        if version > announced:
            await self.announce_current()
        elif announced > version:
            self.log.warning("checkpoint is older than the announced policy; numbering continues "
                             "from the announced version", checkpoint_version=version, announced=announced)
            self.trainer.state.policy_version = version = announced
        await self.lease.publish(version)
