"""Publishing policy weights: ``<weights_dir>/v<version>/``, atomically, then a message.

The learner writes a complete HF-format directory (safetensors + config + tokenizer) into a temp
directory beside the target and renames it into place, so an engine never sees a half-written
version; only then does it XADD a WeightsPublished on ``weights``. Old versions are pruned,
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


def write_weights(model, tokenizer, weights_dir: Path, version: int) -> Path:
    """Save ``model`` (and ``tokenizer``) as ``<weights_dir>/v<version>`` atomically. An existing
    directory of that version (left by a learner that died before announcing it) is replaced."""
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir(weights_dir, version)
    staging = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=weights_dir))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".old-v{version}-", dir=weights_dir))
            os.replace(target, trash / target.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def prune_versions(weights_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` version directories (and stale temp dirs); returns the
    versions removed."""
    weights_dir = Path(weights_dir)
    versions = published_versions(weights_dir)
    removed = versions[:-keep] if keep > 0 else versions
    for version in removed:
        shutil.rmtree(version_dir(weights_dir, version), ignore_errors=True)
    for leftover in weights_dir.glob(".v*-*"):
        if leftover.is_dir() and not _recent(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    return removed


def _recent(path: Path, seconds: float = 3600.0) -> bool:
    import time

    return time.time() - path.stat().st_mtime < seconds


def is_inside(path: str | Path, weights_dir: Path) -> bool:
    """True when ``path`` resolves to somewhere strictly inside ``weights_dir`` (symlinks and
    ``..`` resolved), so a message cannot point an engine at arbitrary files."""
    try:
        resolved = Path(path).resolve()
        root = Path(weights_dir).resolve()
    except (OSError, RuntimeError):
        return False
    return resolved != root and resolved.is_relative_to(root)


async def announce(bus, version: int, path: Path, step: int) -> str:
    """XADD a WeightsPublished for a directory already in place; returns the entry id."""
    message = WeightsPublished(policy_version=version, path=str(Path(path).resolve()), step=step)
    return await bus.publish("weights", message)
