"""Weights over a process group: SGLang's ``/init_weights_update_group`` and
``/update_weights_from_distributed`` protocol (0.5.x), the sending and the receiving side.

The trainer is rank 0 of a group of its own; each engine joins as rank ``rank_offset`` (catq's
engine and a tensor-parallel-1 SGLang engine each take one rank). The rendezvous is SGLang's
(``init_custom_process_group`` in sglang/srt/utils): a TCPStore at ``master_address:master_port``
hosted by rank 0, keys prefixed with the group's name, then torch's own group construction — so
a trainer built on this module joins a real SGLang engine's group, and catq's engine joins a
trainer written for SGLang. Each update is one broadcast per tensor from rank 0, in the order of
the request's ``names``. NCCL on GPUs; gloo runs the same protocol on CPU (tests).

The group is separate from any default process group (a learner under torchrun has one for
FSDP), hence torch's private ``_new_process_group_helper``, as SGLang and every RL trainer that
speaks this protocol use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_GROUP = "weight_update_group"


def open_group(*, backend: str, master_address: str, master_port: int, rank: int, world_size: int,
               group_name: str = DEFAULT_GROUP, timeout_s: float = 120.0):
    """Join (rank 0: host) the group; blocks until all ``world_size`` ranks have joined."""
    from torch.distributed.distributed_c10d import (
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                              timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], backend, PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}  # group rank == rank
    return group


def close_group(group) -> None:
    dist.destroy_process_group(group)


def dtype_name(dtype: torch.dtype) -> str:
    """The request's spelling: "bfloat16", as SGLang reads it with ``getattr(torch, name)``."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def send(group, tensors: Iterable[torch.Tensor]) -> None:
    """Rank 0: broadcast each tensor, in order."""
    for tensor in tensors:
        dist.broadcast(tensor.contiguous(), src=0, group=group)


def receive(group, dtypes: list[str], shapes: list[list[int]], device: str | torch.device) -> list[torch.Tensor]:
    """Any other rank: one fresh tensor per (dtype, shape), filled by rank 0's broadcasts."""
    received = []
    for dtype, shape in zip(dtypes, shapes):
        tensor = torch.empty(shape, dtype=torch_dtype(dtype), device=device)
        dist.broadcast(tensor, src=0, group=group)
        received.append(tensor)
    return received
