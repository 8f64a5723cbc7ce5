"""LoRA adapters from the client side: the name each version's adapter is served under, and
moving a policy replica to a LoRA policy's newest version (the syncer, catq/learner/syncer.py,
when ``learner.lora`` is on; `catq eval` and `catq demo` load the versions they measure the same
way) with SGLang's dynamic LoRA API, so catq's engine and SGLang alike.

Version N is the adapter directory ``weights/v<N>/``, loaded under the name ``v<N>``
(:func:`adapter_name`) with ``POST /load_lora_adapter``; then ``POST /update_weight_version``
makes the engine report N, which is how the syncer (and ``catq status``) see what it serves. The
replica registry lists the replica with that adapter name, and rollout names it as ``lora_path``
on every request (catq/engines/replicas.py), so requests go to the newest adapter. Version 0
is the base model: no adapter.

An engine that refuses an adapter (a 4xx: base model, rank or target modules mismatch) keeps
serving the adapters it has; the syncer dead-letters that version as for full weights. Older
adapters are unloaded once the replica is listed on the new one, keeping the newest
:data:`KEEP_ADAPTERS` (a request picked from the registry just before it changed still finds
its adapter; an unload waits for the requests using it).
"""

from __future__ import annotations

from pathlib import Path

from catq.engines.client import EngineError
from catq.engines.lora import is_adapter_dir

KEEP_ADAPTERS = 2


def adapter_name(version: int) -> str | None:
    """The name version ``version``'s adapter is loaded under; None for version 0 (the base)."""
    return f"v{version}" if version > 0 else None


def lora_path_for(path: str | Path | None, version: int | None, label: str) -> str | None:
    """Which ``lora_path`` serves the weights in ``path`` (what `catq eval` and `catq demo` ask
    for each version they measure): None for the base model (no path) and for full weights;
    for a LoRA adapter directory, the name it is loaded under: :func:`adapter_name` for a run's
    version N (the syncer's name, so a stack's engine already has it; None for version 0, the
    base), else ``label`` (a directory given by its path)."""
    if path is None or not is_adapter_dir(path):
        return None
    return label if version is None else adapter_name(version)


async def loaded_adapters(client) -> list[str]:
    """The adapters an engine has loaded, oldest first, from ``/v1/models`` (SGLang and catq's
    engine list each loaded adapter as a model card with a ``parent``)."""
    reply = await client.request("GET", "/v1/models")
    cards = reply.get("data", []) if isinstance(reply, dict) else []
    names = [card.get("id") for card in cards if isinstance(card, dict) and card.get("parent")]
    return sorted((n for n in names if isinstance(n, str)), key=_version_key)


def _version_key(name: str) -> tuple[int, str]:
    digits = name.removeprefix("v")
    return (int(digits), name) if digits.isdigit() else (-1, name)


async def move(client, version: int, path: str) -> None:
    """Load version ``version``'s adapter from ``path`` and have the engine report that version.
    Raises EngineError (``refused`` for a 4xx: the engine will never take this adapter)."""
    await ensure_loaded(client, adapter_name(version), path)
    await client.update_weight_version(str(version), abort_all_requests=False)


async def ensure_loaded(client, name: str, path: str | Path) -> None:
    """Load adapter ``name`` from ``path`` unless the engine already has an adapter of that name
    (a pass that stopped half-way, or the syncer loaded it). Raises EngineError otherwise."""
    try:
        await client.load_lora_adapter(name, str(path))
    except EngineError as exc:
        if not (exc.refused and "already loaded" in exc.message):
            raise


async def prune(client, serving: int, log) -> bool:
    """Unload adapters older than the newest :data:`KEEP_ADAPTERS` up to ``serving``; True when
    nothing is left to unload. Failures are logged (the next pass tries again)."""
    try:
        names = await loaded_adapters(client)
    except (EngineError, OSError) as exc:
        log.warning("could not list the engine's LoRA adapters", error=str(exc))
        return False
    done = True
    keep = {adapter_name(v) for v in range(max(1, serving - KEEP_ADAPTERS + 1), serving + 1)}
    for name in names:
        if name in keep or _version_key(name)[0] > serving:
            continue
        try:
            await client.unload_lora_adapter(name)
            log.info("old LoRA adapter unloaded", adapter=name)
        except (EngineError, OSError) as exc:
            log.warning("could not unload an old LoRA adapter", adapter=name, error=str(exc))
            done = False
    return done
