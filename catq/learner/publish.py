"""Publishing policy weights: ``<weights_dir>/v<version>/``, atomically, then a message.

The learner writes a complete HF-format directory (safetensors + config + tokenizer) into a temp
directory beside the target, fsyncs every file and the directory, renames it into place and
fsyncs ``weights_dir``, so an engine never sees a half-written version and an announced version
survives a power loss; only then does it announce a WeightsPublished on ``weights`` (fenced by
the learner's lease, :mod:`catq.learner.lease`). Old versions are pruned,
keeping the newest ``keep_versions`` (a syncer still loading one of those is safe; one lagging by
more than that many versions finds its path gone and moves on to the newest).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from catq.messages import WeightsPublished

VERSION_DIR_RE = re.compile(r"^v(\d+)$")


def version_dir(weights_dir: Path, version: int) -> Path:
    return Path(weights_dir) / f"v{version}"


def published_versions(weights_dir: Path) -> list[int]:
    """Versions with a complete directory in ``weights_dir``, ascending."""
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        return []
    versions = []
    for path in weights_dir.iterdir():
        match = VERSION_DIR_RE.match(path.name)
        if match and path.is_dir():
            versions.append(int(match.group(1)))
    return sorted(versions)


def write_weights(model, tokenizer, weights_dir: Path, version: int, state_dict: dict | None = None) -> Path:
    """Save ``model`` (and ``tokenizer``) as ``<weights_dir>/v<version>`` atomically. An existing
    directory of that version (left by a learner that died before announcing it) is replaced.
    ``state_dict``: the weights to write instead of ``model``'s own (a sharded learner's full
    state dict, gathered on rank 0)."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir(weights_dir, version)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=weights_dir))
    try:
        if state_dict is None:
            model.save_pretrained(str(staging), safe_serialization=True)
        else:
            model.save_pretrained(str(staging), safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)
        fsync_tree(staging)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-v{version}-", dir=weights_dir))
            os.replace(target, trash / target.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, target)
        fsync_dir(weights_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory``, then each directory (children before parents), so
    the contents are on disk before a rename makes them visible."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_file():
            _fsync_file(path)
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def prune_versions(weights_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` version directories (and stale temp dirs); returns the
    versions removed."""
    weights_dir = Path(weights_dir)
    versions = published_versions(weights_dir)
    removed = versions[:-keep] if keep > 0 else versions
    for version in removed:
        shutil.rmtree(version_dir(weights_dir, version), ignore_errors=True)
    newest = versions[-1] if versions else None
    for leftover in weights_dir.glob(".*v*-*"):
        if leftover.is_dir() and _abandoned(leftover, newest):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


STAGING_RE = re.compile(r"^\.(?:old-)?v(\d+)-")


def _abandoned(path: Path, newest: int | None, seconds: float = 3600.0) -> bool:
    """A temp dir no live writer can still own: one for a version older than the newest
    published (a learner killed mid-write; the lease holder writes only the newest or the next),
    or one untouched for ``seconds``."""
    import time

    match = STAGING_RE.match(path.name)
    if match and newest is not None and int(match.group(1)) < newest:
        return True
    return time.time() - path.stat().st_mtime >= seconds


def is_inside(path: str | Path, weights_dir: Path) -> bool:
    """True when ``path`` resolves to somewhere strictly inside ``weights_dir`` (symlinks and
    ``..`` resolved), so a message cannot point an engine at arbitrary files."""
    try:
        resolved = Path(path).resolve()
        root = Path(weights_dir).resolve()
    except (OSError, RuntimeError):
        return False
    return resolved != root and resolved.is_relative_to(root)


def version_of_dir(path: str | Path, weights_dir: Path) -> int | None:
    """The version ``path`` holds when it resolves to a ``v<N>`` directory directly inside
    ``weights_dir``, else None. What a path names, not what a message claims, is its version."""
    try:
        resolved = Path(path).resolve()
        root = Path(weights_dir).resolve()
    except (OSError, RuntimeError):
        return None
    match = VERSION_DIR_RE.match(resolved.name)
    return int(match.group(1)) if match and resolved.parent == root else None


async def announce(lease, version: int, path: Path, step: int) -> None:
    """Announce a directory already in place: a WeightsPublished on ``weights`` and the run's
    policy version, in one step fenced by the learner's ``lease`` (:mod:`catq.learner.lease`);
    raises LeaseLost, with nothing written, when another learner has taken over."""
    message = WeightsPublished(policy_version=version, path=str(Path(path).resolve()), step=step)
    await lease.publish(version, message)
