"""The fast path for new weights: the learner broadcasts them to every policy replica over a
process group (``[learner] weight_sync = "distributed"``), before it announces the version.

Each replica (catq's engine or SGLang) joins a group with the learner as rank 0
(``/init_weights_update_group``, :mod:`catq.engines.weight_group`); each version is then one
``/update_weights_from_distributed`` per replica, answered once the replica has received every
tensor of the learner's broadcasts and loaded them — no disk read on the replicas, and on GPUs
the weights go device to device over NCCL (gloo runs the same protocol on CPU).

Disk stays the default and the fallback: the version directory is written before the
broadcast, and a replica the broadcast missed (it failed or timed out, the replica joined later
or restarted) is brought to the newest version from disk by the syncer, as without a broadcast.
The syncer then finds the replicas the broadcast reached already on the version and leaves them
alone. A failed broadcast closes the group; the next version opens a new one, as does a change
in the set of replicas (a group has a fixed size).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
import torch

from catq.engines import weight_group
from catq.engines.replicas import discover


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def address_towards(url: str) -> str:
    """This host's address on the interface that reaches ``url``'s host (no packet is sent)."""
    host = urlsplit(url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((socket.gethostbyname(host), 9))
        return sock.getsockname()[0]


@dataclass
class WeightBroadcaster:
    policy_urls: list[str]
    make_client: Callable[[str], object]
    """Builds an EngineClient for a replica URL."""
    log: structlog.BoundLogger
    backend: str = "nccl"
    address: str = ""
    """Where the replicas reach the learner; "" = this host's address towards the first replica."""
    port: int = 0
    """The group's rendezvous port; 0 = a free one, chosen for each group."""
    timeout_s: float = 120.0
    resolve_replicas: bool = True
    group_name: str = weight_group.DEFAULT_GROUP
    device: str = "cpu"
    """Where the learner's side of the broadcast lives (nccl: the learner's GPU)."""
    _group: object = None
    _members: list[str] = field(default_factory=list)
    _clients: dict = field(default_factory=dict)

    async def push(self, weights: dict[str, torch.Tensor], version: int) -> list[str]:
        """Broadcast ``weights`` as ``version``; returns the replicas that now serve it (none when
        the broadcast failed: they stay for the syncer to load from disk)."""
        urls = await discover(self.policy_urls, self.resolve_replicas)
        if not urls:
            return []
        try:
            if urls != self._members or self._group is None:
                await self._open(urls)
            await self._send(weights, version)
        except Exception as exc:  # any failure: disk is the fallback, the learner goes on
            self.log.warning("weight broadcast failed; the syncer loads this version from disk",
                             version=version, replicas=urls, error=str(exc) or type(exc).__name__)
            await self.close()
            return []
        self.log.info("weights broadcast", version=version, replicas=urls, tensors=len(weights))
        return urls

    async def _open(self, urls: list[str]) -> None:
        """A new group: this process as rank 0, replica i as rank i + 1."""
        await self.close()
        address = self.address or address_towards(urls[0])
        port = self.port or free_port()
        hosting = asyncio.ensure_future(asyncio.to_thread(
            weight_group.open_group, backend=self.backend, master_address=address, master_port=port,
            rank=0, world_size=len(urls) + 1, group_name=self.group_name, timeout_s=self.timeout_s))
        joins = [self._client(url).init_weights_update_group(
            master_address=address, master_port=port, rank_offset=rank, world_size=len(urls) + 1,
            group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s + 10)
            for rank, url in enumerate(urls, start=1)]
        try:
            await asyncio.gather(*joins)
        except BaseException:
            # A refused join leaves rank 0 waiting in its thread until timeout_s: let it, close
            # the group should it form after all, and never leave its error unread.
            hosting.add_done_callback(_close_when_formed)
            raise
        self._group = await hosting
        self._members = list(urls)

    async def _send(self, weights: dict[str, torch.Tensor], version: int) -> None:
        names = list(weights)
        tensors = [weights[name].detach().to(self.device) for name in names]
        request = {"names": names, "dtypes": [weight_group.dtype_name(t.dtype) for t in tensors],
                   "shapes": [list(t.shape) for t in tensors]}
        sending = asyncio.to_thread(weight_group.send, self._group, tensors)
        updates = [self._client(url).update_weights_from_distributed(
            **request, group_name=self.group_name, weight_version=str(version), timeout_s=self.timeout_s + 10)
            for url in self._members]
        results = await asyncio.gather(sending, *updates, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    def _client(self, url: str):
        if url not in self._clients:
            self._clients[url] = self.make_client(url)
        return self._clients[url]

    async def close(self) -> None:
        """Leave the group on both sides (best effort: a replica may be gone)."""
        group, members, self._group, self._members = self._group, self._members, None, []
        if group is None:
            return
        await asyncio.gather(*(self._client(url).destroy_weights_update_group(self.group_name, timeout_s=10)
                               for url in members), return_exceptions=True)
        await asyncio.to_thread(weight_group.close_group, group)

    async def aclose(self) -> None:
        await self.close()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()


def _close_when_formed(future: asyncio.Future) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    weight_group.close_group(future.result())
