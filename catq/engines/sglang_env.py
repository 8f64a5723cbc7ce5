"""Real SGLang on a CPU: its own virtual environment, and how catq starts a server from it.

    catq sglang install          # once: ~3 min, ~7 GB, cached in ~/.cache/catq/sglang-0.5.23-cpu
    catq sglang python           # prints the environment's interpreter

SGLang needs CUDA torch 2.14.1 even on a CPU (it imports torchvision, and PyPI's torchvision is a
CUDA build), so it cannot share catq's environment (CPU torch 2.13). The install is the light
route: ``sglang==0.5.23`` without its dependencies, then only those its CPU path imports (no
flashinfer, sglang-kernel, cutlass-dsl, tilelang, deep-ep/gemm, flash-attn, torchaudio...). The
one missing piece, ``sgl_kernel`` (PyPI has only CUDA builds), is catq's pure-torch stand-in in
``catq/engines/sglang_cpu``, put first on the server's PYTHONPATH only for ``device = "cpu"``.
LoRA (``--enable-lora``) on the CPU needs two more things: the ``torch_native`` LoRA backend
(the default ``csgmv`` and ``triton`` ones are triton kernels) and pinned memory as a no-op
(``sglang_cpu/sitecustomize.py``: SGLang's LoRA layers pin host memory unconditionally, which
the CUDA torch build refuses without a driver).

On a GPU host install the real thing instead (``pip install 'catq[gpu]'``) and use
``device = "cuda"``: catq then runs ``python -m sglang.launch_server`` from its own interpreter.

The environment is keyed by the SGLang version and the dependency list (a change to either
builds a new one); a file lock lets concurrent callers (pytest processes, `catq up`) wait for one
install instead of racing.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

SGLANG_VERSION = "0.5.23"
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
CPU_PATH_DEPENDENCIES = (
    "aiohttp", "blobfile==3.0.0", "compressed-tensors==0.18.0", "dill", "distro", "easydict", "einops",
    "fastapi", "gguf", "interegular", "IPython", "llguidance>=1.7.6,<2", "msgspec", "ninja",
    "numba==0.65.1", "numpy", "nvidia-ml-py", "openai==2.8.0", "openai-harmony==0.0.4", "orjson",
    "outlines==0.1.11", "packaging", "partial_json_parser", "pillow", "prometheus-client>=0.20.0",
    "psutil", "pybase64", "pydantic", "python-dateutil<3", "python-multipart", "pyzmq>=25.1.2",
    "regex", "requests", "scipy", "sentencepiece==0.2.1", "setproctitle", "soundfile==0.13.1",
    "tiktoken", "timm==1.0.25", "tokenizers==0.23.2", "tqdm", "transformers==5.19.0",
    "uvicorn>=0.51", "uvloop", "watchfiles", "xgrammar==0.2.7", "xxhash", "zstandard",
)
"""What SGLang 0.5.23's server imports on the CPU path (its METADATA minus the CUDA-only parts)."""

STANDIN_DIR = Path(__file__).resolve().parent / "sglang_cpu"
"""Holds the ``sgl_kernel`` stand-in package; goes first on PYTHONPATH of CPU servers only."""

CPU_SERVER_ARGS = ("--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
                   "--skip-server-warmup", "--max-total-tokens", "4096", "--sleep-on-idle")
"""x86 defaults to the intel_amx backend, which needs AMX and sgl_kernel's CPU ops; fp32 makes
the behaviour log-probs comparable with catq's learner (fp32 on CPU). Without --sleep-on-idle
an idle scheduler busy-polls one core at 100% (measured): two idle engines starve a 2-core
machine of everything else."""

CPU_LORA_ARGS = ("--lora-backend", "torch_native")
"""SGLang's only LoRA backend without triton or NPU kernels (its default, csgmv, is triton)."""


class SGLangEnvError(RuntimeError):
    """The SGLang environment could not be installed (no network to PyPI, no disk...)."""


def env_key() -> str:
    spec = "\n".join((SGLANG_VERSION, *TORCH, *CPU_PATH_DEPENDENCIES))
    return f"sglang-{SGLANG_VERSION}-cpu-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"


def env_dir() -> Path:
    """``$CATQ_SGLANG_ENV`` or ``~/.cache/catq/<env_key()>``: outside any checkout, so every
    clone and every CI run on this machine shares it."""
    override = os.environ.get("CATQ_SGLANG_ENV")
    return Path(override) if override else Path.home() / ".cache" / "catq" / env_key()


def env_python(directory: Path | None = None) -> Path:
    return (directory or env_dir()) / "bin" / "python"


def is_installed(directory: Path | None = None) -> bool:
    return ((directory or env_dir()) / ".complete").exists()


_install_failure: SGLangEnvError | None = None
"""A failed install is not retried in the same process (every test would wait for it again)."""


def ensure_env(say=print) -> Path:
    """The interpreter of a complete SGLang CPU environment, installing it first if needed."""
    global _install_failure
    directory = env_dir()
    if is_installed(directory):
        return env_python(directory)
    if _install_failure is not None:
        raise _install_failure
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be installing it: wait for it
        if not is_installed(directory):
            try:
                _install(directory, say)
            except SGLangEnvError as exc:
                _install_failure = exc
                raise
    return env_python(directory)


def _install(directory: Path, say) -> None:
    started = time.monotonic()
    say(f"installing SGLang {SGLANG_VERSION} for CPU into {directory} (once; ~3 min, ~7 GB)")
    pip = [str(env_python(directory)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(directory)],
        [*pip, *TORCH],
        [*pip, "--no-deps", f"sglang=={SGLANG_VERSION}"],
        [*pip, *CPU_PATH_DEPENDENCIES, *TORCH],
    ]
    for argv in steps:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise SGLangEnvError(f"SGLang install failed at `{' '.join(argv[-3:])}`: " + " | ".join(tail))
    (directory / ".complete").write_text(f"{SGLANG_VERSION}\n")
    say(f"SGLang {SGLANG_VERSION} installed in {time.monotonic() - started:.0f} s")


def server_argv(python: str | Path, model_path: str, *, host: str, port: int, device: str,
                api_key: str = "", admin_api_key: str = "", extra: tuple[str, ...] = ()) -> list[str]:
    argv = [str(python), "-m", "sglang.launch_server", "--model-path", model_path,
            "--host", host, "--port", str(port)]
    if device == "cpu":
        argv += CPU_SERVER_ARGS
        if ("--enable-lora" in extra or "--lora-paths" in extra) and "--lora-backend" not in extra:
            argv += CPU_LORA_ARGS
    if api_key:
        argv += ["--api-key", api_key]
    if admin_api_key:
        argv += ["--admin-api-key", admin_api_key]
    return [*argv, *extra]


def server_env(base: dict[str, str], device: str) -> dict[str, str]:
    """The server's environment: raw (temperature-free) behaviour log-probs, as catq's learner
    computes them; on CPU, SGLang's CPU engine and the sgl_kernel stand-in."""
    env = dict(base)
    env["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    if device == "cpu":
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STANDIN_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def sglang_command(args) -> int:
    """`catq sglang install|python`."""
    try:
        python = ensure_env(say=lambda text: print(text, file=sys.stderr))
    except SGLangEnvError as exc:
        print(f"catq sglang: {exc}", file=sys.stderr)
        return 1
    print(python)
    return 0
