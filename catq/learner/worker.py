"""The learner process: scored groups in, GRPO steps, checkpoints, published weights out.

    catq worker learner --config configs/demo.toml      (or python -m workers.learner)

One learner per run (it alone holds trainable weights), enforced by a lease in Redis with a
fencing token (:mod:`catq.learner.lease`): a learner takes it before loading its checkpoint (a
second one waits for it), every commit and announcement is fenced by it, and a learner that lost
it exits 1 with a one-line message instead of publishing. Its loop:

1. Read ``scored`` (consumer group "learner"). Each delivery is first checked: an entry already
   trained into the restored checkpoint is acked and skipped (redelivery after a crash), and so
   is a group whose (prompt id, policy version) is already trained (recorded in Redis at each
   commit, for ``bus.result_ttl_s``) or buffered under another entry id (a duplicate entry; its
   status is left alone, it is logged and counted); a group more than ``learner.max_staleness``
   versions older than the current policy is dropped, counted and acked; a group whose rewards
   are all equal carries no signal and is skipped, counted and acked (with ``learner.objective =
   "sft"`` rewards do not matter: a group whose reference is empty is skipped instead; these
   get status "set_aside", with why). Everything else is checked and prepared
   for training (advantages, samples) once, and waits in the batch buffer.
2. With ``batch_groups`` groups (or a partial batch after ``batch_timeout_s``), take one GRPO
   step (:mod:`catq.learner.grpo`) in a thread, so the event loop keeps the heartbeat going.
   A stop signal abandons the step at the next micro-batch boundary (nothing applied, nothing
   acked: the groups are trained by the next learner). A step whose loss or gradient norm is
   NaN or infinite applies nothing either: it is logged and counted, and its groups are acked
   with status "set_aside" (why: "non-finite loss" or "non-finite gradient norm").
3. Append the step's line to ``<run_dir>/metrics.jsonl``. Every ``checkpoint_every`` steps —
   and always on a step that publishes — save a checkpoint (:mod:`catq.learner.checkpoint`)
   that lists the entry ids trained so far, and only then record their (prompt, version) pairs,
   ack those entries and set their prompts' status to "trained" (with ``trained_in_version``).
   A crash therefore loses no scored work (unacked entries come back) and trains nothing twice (the checkpoint
   says what is in the weights). A restarted learner drops the metrics lines of steps newer
   than its checkpoint (they died with the process and are redone), so each step is logged once.
4. Every ``publish_every`` steps, bump the policy version, write ``<weights_dir>/v<version>/``
   (fsynced), then announce it on ``weights`` and set the run's policy version in Redis
   (rollout's backpressure reads it) in one fenced step. A learner that died between checkpoint
   and announcement announces on restart.

   With ``learner.background_commit`` (the default, one process), steps 3–4's writes run in a
   task while the next step trains: the loop copies the policy, optimizer and training state to
   host memory between steps and writes the checkpoint and the version from that copy; acks
   and the announcement still follow the fsynced checkpoint, and the next commit waits for this
   one. Entries being written count as held, so a redelivery of one is ignored. On 2 CPU cores
   the checkpoint took 2–4 s of each 6–12 s step (bench/pipeline.py).
5. At ``learner.max_steps`` it stops, and a learner started at ``max_steps`` reads nothing (a
   read would count as a delivery of each pending entry, dead-lettering them after a few
   restarts).

Held entries must not be reclaimed from under the learner: a batch can take minutes on CPU,
longer than the bus's claim idle time, and a self-reclaim would count as a failed delivery. So
the learner uses a fixed consumer name and its own bus settings with a very long claim idle time,
and on start reclaims its previous incarnation's pending entries at once (the one moment a
short idle time is right: the lease says no other learner can be holding them). Each restart counts as a
delivery, so an entry held through more than ``bus.max_attempts`` learner crashes is
dead-lettered by the bus — which also ends a crash loop on a group that kills the learner.
Groups that cannot be trained on (mismatched lengths, a token id outside the policy's
vocabulary) are dead-lettered at intake, each on its own: one bad group costs neither its batch
nor a crash loop.

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
  zero-variance groups set aside at intake; stale, already-trained and duplicate groups not
  counted), the fraction with signal: ``groups_used / (groups_used + groups_skipped +
  groups_skipped_zero_variance)``.
- ``reference_present_frac``: of those same groups, the fraction whose reference had a final
  answer (:func:`has_reference`).
- ``staleness`` (histogram: versions behind -> groups), the ``groups_*`` counts of
  :class:`Counts`, and ``entry_ids``.
- ``skipped_nonfinite``: steps skipped since the previous line because their loss or gradient
  norm was not finite (they took no update and got no line of their own).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from catq import metrics as prometheus
from catq.bus import LeaseLost
from catq.config import Config
from catq.learner.grpo import NO_REFERENCE, NonFiniteStep, StepCancelled
from catq.learner.lease import Lease
from catq.learner.tensorboard import TensorBoardLog
from catq.messages import ScoredGroup
from catq.results import Status
from catq.topology import SCORED, WEIGHTS

LEARNER_SUMMARY = ("step", "policy_version", "reward_mean", "signal_frac", "kl", "loss", "step_time_s", "time")
"""The metrics line's keys `catq top` shows."""

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
    writing: list = field(default_factory=list)
    """Deliveries whose checkpoint is being written in the background (not acked yet)."""
    committing: asyncio.Task | None = None
    """The commit being written in the background (``learner.background_commit``), if any."""
    results: object = None
    """The ResultStore the learner writes its verdicts to (None: nobody is told)."""
    prepared: dict = field(default_factory=dict)
    """Entry id -> its group prepared for training (:func:`catq.learner.grpo.prepare_group`)."""
    counts: Counts = field(default_factory=Counts)
    buffer_since: float | None = None
    started: float = field(default_factory=time.monotonic)
    """Monotonic time this loop was made: ``elapsed_s`` counts from here."""
    tensorboard: TensorBoardLog | None = None
    """Mirror of the metrics lines; opened from ``learner.tensorboard`` when not given."""
    lease: Lease | None = None
    """The learner lease this process holds; fences commits and announcements. When not given,
    an unacquired one: its token is none Redis handed out, so it can publish nothing."""
    broadcaster: object = None
    """A :class:`~catq.learner.broadcast.WeightBroadcaster` (``weight_sync = "distributed"``):
    each version goes to the replicas over a process group before it is announced."""

    def __post_init__(self) -> None:
        if self.tensorboard is None:
            self.tensorboard = TensorBoardLog.open(self.config)
        if self.lease is None:
            self.lease = Lease(self.bus, ROLE)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    @property
    def known_ids(self) -> set[str]:
        return {d.entry_id for d in self.buffer + self.held + self.writing}

    async def intake(self, deliveries: list) -> None:
        """Sort fresh deliveries into the buffer or ack them at once (trained/stale/no signal).
        Each group is checked and prepared for training here, once."""
        known, trained = self.known_ids, self.trainer.trained_id_set
        taken = self.held_pairs | await self.bus.trained_pairs([pair_of(d.message) for d in deliveries])
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

    @property
    def held_pairs(self) -> set[tuple[str, int]]:
        """(prompt id, policy version) of every group buffered or trained but not committed."""
        return {pair_of(d.message) for d in self.buffer + self.held + self.writing}

    def skip_duplicate(self, delivery) -> None:
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

    async def step(self, stop: asyncio.Event | None = None) -> None:
        """Take one training step on the oldest buffered groups; checkpoint/publish when due.
        When ``stop`` is set mid-step, the step is abandoned at a micro-batch boundary and its
        groups go back to the buffer (unacked: a restarted learner trains them)."""
        cfg = self.config.learner
        batch, self.buffer = self.buffer[: cfg.batch_groups], self.buffer[cfg.batch_groups :]
        self.buffer_since = time.monotonic() if self.buffer else None
        fresh = [d for d in batch if self.staleness(d.message) <= cfg.max_staleness]
        stale = [d for d in batch if self.staleness(d.message) > cfg.max_staleness]
        if stale:  # the policy moved on while they waited in the buffer
            self.counts.dropped_stale += len(stale)
            await self.bus.ack(stale, GROUP)
            await self.tell([(d, "stale: the policy moved on while it waited") for d in stale])
            for d in stale:
                self.prepared.pop(d.entry_id, None)
        if not fresh:
            return
        histogram = Counter(str(self.staleness(d.message)) for d in fresh)
        try:
            metrics = await asyncio.to_thread(
                self.trainer.train, [self.prepared[d.entry_id] for d in fresh], [d.entry_id for d in fresh],
                stop.is_set if stop is not None else None,  # a bool read: safe from the training thread
            )
        except StepCancelled:
            self.buffer[:0] = fresh
            self.log.info("step abandoned: stopping", groups=len(fresh))
            return
        except NonFiniteStep as exc:
            await self.skip_nonfinite(fresh, str(exc))
            return
        for d in fresh:
            self.prepared.pop(d.entry_id, None)
        self.held.extend(fresh)
        publish = self.trainer.state.step % cfg.publish_every == 0
        line = self.metrics_line(metrics, fresh, histogram, publish)
        self.counts = Counts()
        self.write_metrics(line)
        await self.report_step(line)
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

    async def skip_nonfinite(self, batch: list, why: str) -> None:
        """A step that would have applied NaN/inf took no update: its groups are set aside (acked,
        so they cannot poison the next learner too) and the skip is counted in the next line."""
        self.counts.skipped_nonfinite += 1
        for d in batch:
            self.prepared.pop(d.entry_id, None)
        await self.bus.ack(batch, GROUP)
        await self.tell([(d, f"{why}: its training step was skipped") for d in batch])
        self.log.warning("step skipped: not finite", reason=why, step=self.trainer.state.step + 1,
                         entry_ids=[d.entry_id for d in batch])

    async def report_step(self, line: dict) -> None:
        """The step's numbers to /metrics and to Redis (`catq top`); a failure here only logs."""
        prometheus.learner_step(line)
        try:
            await self.bus.set_learner_step({k: line[k] for k in LEARNER_SUMMARY if k in line})
        except Exception as exc:
            self.log.warning("could not record the step for catq top", error=str(exc) or type(exc).__name__)

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

    async def write_commit(self, snapshot, held: list, publish: bool, version: int, step: int) -> None:
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

    async def tell_trained(self, deliveries: list, version: int, step: int) -> None:
        """Status "trained" for each group's prompt; ``trained_in_version``: the first published
        version whose weights include it (this one when it publishes now, else the next)."""
        self.log.info("trained on", step=step, version=version,
                      prompt_ids=[d.message.group.prompt.prompt_id for d in deliveries])
        if self.results is None:
            return
        for d in deliveries:
            await self.results.update(d.message.group.prompt.prompt_id, status=Status.TRAINED,
                                      trained_in_version=version, trained_step=step)

    async def tell(self, set_aside: list) -> None:
        """Status "set_aside" (with why) for groups the learner will not train on."""
        if self.results is None:
            return
        for d, why in set_aside:
            await self.results.update(d.message.group.prompt.prompt_id, status=Status.SET_ASIDE, set_aside=why)

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
            SCORED.name, GROUP, CONSUMER,
            count=max(1, cfg.batch_groups - len(self.buffer)),
            message_type=ScoredGroup,
            block_ms=self.config.bus.block_ms,
        )

    async def reclaim_previous(self) -> None:
        """Take back entries a previous learner process left pending, in one read with a short
        claim idle time (one read, so nothing is claimed twice). The learner never holds more
        than a few batches, far below the read's count."""
        cfg = self.config.learner
        count = max(1000, 4 * cfg.batch_groups * cfg.checkpoint_every)
        await asyncio.sleep(2 * STARTUP_CLAIM_IDLE_MS / 1000)
        deliveries = await self.bus.take_over(SCORED.name, GROUP, CONSUMER, count=count, message_type=ScoredGroup,
                                              idle_ms=STARTUP_CLAIM_IDLE_MS, block_ms=1)
        await self.intake(deliveries)

    def done(self) -> bool:
        return self.trainer.state.step >= self.config.learner.max_steps

    async def run(self, stop: asyncio.Event) -> None:
        try:
            dropped = self.forget_lost_steps()
            if dropped:
                self.log.info("metrics of uncheckpointed steps dropped; they will be redone",
                              lines=dropped)
            await self.ensure_announced()
            if self.done():
                # Read nothing: each read of a pending entry counts as a delivery, and a learner
                # restarted at max_steps again and again would dead-letter work it never does.
                self.log.info("max_steps reached: reading nothing", step=self.trainer.state.step,
                              max_steps=self.config.learner.max_steps)
                return
            await self.reclaim_previous()
            while not stop.is_set() and not self.done():
                if self.committing is not None and self.committing.done():
                    await self.settle()  # a failed background commit (lease lost) stops us now
                if self.batch_ready():
                    await self.step(stop)
                    continue
                await self.intake(await self.read(self.bus))
            await self.settle()
            if self.held:
                await self.commit(publish=False)
            await self.settle()
        finally:
            if self.committing is not None:  # failing: its entries stay unacked and come back
                self.committing.cancel()
            self.close()
            if self.broadcaster is not None:
                await self.broadcaster.aclose()


async def run(config: Config) -> None:
    """Run the learner until SIGTERM/SIGINT or ``learner.max_steps``. A learner that lost its
    lease to another exits 1 with a one-line message.

    Under torchrun (WORLD_SIZE > 1: ``torchrun --nproc-per-node N -m catq worker learner
    --config FILE``) the policy is sharded over the N ranks with FSDP2
    (:mod:`catq.learner.distributed`): rank 0 is the learner described above, with a
    :class:`~catq.learner.leader.Leader` as its trainer, and alone talks to Redis; the other
    ranks only follow its training calls, ignore SIGTERM/SIGINT (rank 0 decides when the work
    stops, and tells them) and exit when it says so."""
    from catq.learner import distributed
    from catq.runtime import run_role

    ranks = distributed.init_from_env(config.learner.device)
    if ranks.distributed and not ranks.is_main:
        _follow(config, ranks)  # blocking: this process has nothing else to do
        return
    try:
        await run_role(config, ROLE, functools.partial(serve, ranks=ranks),
                       bus_config=config.bus.model_copy(update={"claim_idle_ms": HOLD_CLAIM_IDLE_MS}))
    except LeaseLost as exc:
        raise SystemExit(f"catq learner: {exc}") from None
    finally:
        if ranks.distributed:
            from catq.learner import leader

            leader.stop_followers()


def _follow(config: Config, ranks) -> None:
    import signal

    from catq.learner import leader

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    leader.follow(config, ranks)


async def serve(ctx, ranks=None) -> None:
    """Wait for the lease, then load (the checkpoint its previous holder left) and train."""
    lease = Lease.for_learner(ctx.bus, ctx.worker_id, ctx.config.worker.heartbeat_s)
    if not await lease.acquire(ctx.stop, ctx.log, poll_s=ctx.config.worker.heartbeat_s):
        return  # stopped while waiting
    done = asyncio.Event()
    keeper = asyncio.create_task(lease.keep(ctx.config.worker.heartbeat_s, ctx.stop.set, ctx.log, done))
    try:
        await train(ctx, lease, ranks)
    finally:
        done.set()
        await asyncio.wait([keeper], timeout=5)
        await _release(lease, ctx.log)
    if lease.lost:
        raise LeaseLost(lease.lost_message())


async def train(ctx, lease: Lease, ranks=None) -> None:
    from catq.learner.leader import Leader
    from catq.learner.trainer import Trainer

    tensorboard = TensorBoardLog.open(ctx.config)  # before the model load: a missing extra fails fast
    if ranks is not None and ranks.distributed:
        trainer = await asyncio.to_thread(Leader.from_config, ctx.config, ranks)
    else:
        trainer = await asyncio.to_thread(Trainer.from_config, ctx.config)
    ctx.log.info("learner ready", step=trainer.state.step, version=trainer.state.policy_version,
                 device=str(trainer.device))
    loop = LearnerLoop(ctx.config, ctx.bus, trainer, ctx.log, tensorboard=tensorboard, results=ctx.results,
                       lease=lease, broadcaster=make_broadcaster(ctx.config, trainer, ctx.log))
    if not loop.done():  # one with no steps left exits at once: it never serves
        ctx.serving()
    await loop.run(ctx.stop)
    ctx.log.info("learner stopped", step=trainer.state.step, version=trainer.state.policy_version)


def make_broadcaster(config: Config, trainer, log):
    """The weight broadcaster ``learner.weight_sync = "distributed"`` asks for, else None."""
    learner = config.learner
    if learner.weight_sync != "distributed":
        return None
    from catq.engines.client import EngineClient
    from catq.learner.broadcast import WeightBroadcaster

    return WeightBroadcaster(
        config.engines.policy_urls, lambda url: EngineClient.from_config(config.engines, url), log,
        backend=learner.broadcast_backend, address=learner.broadcast_address, port=learner.broadcast_port,
        timeout_s=learner.broadcast_timeout_s, resolve_replicas=config.engines.resolve_replicas,
        device=str(trainer.device) if learner.broadcast_backend == "nccl" else "cpu",
    )


async def _release(lease: Lease, log) -> None:
    try:
        await asyncio.wait_for(lease.release(), 5)
    except Exception as exc:  # it expires on its own
        log.warning("could not release the learner lease", error=str(exc) or type(exc).__name__)


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
    used or skipped by the step) plus the groups set aside at intake for carrying no signal
    (zero-variance, or under sft no reference: ``counts``)."""
    used = metrics.get("groups_used", 0)
    seen = used + metrics.get("groups_skipped", 0) + counts.skipped_zero_variance + counts.skipped_no_reference
    with_reference = sum(map(has_reference, messages)) + counts.zero_variance_with_reference
    return {
        "signal_frac": used / seen if seen else 0.0,
        "reference_present_frac": with_reference / seen if seen else 0.0,
    }


def pair_of(message: ScoredGroup) -> tuple[str, int]:
    """What the learner trains at most once: (prompt id, policy version the rollouts came from)."""
    return message.group.prompt.prompt_id, message.group.policy_version


def prepare(message: ScoredGroup, trainer):
    """The group prepared for the trainer's objective, or why it cannot be trained on (it is
    dead-lettered)."""
    if not message.group.prompt_token_ids:
        return "malformed scored group: no prompt_token_ids"
    try:
        return trainer.prepare(message)
    except ValueError as exc:
        return f"malformed scored group: {exc}"
