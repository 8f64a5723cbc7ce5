"""A real Redis Cluster on this machine for tests: three masters on free ports, created with
`redis-cli --cluster create`, removed (processes and files) on exit, even when a test fails."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MASTERS = 3
BUS_PORT_OFFSET = 10_000
"""A cluster node also listens on its port + 10000 (the cluster bus)."""


def free_node_port() -> int:
    """A port free for a node and for its cluster bus port (so below 55536, which the kernel's
    ephemeral range mostly is not)."""
    while True:
        port = random.randrange(20_000, 30_000)
        if all(_bindable(p) for p in (port, port + BUS_PORT_OFFSET)):
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class RedisCluster:
    """``with RedisCluster() as cluster:`` then ``cluster.url`` (one node; the client finds the rest)."""

    def __init__(self, masters: int = MASTERS):
        self.ports = [free_node_port() for _ in range(masters)]
        self.dir = Path(tempfile.mkdtemp(prefix="catq-cluster-"))
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def __enter__(self) -> RedisCluster:
        try:
            for port in self.ports:
                self.procs.append(self._start_node(port))
            for port in self.ports:
                self._wait(lambda p=port: self._cli(p, "ping") == "PONG", f"node {port}")
            nodes = [f"127.0.0.1:{p}" for p in self.ports]
            subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0",
                            "--cluster-yes"], check=True, capture_output=True, timeout=60)
            for port in self.ports:
                self._wait(lambda p=port: "cluster_state:ok" in self._cli(p, "cluster", "info"),
                           f"cluster state ok on {port}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _start_node(self, port: int) -> subprocess.Popen:
        node_dir = self.dir / str(port)
        node_dir.mkdir()
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(node_dir / "nodes.conf"), "--dir", str(node_dir),
             "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    @staticmethod
    def _wait(predicate, what: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"redis cluster: timed out waiting for {what}")
