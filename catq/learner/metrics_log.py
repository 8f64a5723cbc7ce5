"""The learner's metrics: one line per optimizer step in ``<run_dir>/metrics.jsonl``, the same
numbers to /metrics (Prometheus) and to Redis for ``catq top``.

``catq eval --run RUN --plot`` draws the training curves from these keys (with
``learner.tensorboard`` the numeric ones are also written to ``<run_dir>/tb/``,
:mod:`catq.learner.tensorboard`):

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
  answer (:func:`catq.learner.intake.has_reference`).
- ``staleness`` (histogram: versions behind -> groups), the ``groups_*`` counts of
  :class:`catq.learner.intake.Counts`, and ``entry_ids``.
- ``skipped_nonfinite``: steps skipped since the previous line because their loss or gradient
  norm was not finite (they took no update and got no line of their own).

A restarted learner drops the lines of steps newer than its checkpoint (:meth:`MetricsLog.forget_lost_steps`:
they died with the process and are redone), so each step is logged once.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from catq import metrics as prometheus
from catq.bus import Delivery
from catq.config import Config
from catq.learner.intake import Counts, has_reference
from catq.learner.protocols import LearnerBus
from catq.learner.tensorboard import TensorBoardLog
from catq.messages import ScoredGroup

LEARNER_SUMMARY = ("step", "policy_version", "reward_mean", "signal_frac", "kl", "loss", "step_time_s", "time")
"""The metrics line's keys `catq top` shows."""


@dataclass
class MetricsLog:
    config: Config
    bus: LearnerBus
    log: structlog.BoundLogger
    tensorboard: TensorBoardLog | None = None
    """Mirror of the metrics lines, if any."""
    started: float = field(default_factory=time.monotonic)
    """Monotonic time the learner loop was made: ``elapsed_s`` counts from here."""

    @property
    def path(self) -> Path:
        return self.config.run_path / "metrics.jsonl"

    def line(self, metrics: dict, fresh: list[Delivery], histogram: Counter, counts: Counts, version: int) -> dict:
        """The step's metrics.jsonl line (keys: see the module docstring); ``version``: the
        policy version the weights carry after the step."""
        messages = [d.message for d in fresh]
        return {
            **metrics,
            "policy_version": version,
            "elapsed_s": time.monotonic() - self.started,
            **group_fractions(metrics, messages, counts),
            "staleness": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            **counts.as_dict(),
            "entry_ids": [d.entry_id for d in fresh],
        }

    def write(self, line: dict) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(line, sort_keys=True) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(line)

    async def report(self, line: dict) -> None:
        """The step's numbers to /metrics and to Redis (`catq top`); a failure here only logs."""
        prometheus.learner_step(line)
        try:
            await self.bus.set_learner_step({k: line[k] for k in LEARNER_SUMMARY if k in line})
        except Exception as exc:
            self.log.warning("could not record the step for catq top", error=str(exc) or type(exc).__name__)

    def forget_lost_steps(self, step: int) -> int:
        """Drop metrics lines of steps newer than ``step`` (the restored checkpoint's): those
        updates died with the previous process and are about to be redone (and logged again).
        Returns the number of lines dropped."""
        path = self.path
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

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


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
