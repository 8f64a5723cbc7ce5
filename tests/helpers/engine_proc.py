"""Run catq's engine server as a real subprocess in tests.

    from tests.helpers.engine_proc import EngineProcess, engine_factory  # noqa: F401

    def test_x(tmp_path):
        with EngineProcess(model="default", weights_dir=tmp_path / "weights") as engine:
            ...  # engine.url is "http://127.0.0.1:<free port>"

    def test_y(engine_factory):            # pytest fixture: stops every engine it started
        engine = engine_factory(model=str(tiny_model_path))

The process is `python -m catq engine --model M --port P --weights-dir W`, started with its
output in a log file (``engine.log_path``; its tail is shown when start-up fails), waited for
until GET /health answers 200, and stopped with SIGTERM (then SIGKILL after a grace period) —
only this process, by its pid.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EngineProcess:
    def __init__(self, model: str = "default", *, weights_dir: str | Path | None = None,
                 port: int | None = None, max_batch: int = 64, device: str = "cpu", extra_args: list[str] | None = None,
                 startup_timeout_s: float = 240.0, env: dict[str, str] | None = None):
        self.model = model
        self.weights_dir = Path(weights_dir) if weights_dir else None
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_batch = max_batch
        self.device = device
        self.extra_args = extra_args or []
        self.startup_timeout_s = startup_timeout_s
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "catq", "engine", "--model", self.model, "--port", str(self.port),
                "--device", self.device, "--max-batch", str(self.max_batch), *self.extra_args]
        if self.weights_dir is not None:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            args += ["--weights-dir", str(self.weights_dir)]
        return args

    def environment(self) -> dict[str, str]:
        return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}

    def start(self) -> EngineProcess:
        fd, log_name = tempfile.mkstemp(prefix=f"catq-engine-{self.port}-", suffix=".log")
        self.log_path = Path(log_name)
        with os.fdopen(fd, "w") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.environment())
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"engine not healthy after {self.startup_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> EngineProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SGLangProcess(EngineProcess):
    """Real SGLang (``python -m sglang.launch_server``) on the CPU, from catq's cached SGLang
    environment (installed on first use), started exactly as `catq up` starts a ``kind =
    "sglang"``, ``device = "cpu"`` engine. ``api_key``/``admin_api_key`` become its flags;
    ``extra_args`` (e.g. catq.engines.lora.server_flags) follow them."""

    def __init__(self, model: str = "default", *, api_key: str = "", admin_api_key: str = "", **kwargs):
        kwargs.setdefault("startup_timeout_s", 300.0)
        super().__init__(model, **kwargs)
        self.api_key, self.admin_api_key = api_key, admin_api_key

    def argv(self) -> list[str]:
        from catq.engines.models import resolve_model_path
        from catq.engines.sglang_env import SGLangEnvError, ensure_env, server_argv

        try:
            python = ensure_env(say=lambda text: print(text, file=sys.stderr))
        except SGLangEnvError as exc:
            pytest.fail(f"real SGLang could not be installed, so its tests cannot run: {exc}", pytrace=False)
        return server_argv(python, str(resolve_model_path(self.model)), host="127.0.0.1", port=self.port,
                           device="cpu", api_key=self.api_key, admin_api_key=self.admin_api_key,
                           extra=tuple(self.extra_args))

    def environment(self) -> dict[str, str]:
        from catq.engines.sglang_env import server_env

        return server_env({**super().environment()}, "cpu")


@pytest.fixture
def engine_factory() -> Iterator:
    """Call it with EngineProcess's arguments; every engine started is stopped after the test."""
    started: list[EngineProcess] = []

    def start(model: str = "default", **kwargs) -> EngineProcess:
        engine = EngineProcess(model, **kwargs).start()
        started.append(engine)
        return engine

    yield start
    for engine in started:
        engine.stop()
