"""What a child of `catq up` inherits: its environment (an allowlist plus the variables the config
names for keys and tokens, :func:`child_environment`), its thread budget (``[resources]``,
:func:`thread_plan`), and the run's Redis password (random per run dir, kept 0600, reaching the
server through a 0600 config file and never argv).

Pure functions of the config, the environment and the run dir; :mod:`catq.launcher` applies them.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlparse, urlunparse

from catq.config import Config

REDIS_PASSWORD_FILE = "redis.password"

ENV_ALLOWED = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP",
    "PYTHONPATH", "PYTHONHOME", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy",
    "no_proxy",
}
"""Variables every child inherits as they are (proxies and CA bundles: a hosted judge)."""
ENV_ALLOWED_PREFIXES = ("LC_", "CATQ_", "CUDA_", "HF_", "TORCH_", "OMP_", "MKL_", "NCCL_",
                        "NVIDIA_", "PYTORCH_", "TRANSFORMERS_", "TOKENIZERS_", "SGLANG_")
"""Prefixes of variables children inherit: catq's own, and the ML stack's knobs."""


def config_secret_env_names(config: Config) -> set[str]:
    """The variables the config names for keys and tokens: the roles and engines need them."""
    engines = config.engines
    names = {engines.api_key_env, engines.admin_api_key_env, engines.judge_api_key_env,
             config.ingest.token_env}
    return {name for name in names if name}


def child_environment(config: Config, environ=None) -> dict[str, str]:
    """The part of ``environ`` (default os.environ) a child of `catq up` gets: allowlisted
    variables and the config's key/token variables, nothing else."""
    environ = os.environ if environ is None else environ
    wanted = config_secret_env_names(config)
    return {name: value for name, value in environ.items()
            if name in ENV_ALLOWED or name in wanted or name.startswith(ENV_ALLOWED_PREFIXES)}


@dataclass(frozen=True)
class ThreadPlan:
    learner: int
    engine: int
    role: int

    def for_role(self, role: str) -> int:
        return self.learner if role == "learner" else self.role


def thread_plan(config: Config, cores: int | None = None) -> ThreadPlan:
    """Threads per child from ``[resources]``: the learner gets half the cores, the local
    engines share the other half, other roles one. Where that would leave the learner or an
    engine a single thread, every engine and the learner get every core instead: the
    pipeline's stages take turns more than they overlap, and a stage running alone would leave
    the idle stages' shares unused (bench/pipeline.py on 2 cores, one thread each: 0.74 and
    0.99 of the unshared rate in two runs, never faster)."""
    wanted = config.resources
    cores = wanted.cores or cores or len(os.sched_getaffinity(0))
    engines = sum(spec.kind != "external" for spec in config.engines.launch)
    learner = wanted.learner_threads or (max(1, cores // 2) if config.roles.learner else 0)
    engine = wanted.engine_threads or max(1, (cores - learner) // max(engines, 1))
    if min(engine, learner or engine) < 2:  # a one-thread share: share nothing (explicit values stay)
        learner, engine = wanted.learner_threads or cores, wanted.engine_threads or cores
    return ThreadPlan(learner=max(learner, 1), engine=engine, role=wanted.role_threads)


def thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_redis_password(run_path: Path) -> str:
    """The run dir's Redis password: random on first use (file mode 0600), the same afterwards,
    so a restarted `catq up` reaches the Redis, and the data, of its run."""
    path = Path(run_path) / REDIS_PASSWORD_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        path.chmod(0o600)
        return path.read_text().strip()
    password = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as file:
        file.write(password + "\n")
    return password


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its password (user name and everything else kept)."""
    parsed = urlparse(url)
    host = parsed.netloc.rpartition("@")[2]
    user = quote(unquote(parsed.username or ""), safe="")
    return urlunparse(parsed._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def write_redis_conf(path: Path, password: str) -> None:
    """A redis.conf (mode 0600) carrying the password, so it never appears in argv."""
    escaped = password.replace("\\", "\\\\").replace('"', '\\"')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(f'requirepass "{escaped}"\n')
    path.chmod(0o600)
