"""Two "hosts" on one machine for tests: two network namespaces joined by a veth pair.

    with TwoHosts() as hosts:           # skips the test when not root / no CAP_NET_ADMIN
        redis = hosts.start("a", ["redis-server", "--bind", hosts.a_addr, ...], log)
        out = hosts.python("b", "print(1)", timeout_s=30)

Host A gets 10.231.<x>.1/24, host B 10.231.<x>.2/24 (x random, checked unused in the root
namespace); both bring ``lo`` up, and nothing else is configured: no address or route in the
root namespace, no forwarding, no NAT, so traffic goes only between the two namespaces (and to
each namespace's own loopback). Commands run in a namespace as ``ip netns exec NS ...`` (which
execs the command: the Popen pid is the command's). On exit every process started here is
stopped (SIGTERM, then SIGKILL) by its pid and both namespaces are deleted (with them the veth
pair), even when the test failed. Namespaces are named ``catq-2h-<pid>-<id>-a|b``; those left by
an earlier run whose pid is gone (a crashed or killed test) are removed first, with the
processes still inside them.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

PREFIX = "catq-2h-"
REPO = Path(__file__).resolve().parents[2]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_pids(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)


def remove_stale() -> None:
    """Delete namespaces of this helper whose creating test process is gone, and the processes
    left inside them."""
    for name in namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-[0-9a-f]+-[ab]", name)
        if not match or Path(f"/proc/{match.group(1)}").exists():
            continue
        pids = [int(p) for p in ip("netns", "pids", name, check=False).stdout.split()]
        _kill_pids(pids)
        ip("netns", "del", name, check=False)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of processes started in a namespace: this repo on the path, one thread,
    offline, and no proxy (a proxy would carry requests somewhere else)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               **extra)
    for var in ("CATQ_REDIS_URL", "CATQ_RUN", "CATQ_POLICY_URLS", "CATQ_ANCHOR_URL", "CATQ_JUDGE_URL"):
        env.pop(var, None)  # the config file alone says where things are
    return env


class TwoHosts:
    def __init__(self) -> None:
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ns = {"a": f"{PREFIX}{tag}-a", "b": f"{PREFIX}{tag}-b"}
        self.veth = {"a": f"cq{tag[-6:]}a", "b": f"cq{tag[-6:]}b"}  # at most 15 characters
        self.addr: dict[str, str] = {}
        self.procs: list[subprocess.Popen] = []

    @property
    def a_addr(self) -> str:
        return self.addr["a"]

    @property
    def b_addr(self) -> str:
        return self.addr["b"]

    @staticmethod
    def _free_subnet() -> str:
        used = ip("-4", "addr", "show").stdout
        for _ in range(100):
            subnet = f"10.231.{random.randrange(256)}"
            if f" {subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.231.x.0/24 in the root namespace")

    def __enter__(self) -> TwoHosts:
        if os.geteuid() != 0:
            pytest.skip("two-host test needs root (ip netns add)")
        if shutil.which("ip") is None:
            pytest.skip("two-host test needs iproute2's `ip` (ip netns add)")
        remove_stale()
        subnet = self._free_subnet()
        self.addr = {"a": f"{subnet}.1", "b": f"{subnet}.2"}
        try:
            ip("netns", "add", self.ns["a"])
            ip("netns", "add", self.ns["b"])
            # The pair is created in A and one end moved to B: nothing stays in the root namespace.
            ip("-n", self.ns["a"], "link", "add", self.veth["a"], "type", "veth", "peer", "name", self.veth["b"])
            ip("-n", self.ns["a"], "link", "set", self.veth["b"], "netns", self.ns["b"])
            for host in ("a", "b"):
                ns = self.ns[host]
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "addr", "add", f"{self.addr[host]}/24", "dev", self.veth[host])
                ip("-n", ns, "link", "set", self.veth[host], "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            pytest.skip(f"cannot set up network namespaces (no CAP_NET_ADMIN?): `{' '.join(exc.cmd)}` "
                        f"failed: {(exc.stderr or '').strip()}")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def start(self, host: str, argv: list[str], log: Path, **env: str) -> subprocess.Popen:
        """A long-running process on ``host``, its output appended to ``log``; stopped on exit."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.argv(host, argv), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=REPO, env=child_env(**env))
        self.procs.append(proc)
        return proc

    def catq(self, host: str, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        return self.start(host, [sys.executable, "-m", "catq", *args], log, **env)

    def run(self, host: str, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        """Run a command on ``host`` to completion (bounded by ``timeout_s``)."""
        return subprocess.run(self.argv(host, argv), capture_output=True, text=True, cwd=REPO,
                              env=child_env(), timeout=timeout_s, check=False)

    def python(self, host: str, code: str, *args: str, timeout_s: float, what: str = "") -> str:
        """Run a Python snippet on ``host`` (``args`` are its sys.argv[1:]); its stdout, or
        AssertionError with its output."""
        done = self.run(host, [sys.executable, "-c", code, *args], timeout_s)
        assert done.returncode == 0, (f"{what or 'snippet'} on host {host} failed ({done.returncode}):\n"
                                      f"{done.stdout}\n{done.stderr}")
        return done.stdout

    def sockets(self, host: str) -> list[tuple[str, str, str]]:
        """(state, local, remote) of every TCP socket in ``host``'s namespace, from /proc/net/tcp
        read inside it; addresses as "a.b.c.d:port", state "LISTEN", "ESTABLISHED" or a hex code."""
        text = self.run(host, ["cat", "/proc/net/tcp"], 30).stdout
        states = {"0A": "LISTEN", "01": "ESTABLISHED"}
        found = []
        for line in text.splitlines()[1:]:
            fields = line.split()
            found.append((states.get(fields[3], fields[3]), _addr(fields[1]), _addr(fields[2])))
        return found

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in self.ns.values():
            if ns in namespaces():
                _kill_pids([int(p) for p in ip("netns", "pids", ns, check=False).stdout.split()])
                ip("netns", "del", ns, check=False)


def _addr(hex_addr: str) -> str:
    ip_hex, port_hex = hex_addr.split(":")
    octets = [str(int(ip_hex[i:i + 2], 16)) for i in range(6, -1, -2)]  # little-endian
    return f"{'.'.join(octets)}:{int(port_hex, 16)}"
