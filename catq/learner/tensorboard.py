"""Optional TensorBoard copy of the learner's metrics lines.

    [learner]
    tensorboard = true        # then: tensorboard --logdir runs/<run>/tb

``<run_dir>/metrics.jsonl`` stays the record (the plotting tool reads it); this only mirrors each
line's numeric scalars as ``train/<key>`` at global step ``step``, for watching a run live.
TensorBoard is an optional extra (``pip install -e '.[tensorboard]'``), so it is imported only
when enabled, and when it is missing the learner fails at start-up, not at its first step.
A restarted learner redoes the steps its checkpoint lacks and drops their old lines from
metrics.jsonl, but their old scalars stay in the earlier event file; metrics.jsonl is the record.
"""

from __future__ import annotations

import math
from pathlib import Path

from catq.config import Config

EXTRA_HINT = "pip install -e '.[tensorboard]'"


class TensorBoardLog:
    """Scalars of metrics lines into one TensorBoard event file under ``log_dir``."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                f"learner.tensorboard = true needs the tensorboard package ({EXTRA_HINT}): {exc}"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    @classmethod
    def open(cls, config: Config) -> TensorBoardLog | None:
        """A log under ``<run_dir>/tb/`` when ``learner.tensorboard`` is set, else None."""
        return cls(config.run_path / "tb") if config.learner.tensorboard else None

    def write(self, line: dict) -> None:
        """Every finite numeric value of ``line`` (bools and nested values left out) as
        ``train/<key>`` at global step ``line["step"]``; flushed at once."""
        step, walltime = int(line["step"]), line.get("time")
        for key, value in sorted(line.items()):
            if _is_scalar(value):
                self.writer.add_scalar(f"train/{key}", value, global_step=step, walltime=walltime)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
