"""Policy engine replicas: which exist, which serve the newest weights, which gets the next request.

Finding them (:func:`discover`): each URL of ``engines.policy_urls`` is one replica, or, for a
host name, one replica per IPv4 address the name resolves to (``engines.resolve_replicas``), so
four compose replicas behind the service name ``policy`` (``docker compose --scale policy=4``)
are four replicas.

Keeping them current is the syncer's job (:mod:`catq.learner.syncer`): it brings every replica
to the newest published version and only then lists it in the run's replica registry (a Redis
hash, through the Bus) with the version it serves, refreshed every heartbeat; a replica that
stops answering, or is being updated, is taken off the list at once. So a replica that joins or
restarts receives rollout traffic only once it serves the newest weights.

Spreading the load (:class:`ReplicaPicker`, used by rollout): each request goes to the listed
replica with the fewest requests outstanding from this worker (least outstanding requests, which
adapts to replicas of different speed better than round-robin; ties go round-robin). While a syncer is alive (its
heartbeat) the registry is the word: entries older than ``REGISTRY_FRESH_BEATS`` heartbeats are
ignored, and with none listed (every replica loading weights) requests wait (a transient
failure, retried). With no syncer running, rollout uses the configured URLs as they are.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

from catq.engines.client import EngineError

POOL = "policy"
"""The registry of policy replicas (the only engines that take weight updates)."""

REGISTRY_FRESH_BEATS = 10
"""A registry entry counts while it is younger than this many syncer heartbeats: long enough
for a slow weight reload of another replica to hold up the syncer's pass."""

REFRESH_S = 1.0
"""How often rollout re-reads the registry."""


class NoReplicaReady(EngineError):
    """Replicas are listed but none serves the newest weights yet (all being updated): a
    transient failure, retried with backoff."""


async def discover(urls: list[str], resolve: bool = True) -> list[str]:
    """One URL per replica: each of ``urls``, or with ``resolve`` one per IPv4 address its host
    name has (http only: https keeps its name for the certificate). Order kept, duplicates
    dropped; a name that does not resolve stays as it is (it will count as down)."""
    found: list[str] = []
    for url in urls:
        for replica in (await _resolve(url) if resolve else [url]):
            if replica not in found:
                found.append(replica)
    return found


async def _resolve(url: str) -> list[str]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or not host or _is_ip(host):
        return [url]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, parts.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError:
        return [url]
    addresses = sorted({info[4][0] for info in infos}, key=ipaddress.ip_address)
    netloc = lambda ip: f"{ip}:{parts.port}" if parts.port else ip  # noqa: E731
    return [urlunsplit(parts._replace(netloc=netloc(ip))) for ip in addresses] or [url]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def registry_entry(version: int, model: str | None = None) -> dict:
    """What the syncer lists for a replica that serves ``version``; ``model``: the LoRA adapter
    requests must name to get that version (a LoRA policy, catq/learner/lora.py), else None."""
    return {"weight_version": version, "model": model, "seen_at": time.time()}


def fresh(entries: dict[str, dict], heartbeat_s: float, now: float | None = None) -> dict[str, dict]:
    """The entries refreshed within ``REGISTRY_FRESH_BEATS`` heartbeats."""
    now = time.time() if now is None else now
    horizon = REGISTRY_FRESH_BEATS * heartbeat_s
    return {url: e for url, e in entries.items() if now - float(e.get("seen_at", 0)) < horizon}


class ReplicaPicker:
    """Which policy replica serves the next request (see the module docstring)."""

    def __init__(self, bus, static_urls: list[str], heartbeat_s: float,
                 make_client: Callable[[str], object] | None, on_new: Callable[[object], object] | None = None):
        self.bus = bus
        self.static_urls = list(static_urls)
        self.heartbeat_s = heartbeat_s
        self.make_client = make_client
        self.on_new = on_new
        """Awaited once with each new replica's client before its first request (a check)."""
        self.clients: dict[str, object] = {}
        self.outstanding: dict[str, int] = defaultdict(int)
        self.sent: dict[str, int] = defaultdict(int)
        """Requests sent to each replica so far: ties go to the least used (round-robin)."""
        self.listed: dict[str, dict] | None = None
        """The fresh registry entries at the last refresh; None while no syncer runs."""
        self._refreshed_at = -1e9

    @classmethod
    def fixed(cls, clients: list) -> ReplicaPicker:
        """Always these clients, no registry (unit tests, tools)."""
        picker = cls(None, [f"fixed:{i}" for i in range(len(clients))], 1.0, make_client=None)
        picker.clients = {f"fixed:{i}": client for i, client in enumerate(clients)}
        return picker

    async def urls(self) -> list[str]:
        """The replicas requests may go to now."""
        if self.bus is not None and time.monotonic() - self._refreshed_at >= REFRESH_S:
            self._refreshed_at = time.monotonic()
            syncer_alive = bool(await self.bus.live_workers("syncer"))
            self.listed = fresh(await self.bus.replicas(POOL), self.heartbeat_s) if syncer_alive else None
        return sorted(self.listed) if self.listed is not None else self.static_urls

    async def client(self, url: str):
        if url not in self.clients:
            client = self.make_client(url)
            if self.on_new is not None:
                try:
                    await self.on_new(client)
                except BaseException:
                    await client.close()
                    raise
            self.clients[url] = client
        return self.clients[url]

    @asynccontextmanager
    async def use(self) -> AsyncIterator[tuple[str, object]]:
        """(url, client) of the least busy replica, counted as busy until the block ends."""
        urls = await self.urls()
        if not urls:
            raise NoReplicaReady("no policy replica serves the newest weights yet (being updated?)")
        url = min(urls, key=lambda u: (self.outstanding[u], self.sent[u], urls.index(u)))
        self.outstanding[url] += 1
        self.sent[url] += 1
        try:
            yield url, await self.client(url)
        finally:
            self.outstanding[url] -= 1

    def adapter(self, url: str) -> str | None:
        """The LoRA adapter the registry lists ``url`` as serving its version with (requests name
        it as ``lora_path``); None: the engine's own weights."""
        entry = (self.listed or {}).get(url) or {}
        return entry.get("model") or None

    async def versions(self) -> list[int]:
        """The weight version of every replica requests may go to (the registry's word when
        there is one, else each engine's)."""
        from catq.engines.client import parse_version

        urls = await self.urls()
        if self.listed is not None:
            return [int(self.listed[u]["weight_version"]) for u in urls]
        return [parse_version(await (await self.client(u)).weight_version()) for u in urls]

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients.clear()
