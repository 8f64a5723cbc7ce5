"""The learner's intake: which scored groups go into the batch buffer, and which are set aside.

Each delivery from ``scored`` is first checked: an entry already trained into the restored
checkpoint is acked and skipped (redelivery after a crash), and so is a group whose (prompt id,
policy version) is already trained (recorded in Redis at each commit, for ``bus.result_ttl_s``)
or buffered under another entry id (a duplicate entry; its status is left alone, it is logged
and counted); a group more than ``learner.max_staleness`` versions older than the current policy
is dropped, counted and acked; a group whose rewards are all equal carries no signal and is
skipped, counted and acked (with ``learner.objective = "sft"`` rewards do not matter: a group
whose reference is empty is skipped instead; these get status "set_aside", with why). Groups
that cannot be trained on (mismatched lengths, a token id outside the policy's vocabulary) are
dead-lettered here, each on its own: one bad group costs neither its batch nor a crash loop.
Everything else is checked and prepared for training (advantages, samples) once, and waits in
the buffer until :meth:`Intake.next_batch` takes it (dropping what went stale meanwhile).

Held entries must not be reclaimed from under the learner: a batch can take minutes on CPU,
longer than the bus's claim idle time, and a self-reclaim would count as a failed delivery. So
the learner uses a fixed consumer name and its own bus settings with a very long claim idle time,
and on start reclaims its previous incarnation's pending entries at once (the one moment a
short idle time is right: the lease says no other learner can be holding them). Each restart counts as a
delivery, so an entry held through more than ``bus.max_attempts`` learner crashes is
dead-lettered by the bus — which also ends a crash loop on a group that kills the learner.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog

from catq.bus import Delivery
from catq.config import Config
from catq.learner.grpo import NO_REFERENCE
from catq.learner.protocols import LearnerBus, LearnerTrainer, Pair, ResultSink
from catq.messages import ScoredGroup
from catq.results import Status
from catq.topology import SCORED

GROUP = "learner"
"""The consumer group the learner reads ``scored`` through."""
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
    skipped_duplicate: int = 0
    """Groups whose (prompt id, policy version) was already trained or held (another entry)."""
    skipped_nonfinite: int = 0
    """Optimizer steps skipped because their loss or gradient norm was not finite."""
    skipped_no_reference: int = 0
    """CaT-SFT: groups whose reference was empty (nothing to fine-tune on)."""

    def count_no_signal(self, prepared, with_reference: bool) -> None:
        if prepared.why == NO_REFERENCE:
            self.skipped_no_reference += 1
            return
        self.skipped_zero_variance += 1
        self.zero_variance_with_reference += with_reference

    def as_dict(self) -> dict:
        return {
            "groups_dropped_stale": self.dropped_stale,
            "groups_skipped_zero_variance": self.skipped_zero_variance,
            "groups_skipped_already_trained": self.skipped_trained,
            "groups_skipped_duplicate": self.skipped_duplicate,
            "skipped_nonfinite": self.skipped_nonfinite,
            "groups_skipped_no_reference": self.skipped_no_reference,
        }


@dataclass
class Intake:
    """The batch buffer and what decides what enters it."""

    config: Config
    bus: LearnerBus
    trainer: LearnerTrainer
    log: structlog.BoundLogger
    results: ResultSink | None = None
    """Where the verdicts on set-aside groups go (None: nobody is told)."""
    buffer: list[Delivery] = field(default_factory=list)
    """Deliveries accepted for training, oldest first."""
    prepared: dict = field(default_factory=dict)
    """Entry id -> its group prepared for training (:func:`catq.learner.grpo.prepare_group`)."""
    counts: Counts = field(default_factory=Counts)
    buffer_since: float | None = None

    async def take(self, deliveries: list[Delivery], holding: list[Delivery]) -> None:
        """Sort fresh deliveries into the buffer or ack them at once (trained/stale/no signal).
        ``holding``: deliveries trained but not yet committed (they count as known)."""
        known, trained = {d.entry_id for d in self.buffer + holding}, self.trainer.trained_id_set
        taken = {pair_of(d.message) for d in self.buffer + holding}
        taken |= await self.bus.trained_pairs([pair_of(d.message) for d in deliveries])
        done_now, set_aside = [], []
        for delivery in deliveries:
            if delivery.entry_id in known:
                continue  # a redelivery of something we hold
            message: ScoredGroup = delivery.message
            if delivery.entry_id in trained:
                self.counts.skipped_trained += 1
                done_now.append(delivery)
            elif pair_of(message) in taken:
                self.skip_duplicate(delivery)
                done_now.append(delivery)
            elif self.staleness(message) > self.config.learner.max_staleness:
                self.counts.dropped_stale += 1
                set_aside.append((delivery, f"stale: {self.staleness(message)} versions behind the policy"))
            elif isinstance(prepared := prepare(message, self.trainer), str):
                await self.bus.dead_letter(delivery, GROUP, prepared)
            elif not prepared.has_signal:
                self.counts.count_no_signal(prepared, has_reference(message))
                set_aside.append((delivery, prepared.why))
            else:
                self.buffer.append(delivery)
                self.prepared[delivery.entry_id] = prepared
                known.add(delivery.entry_id)
                taken.add(pair_of(message))
        if done_now or set_aside:
            await self.bus.ack(done_now + [d for d, _ in set_aside], GROUP)
            await self.tell(set_aside)
            self.log.info("groups set aside", buffered=len(self.buffer), **self.counts.as_dict())
        if self.buffer and self.buffer_since is None:
            self.buffer_since = time.monotonic()

    async def read(self, bus: LearnerBus) -> list[Delivery]:
        cfg = self.config.learner
        return await bus.read(
            SCORED.name, GROUP, CONSUMER,
            count=max(1, cfg.batch_groups - len(self.buffer)),
            message_type=ScoredGroup,
            block_ms=self.config.bus.block_ms,
        )

    async def reclaim_previous(self) -> list[Delivery]:
        """Take back entries a previous learner process left pending, in one read with a short
        claim idle time (one read, so nothing is claimed twice); :meth:`take` sorts them. The
        learner never holds more than a few batches, far below the read's count."""
        cfg = self.config.learner
        count = max(1000, 4 * cfg.batch_groups * cfg.checkpoint_every)
        await asyncio.sleep(2 * STARTUP_CLAIM_IDLE_MS / 1000)
        return await self.bus.take_over(SCORED.name, GROUP, CONSUMER, count=count, message_type=ScoredGroup,
                                        idle_ms=STARTUP_CLAIM_IDLE_MS, block_ms=1)

    def skip_duplicate(self, delivery: Delivery) -> None:
        """Count and log a group whose (prompt, version) is already trained or held: another
        entry carrying the same group (a retried XADD upstream). Its status is left alone."""
        self.counts.skipped_duplicate += 1
        prompt_id, version = pair_of(delivery.message)
        self.log.info("duplicate group skipped: this prompt and policy version is already trained or held",
                      entry_id=delivery.entry_id, prompt_id=prompt_id, policy_version=version)

    def staleness(self, message: ScoredGroup) -> int:
        return self.trainer.state.policy_version - message.group.policy_version

    def batch_ready(self) -> bool:
        cfg = self.config.learner
        if len(self.buffer) >= cfg.batch_groups:
            return True
        waited = time.monotonic() - (self.buffer_since or time.monotonic())
        return bool(self.buffer) and cfg.batch_timeout_s > 0 and waited >= cfg.batch_timeout_s

    async def next_batch(self) -> list[Delivery]:
        """The oldest ``batch_groups`` buffered groups, less those that went stale while they
        waited (acked and set aside here)."""
        cfg = self.config.learner
        batch, self.buffer = self.buffer[: cfg.batch_groups], self.buffer[cfg.batch_groups :]
        self.buffer_since = time.monotonic() if self.buffer else None
        fresh = [d for d in batch if self.staleness(d.message) <= cfg.max_staleness]
        stale = [d for d in batch if self.staleness(d.message) > cfg.max_staleness]
        if stale:  # the policy moved on while they waited in the buffer
            self.counts.dropped_stale += len(stale)
            await self.bus.ack(stale, GROUP)
            await self.tell([(d, "stale: the policy moved on while it waited") for d in stale])
            self.forget(stale)
        return fresh

    def forget(self, deliveries: list[Delivery]) -> None:
        """Drop the prepared groups of deliveries that leave the intake (trained or set aside)."""
        for d in deliveries:
            self.prepared.pop(d.entry_id, None)

    async def skip_nonfinite(self, batch: list[Delivery], why: str) -> None:
        """A step that would have applied NaN/inf took no update: its groups are set aside (acked,
        so they cannot poison the next learner too) and the skip is counted in the next line."""
        self.counts.skipped_nonfinite += 1
        self.forget(batch)
        await self.bus.ack(batch, GROUP)
        await self.tell([(d, f"{why}: its training step was skipped") for d in batch])
        self.log.warning("step skipped: not finite", reason=why, step=self.trainer.state.step + 1,
                         entry_ids=[d.entry_id for d in batch])

    async def tell(self, set_aside: list[tuple[Delivery, str]]) -> None:
        """Status "set_aside" (with why) for groups the learner will not train on."""
        if self.results is None:
            return
        for d, why in set_aside:
            await self.results.update(d.message.group.prompt.prompt_id, status=Status.SET_ASIDE, set_aside=why)


def pair_of(message: ScoredGroup) -> Pair:
    """What the learner trains at most once: (prompt id, policy version the rollouts came from)."""
    return message.group.prompt.prompt_id, message.group.policy_version


def has_reference(message: ScoredGroup) -> bool:
    """Whether the group's reference had a final answer: math, an extracted ``reference_answer``;
    open, a non-empty rubric."""
    referenced = message.referenced
    if message.group.prompt.task == "math":
        return referenced.reference_answer is not None
    return bool(referenced.rubric)


def prepare(message: ScoredGroup, trainer: LearnerTrainer):
    """The group prepared for the trainer's objective, or why it cannot be trained on (it is
    dead-lettered)."""
    if not message.group.prompt_token_ids:
        return "malformed scored group: no prompt_token_ids"
    try:
        return trainer.prepare(message)
    except ValueError as exc:
        return f"malformed scored group: {exc}"
