"""LoRA adapters on catq's engine: SGLang's dynamic LoRA API, on PyTorch.

    catq engine --model default --enable-lora --max-lora-rank 8 \\
        --lora-target-modules q_proj k_proj v_proj o_proj --max-loras-per-batch 4 \\
        --lora-paths v3=runs/default/weights/v3

What SGLang (0.5.x) names and does, and catq's engine does alike:

- server flags ``--enable-lora``, ``--max-lora-rank``, ``--lora-target-modules`` (names, or
  ``all``), ``--max-loras-per-batch`` (distinct adapters in one running batch, the base model
  counting as one; default 8) and ``--lora-paths`` (``<PATH>`` | ``<NAME>=<PATH>`` | JSON
  ``{"lora_name", "lora_path", "pinned"}``; giving it implies ``--enable-lora``). Without
  ``--lora-paths``, both ``--max-lora-rank`` and ``--lora-target-modules`` are required; with
  it, whichever is left out is inferred from those adapters.
- ``POST /load_lora_adapter {"lora_name", "lora_path", "pinned"?}`` and ``POST
  /unload_lora_adapter {"lora_name"}`` answer SGLang's ``LoRAUpdateOutput``: ``{"success",
  "error_message", "loaded_adapters": {name: path}}`` (plus its ``rid`` and ``http_worker_ipc``,
  null), HTTP 200, or 400 with ``success: false`` and the reason. A refused load changes nothing:
  the adapters already loaded keep serving. Unloading stops new requests from naming the adapter
  at once and answers once the requests already using it have finished. A request naming an
  adapter unloaded since loads it again from the same path (SGLang's ``lora_ref_cache``: an
  unload frees the slot, it does not forget the name); only a name never loaded is refused.
- ``lora_path`` on ``/generate``: an adapter name, or one per prompt (null = the base model);
  ``model = "<base>:<adapter>"`` (or a bare adapter name) on ``/v1/chat/completions``. Requests on
  different adapters share a batch: each row gets its own adapter's update.
- ``POST /update_weight_version {"new_version", "abort_all_requests"}``: set the reported
  ``weight_version`` without touching weights (the syncer calls it after loading a version's
  adapter, so ``/model_info`` reports the version that serves).

Refusals name the mismatch: an adapter whose ``base_model_name_or_path`` is another model than
the one served (the same path, or the same final path component, counts as the same), whose rank
exceeds ``--max-lora-rank``, whose target modules are not all in ``--lora-target-modules``, or
whose tensors do not fit the model's layers; also DoRA, biases, ``modules_to_save`` and added
tokens, which the engine cannot serve. With ``--weights-dir`` the adapter must lie inside it (as
for ``/update_weights_from_disk``).

Each generated row's ``meta_info.weight_version`` is its adapter's version when the adapter was
loaded from a published ``v<N>`` directory (catq/learner/publish.py: what the path names is the
version), else the server's.

The update is computed beside each targeted ``nn.Linear`` by a forward hook: ``y += (alpha/r) ·
B A x`` for the rows on that adapter (rank-stabilised ``alpha/sqrt(r)`` when the adapter says
``use_rslora``). Base weights are untouched, so full weight updates still work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `catq --help` stays light
    import torch

SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_TARGETS = "all"
VERSION_DIR_RE = re.compile(r"^v(\d+)$")
NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."


class LoraError(ValueError):
    """An adapter or request the engine refuses (HTTP 400, the message names why)."""


def add_server_args(parser: argparse.ArgumentParser) -> None:
    """SGLang's LoRA server flags, same names, defaults and forms."""
    parser.add_argument("--enable-lora", action="store_true", default=None,
                        help="Enable LoRA support for the model (implied by --lora-paths).")
    parser.add_argument("--max-lora-rank", type=int, default=None,
                        help="The maximum rank of LoRA adapters; inferred from --lora-paths if not given.")
    parser.add_argument("--lora-target-modules", nargs="*", default=None,
                        choices=[*SUPPORTED_TARGET_MODULES, ALL_TARGETS],
                        help="The union set of all target modules where LoRA should be applied; "
                             "inferred from --lora-paths if not given; 'all' targets every supported one.")
    parser.add_argument("--lora-paths", nargs="*", default=None,
                        help='LoRA adapters to load at start: <PATH> | <NAME>=<PATH> | JSON '
                             '{"lora_name":str,"lora_path":str,"pinned":bool}')
    parser.add_argument("--max-loras-per-batch", type=int, default=8,
                        help="Maximum number of adapters for a running batch, include base-only request.")


def server_flags(*, rank: int, target_modules: list[str], max_loras_per_batch: int = 4,
                 lora_paths: dict[str, str] | None = None) -> list[str]:
    """The flags that start an engine (catq's or SGLang) ready for a LoRA policy's adapters."""
    flags = ["--enable-lora", "--max-lora-rank", str(rank), "--lora-target-modules", *target_modules,
             "--max-loras-per-batch", str(max_loras_per_batch)]
    if lora_paths:
        flags += ["--lora-paths", *(f"{name}={path}" for name, path in lora_paths.items())]
    return flags


def flags_fitting(adapter_dirs: list) -> list[str]:
    """:func:`server_flags` for an engine that can load each of ``adapter_dirs`` (their largest
    rank, all their target modules), the way ``--lora-paths`` infers them."""
    rank, targets = limits_fitting(adapter_dirs)
    return server_flags(rank=rank, target_modules=targets)


def limits_fitting(adapter_dirs: list) -> tuple[int, list[str]]:
    """(``--max-lora-rank``, ``--lora-target-modules``) that fit every adapter in ``adapter_dirs``."""
    configs = [read_config(path) for path in adapter_dirs]
    return max(int(c.get("r", 0)) for c in configs), sorted(set().union(*(config_targets(c) for c in configs)))


def parse_lora_paths(values: list[str] | None) -> list[tuple[str, str, bool]]:
    """(name, path, pinned) for each ``--lora-paths`` entry, in SGLang's three forms."""
    out = []
    for value in values or []:
        value = value.strip()
        if value.startswith("{"):
            spec = json.loads(value)
            out.append((spec["lora_name"], spec["lora_path"], bool(spec.get("pinned", False))))
        elif "=" in value:
            name, path = value.split("=", 1)
            out.append((name, path, False))
        else:
            out.append((value, value, False))
    return out


@dataclass(eq=False)
class Adapter:
    """One loaded adapter: per targeted module (its name in the base model) the pair (A, B)."""

    name: str
    path: str
    rank: int
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    pinned: bool = False
    version: str | None = None
    """The ``v<N>`` directory's N when it was loaded from one."""
    uid: int = 0
    in_flight: int = 0

    @property
    def targets(self) -> set[str]:
        return {name.rsplit(".", 1)[-1] for name in self.modules}


@dataclass
class LoraManager:
    """The engine's adapters, and the forward hooks that apply them."""

    model: torch.nn.Module
    model_path: str
    served_name: str
    max_lora_rank: int | None
    target_modules: set[str]
    max_loras_per_batch: int = 8
    weights_dir: Path | None = None
    adapters: dict[str, Adapter] = field(default_factory=dict)
    ever_loaded: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """(path, pinned) of every name loaded once, unloaded or not: what a request may reload."""

    def __post_init__(self):
        import torch

        self._local = threading.local()
        self._uids = itertools.count(1)
        self.linears = {name: module for name, module in self.model.named_modules()
                        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in self.target_modules}
        for name, module in self.linears.items():
            module.register_forward_hook(self._hook(name))

    @classmethod
    def from_args(cls, model, args: argparse.Namespace, *, model_path: str, served_name: str,
                  weights_dir: Path | None) -> LoraManager | None:
        """The manager the flags ask for (None when LoRA is off); loads ``--lora-paths``."""
        initial = parse_lora_paths(getattr(args, "lora_paths", None))
        if not (getattr(args, "enable_lora", None) or initial):
            return None
        rank, targets = getattr(args, "max_lora_rank", None), getattr(args, "lora_target_modules", None)
        if not initial and (rank is None or targets is None):
            raise LoraError("When no initial `--lora-paths` is provided, you need to specify both "
                            "`--max-lora-rank` and `--lora-target-modules` for LoRA initialization.")
        if initial:
            fitted_rank, fitted_targets = limits_fitting([path for _, path, _ in initial])
            rank = fitted_rank if rank is None else rank
            targets = fitted_targets if targets is None else targets
        if ALL_TARGETS in targets:
            targets = list(SUPPORTED_TARGET_MODULES)
        manager = cls(model, model_path=model_path, served_name=served_name, max_lora_rank=rank,
                      target_modules=set(targets), max_loras_per_batch=getattr(args, "max_loras_per_batch", 8),
                      weights_dir=None)  # --lora-paths are the operator's own: not confined
        for name, path, pinned in initial:
            manager.load(name, path, pinned)
        manager.weights_dir = weights_dir.resolve() if weights_dir else None
        return manager

    # -- loading ---------------------------------------------------------------------------

    def load(self, name: str, path: str, pinned: bool = False) -> Adapter:
        """Read, check and install an adapter; LoraError naming the problem, nothing changed."""
        if not name:
            raise LoraError("lora_name is required")
        if name in self.adapters:
            raise LoraError(f"Failed to load LoRA adapter {name} because it is already loaded")
        directory = self._allowed(path)
        config = read_config(directory)
        self._check_config(name, config)
        adapter = self._read_weights(name, directory, config)
        adapter.pinned = pinned
        adapter.path = path
        match = VERSION_DIR_RE.match(directory.name)
        adapter.version = match.group(1) if match else None
        adapter.uid = next(self._uids)
        self.adapters[name] = adapter
        self.ever_loaded[name] = (path, pinned)
        return adapter

    def to_reload(self, names: list[str | None]) -> list[str]:
        """The adapters a request names that were loaded once and unloaded since; LoraError
        for a name never loaded."""
        missing = []
        for name in dict.fromkeys(n for n in names if n):
            if name in self.adapters:
                continue
            if name not in self.ever_loaded:
                raise LoraError(self._never_loaded(name))
            missing.append(name)
        return missing

    def reload(self, name: str) -> None:
        """Load an unloaded adapter again from its path, as SGLang does when a request names it."""
        if name in self.adapters:  # another request reloaded it first
            return
        path, pinned = self.ever_loaded[name]
        try:
            self.load(name, path, pinned)
        except LoraError as exc:
            raise LoraError(f"Failed to implicitly load LoRA adapter {name}: {exc}") from None

    def _never_loaded(self, name: str) -> str:
        return (f"Got LoRA adapter that has never been loaded: {name}\n"
                f"All loaded adapters: {sorted(self.ever_loaded)}.")

    def _allowed(self, path: str) -> Path:
        directory = Path(path).expanduser().resolve()
        if self.weights_dir is not None and not directory.is_relative_to(self.weights_dir):
            raise LoraError(f"lora_path {path!r} is outside the weights directory {str(self.weights_dir)!r}")
        if not is_adapter_dir(directory):
            raise LoraError(f"lora_path {path!r} is no LoRA adapter directory (no adapter_config.json)")
        return directory

    def _check_config(self, name: str, config: dict) -> None:
        if str(config.get("peft_type", "LORA")).upper() != "LORA":
            raise LoraError(f"Failed to load {name}: peft_type {config.get('peft_type')!r} is not LORA")
        if config.get("use_dora"):
            raise LoraError(f"Failed to load {name} because LoRA serving currently doesn't support DoRA adapters")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise LoraError(f"Failed to load {name}: adapters with trained biases or modules_to_save "
                            "are not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise LoraError(f"Failed to load {name}: per-module rank_pattern/alpha_pattern is not supported")
        base = config.get("base_model_name_or_path")
        if base and not same_model(base, self.model_path, self.served_name):
            raise LoraError(f"LoRA adapter {name} was trained on base model {base!r}, but this server "
                            f"serves {self.model_path!r}: base model mismatch")
        rank = int(config.get("r", 0))
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise LoraError(f"LoRA adapter {name} with rank {rank} is incompatible with the current LoRA "
                            f"configuration: its rank {rank} exceeds --max-lora-rank {self.max_lora_rank}. "
                            "Please ensure that the LoRA adapter's rank is within the configured "
                            "`--max-lora-rank` and that the target modules are included in `--lora-target-modules`.")
        extra = sorted(config_targets(config) - self.target_modules)
        if extra:
            raise LoraError(f"LoRA adapter {name} targets modules {extra} that are not in --lora-target-modules "
                            f"{sorted(self.target_modules)}: target modules mismatch")

    def _read_weights(self, name: str, directory: Path, config: dict) -> Adapter:
        from safetensors.torch import load_file

        files = [directory / "adapter_model.safetensors"]
        if not files[0].is_file():
            raise LoraError(f"Failed to load {name}: no adapter_model.safetensors in {directory}")
        if (directory / "added_tokens.json").is_file() and json.loads((directory / "added_tokens.json").read_text()):
            raise LoraError(f"Failed to load {name} because LoRA serving currently doesn't support adapters "
                            "that add tokens to the vocabulary")
        tensors = load_file(str(files[0]))
        rank = int(config.get("r", 0))
        alpha = float(config.get("lora_alpha", rank))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
            if not match:
                raise LoraError(f"Failed to load {name}: unexpected tensor {key!r} (only lora_A/lora_B weights)")
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        modules = {}
        for module_name, pair in pairs.items():
            target = self.linears.get(module_name)
            if target is None:
                raise LoraError(f"Failed to load {name}: it adapts {module_name!r}, which the base model "
                                f"has no LoRA-enabled linear layer for")
            a, b = pair.get("lora_A"), pair.get("lora_B")
            if a is None or b is None:
                raise LoraError(f"Failed to load {name}: {module_name} lacks lora_A or lora_B")
            if (tuple(a.shape) != (rank, target.in_features) or tuple(b.shape) != (target.out_features, rank)):
                raise LoraError(f"Failed to load {name}: {module_name} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                f"rank {rank} on this layer needs A {(rank, target.in_features)}, "
                                f"B {(target.out_features, rank)}: shape mismatch")
            weight = target.weight
            modules[module_name] = (a.to(weight.device, weight.dtype), b.to(weight.device, weight.dtype))
        if not modules:
            raise LoraError(f"Failed to load {name}: the adapter holds no weights")
        return Adapter(name=name, path=str(directory), rank=rank, scale=scale, modules=modules)

    async def unload(self, name: str) -> None:
        """Stop new requests from naming ``name``, then wait for those using it to finish."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise LoraError(f"LoRA with name {name} does not exist. Loaded LoRAs: {sorted(self.adapters)}")
        while adapter.in_flight > 0:
            await asyncio.sleep(0.01)

    def loaded(self) -> dict[str, str]:
        return {name: adapter.path for name, adapter in self.adapters.items()}

    # -- requests ---------------------------------------------------------------------------

    def resolve(self, names: list[str | None]) -> list[Adapter | None]:
        """The adapters a request names (None: the base model); LoraError for an unknown name."""
        out = []
        for name in names:
            if name is None or name == "":
                out.append(None)
                continue
            adapter = self.adapters.get(name)
            if adapter is None:  # never loaded, or unloaded between to_reload and here
                raise LoraError(self._never_loaded(name) if name not in self.ever_loaded else
                                f"LoRA adapter {name} was unloaded while the request was admitted")
            out.append(adapter)
        return out

    @contextlib.contextmanager
    def hold(self, adapters: list[Adapter | None]):
        """Count a request's adapters as in use while it runs (an unload waits for them)."""
        held = [a for a in adapters if a is not None]
        for adapter in held:
            adapter.in_flight += 1
        try:
            yield
        finally:
            for adapter in held:
                adapter.in_flight -= 1

    @contextlib.contextmanager
    def use(self, adapters: list[Adapter | None]):
        """Apply each row's adapter in the forward passes run inside (this thread only)."""
        import torch

        groups = []
        distinct = {id(a): a for a in adapters if a is not None}
        for adapter in distinct.values():
            if all(a is adapter for a in adapters):
                groups.append((adapter, None))
            else:
                rows = [i for i, a in enumerate(adapters) if a is adapter]
                groups.append((adapter, torch.tensor(rows, device=self._device())))
        previous = getattr(self._local, "groups", None)
        self._local.groups = groups or None
        try:
            yield
        finally:
            self._local.groups = previous

    def _device(self):
        return next(self.model.parameters()).device

    def _hook(self, module_name: str):
        def apply(module, inputs, output):
            groups = getattr(self._local, "groups", None)
            if not groups:
                return None
            x = inputs[0]
            for adapter, rows in groups:
                pair = adapter.modules.get(module_name)
                if pair is None:
                    continue
                a, b = pair
                if rows is None:
                    output = output + (x @ a.T) @ b.T * adapter.scale
                else:
                    delta = (x.index_select(0, rows) @ a.T) @ b.T * adapter.scale
                    output = output.index_add(0, rows, delta.to(output.dtype))
            return output

        return apply


def fits_batch(running: list, candidate, taken: list, limit: int) -> bool:
    """Whether ``candidate`` (a Sequence) may join a batch of ``running`` + ``taken`` sequences
    without more than ``limit`` distinct adapters (the base model counting as one)."""
    present = {_uid(s) for s in itertools.chain(running, taken)}
    return _uid(candidate) in present or len(present) < limit


def _uid(seq) -> int:
    adapter = getattr(seq, "lora", None)
    return 0 if adapter is None else adapter.uid


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter directory (a LoRA policy's ``weights/v<N>/``), not full weights."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def read_config(path: str | Path) -> dict:
    file = Path(path).expanduser() / ADAPTER_CONFIG
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise LoraError(f"{str(path)!r} is no LoRA adapter directory (no adapter_config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise LoraError(f"cannot read {file}: {exc}") from None


def config_targets(config: dict) -> set[str]:
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex in PEFT: name what it can match among the supported ones
        return {t for t in SUPPORTED_TARGET_MODULES if re.search(targets, t)}
    return {str(t).rsplit(".", 1)[-1] for t in targets}


def same_model(base: str, model_path: str, served_name: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the model served: the same string,
    the same resolved path, or the same final component (a hub id vs a local copy of it)."""
    if base in (model_path, served_name):
        return True
    try:
        if Path(base).expanduser().resolve() == Path(model_path).expanduser().resolve():
            return True
    except (OSError, RuntimeError):
        pass
    return Path(base.rstrip("/")).name.lower() == Path(model_path.rstrip("/")).name.lower()


def split_model_field(model: str) -> str | None:
    """The adapter an OpenAI ``model`` field names with SGLang's ``"<base>:<adapter>"`` syntax;
    None (the base model) without a colon."""
    if ":" not in (model or ""):
        return None
    return model.rsplit(":", 1)[1] or None
