"""A pure-torch stand-in for SGLang's ``sgl_kernel``, for real SGLang on a CPU WITHOUT a GPU.

TEST AND CPU-ONLY. PyPI publishes ``sgl_kernel`` only as CUDA builds, which fail to import
without ``libcuda.so.1``. SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu``)
imports two ops from it at module level; everything else it needs falls back to native torch
when the CPU has no AMX. ``catq.engines.sglang_env`` puts this directory first on PYTHONPATH of
an SGLang server that catq itself starts with ``device = "cpu"`` — never on a GPU host, where
the real package must be used.

Semantics follow SGLang 0.5.23's triton kernels that these replace
(``srt/mem_cache/allocation.py: assign_req_to_token_pool`` and
``kernels/ops/kvcache/cache_move.py: copy_all_layer_kv_cache_tiled``). Any other op raises
NotImplementedError naming itself, so a code path that needs a real kernel fails loudly.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+catq.cpu.standin"


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """For request i: req_to_token[req_pool_indices[i], start[i]:end[i]] = the next
    end[i] - start[i] entries of out_cache_loc (requests' slices are laid out in order)."""
    offset = 0
    rows = req_pool_indices.tolist()
    for row, start, end in zip(rows, start_offset.tolist(), end_offset.tolist(), strict=True):
        count = end - start
        if count <= 0:
            continue
        req_to_token[row, start:end] = out_cache_loc[offset:offset + count].to(req_to_token.dtype)
        offset += count


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """In every buffer b (base address data_ptrs[b], rows of strides[b] bytes), copy row
    src_loc[j] to row tgt_loc[j]. All source rows are read before any is written, so it is safe
    when the two sets of rows overlap (as the tiled kernel is)."""
    sources, targets = src_loc.tolist(), tgt_loc.tolist()
    for base, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        rows = [ctypes.string_at(base + s * stride, stride) for s in sources]
        for target, row in zip(targets, rows, strict=True):
            ctypes.memmove(base + target * stride, row, stride)


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not in catq's CPU stand-in (catq/engines/sglang_cpu); "
            "this SGLang code path needs the real CUDA sgl_kernel"
        )

    missing.__name__ = name
    return missing
