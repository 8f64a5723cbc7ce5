"""Learner checkpoints: everything needed to resume exactly where a step left off.

A checkpoint is one file ``<checkpoint_dir>/step-<step:08d>.pt`` holding the policy's state
dict, the optimizer's, the step, the policy version, the RNG states and the ids of the scored
stream entries already trained into these weights. It is written to a temp file in the same
directory, fsynced, then renamed, so the newest complete file is always a valid resume point;
older ones are pruned (the last ``keep`` stay). Should the newest be unreadable all the same (a
disk that lied about fsync, a file damaged later), resuming logs a warning naming it and falls
back to the one before.

The trained-entry ids make training exactly-once across crashes: the learner acknowledges a
scored entry only after a checkpoint that includes its update is on disk, and a restarted learner
skips (and acknowledges) any redelivered entry whose id is in its checkpoint. An entry trained
but not yet checkpointed when the learner died is simply trained again from the restored
weights, so it counts once in the weights that survive. The id list is bounded (newest kept):
Redis redelivers only entries still pending, never ones acknowledged long ago.

Loading uses ``torch.load(weights_only=True)``: tensors and plain containers only, no arbitrary
unpickling.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from catq.learner.publish import fsync_dir

log = structlog.get_logger("catq.learner.checkpoint")
CHECKPOINT_RE = re.compile(r"^step-(\d{8,})\.pt$")
PAYLOAD_KEYS = frozenset({"model", "optimizer", "step", "policy_version", "trained_ids", "rng"})
MAX_TRAINED_IDS = 100_000
"""Trained entry ids kept in a checkpoint; far more than can ever be pending at once."""


@dataclass
class TrainingState:
    step: int = 0
    """Optimizer steps taken."""
    policy_version: int = 0
    """Version of the newest published weights (0 = the initial policy)."""
    trained_ids: list[str] = field(default_factory=list)
    """Scored entry ids whose update is in these weights, oldest first."""
    groups_trained: int = 0
    """Groups used for updates so far (for counting, not for correctness)."""

    def add_trained(self, entry_ids: list[str]) -> None:
        self.trained_ids.extend(entry_ids)
        if len(self.trained_ids) > MAX_TRAINED_IDS:
            del self.trained_ids[: len(self.trained_ids) - MAX_TRAINED_IDS]


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(directory: Path, model, optimizer, state: TrainingState, keep: int = 2, *,
                    model_state: dict | None = None, optimizer_state: dict | None = None,
                    rng_state: dict | None = None) -> Path:
    """Write a checkpoint atomically and prune older ones; returns its path. ``model_state``,
    ``optimizer_state`` and ``rng_state``, when given, are written instead of
    ``model.state_dict()``, ``optimizer.state_dict()`` and the RNGs' state now (a sharded
    learner's full ones, gathered on rank 0; a :class:`Snapshot`'s)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = checkpoint_path(directory, state.step)
    tmp = directory / f".{target.name}.{os.getpid()}.tmp"
    payload = {
        "model": model.state_dict() if model_state is None else model_state,
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "step": state.step,
        "policy_version": state.policy_version,
        "trained_ids": list(state.trained_ids),
        "groups_trained": state.groups_trained,
        "rng": _rng_state() if rng_state is None else rng_state,
    }
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(directory)
    finally:
        tmp.unlink(missing_ok=True)
    for _, old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return target


@dataclass
class Snapshot:
    """Host copies of what a checkpoint holds, taken between steps, so the files can be written
    while the live model trains on (:meth:`catq.learner.trainer.Trainer.snapshot`)."""

    model: dict
    optimizer: dict
    state: TrainingState
    rng: dict


def take_snapshot(model, optimizer, state: TrainingState, model_state: dict | None = None) -> Snapshot:
    """``model_state``: the tensors to copy instead of ``model.state_dict()`` (a LoRA adapter's)."""
    tensors = model.state_dict() if model_state is None else model_state
    return Snapshot(_host_copy_tensors(tensors), _host_copy(optimizer.state_dict()),
                    TrainingState(step=state.step, policy_version=state.policy_version,
                                  trained_ids=list(state.trained_ids), groups_trained=state.groups_trained),
                    _rng_state())


def _host_copy_tensors(tensors: dict) -> dict:
    """CPU copies of a state dict's tensors, one per storage: tied weights stay one tensor."""
    copies: dict = {}
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.device)
        if key not in copies:
            copies[key] = tensor.detach().to("cpu", copy=True)
        out[name] = copies[key]
    return out


def _host_copy(value):
    """A deep copy of an optimizer state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


def load_latest(directory: Path, model, optimizer, *, load_model=None, load_optimizer=None) -> TrainingState | None:
    """Restore model, optimizer and RNG from the newest readable checkpoint; None when there is
    none. An unreadable one (truncated, corrupt) is skipped with a warning naming it, and the one
    before it is used; :class:`CheckpointError` when every one is unreadable (starting over
    would forget what is already trained and published). ``load_model(state)`` and
    ``load_optimizer(state)`` replace ``model.load_state_dict`` and ``optimizer.load_state_dict``
    (a sharded learner's, :mod:`catq.learner.distributed`)."""
    checkpoints = list_checkpoints(directory)
    if not checkpoints:
        return None
    for _, path in reversed(checkpoints):
        payload = _read(path)
        if payload is not None:
            return _restore(payload, load_model or model.load_state_dict,
                            load_optimizer or optimizer.load_state_dict)
    raise CheckpointError(f"no readable checkpoint in {directory} "
                          f"(tried {', '.join(p.name for _, p in checkpoints)})")


def _read(path: Path) -> dict | None:
    """The checkpoint's payload, fully read and checked before anything is restored from it (a
    failed load_state_dict can leave a model half-overwritten); None when it is unreadable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        missing = PAYLOAD_KEYS - set(payload)
        if missing:
            raise ValueError(f"missing {sorted(missing)}")
        return payload
    except Exception as exc:  # torch.load raises many kinds on a damaged file
        log.warning("unreadable checkpoint skipped; trying the one before it", checkpoint=str(path),
                    error=str(exc) or type(exc).__name__)
        return None


def _restore(payload: dict, load_model, load_optimizer) -> TrainingState:
    load_model(payload["model"])
    load_optimizer(payload["optimizer"])
    _set_rng_state(payload["rng"])
    return TrainingState(
        step=int(payload["step"]),
        policy_version=int(payload["policy_version"]),
        trained_ids=list(payload["trained_ids"]),
        groups_trained=int(payload.get("groups_trained", 0)),
    )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(_flatten(random.getstate()))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"][0], state["python"][1:-1], state["python"][-1]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(python_state: tuple):
    """random.getstate() is (version, tuple of ints, gauss_next); store as one flat list."""
    version, internal, gauss = python_state
    yield version
    yield from internal
    yield gauss

