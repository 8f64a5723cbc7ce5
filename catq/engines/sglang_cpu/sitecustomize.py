"""Pinned host memory as a no-op, for real SGLang on a CPU WITHOUT a GPU (TEST AND CPU-ONLY).

Python imports ``sitecustomize`` at start-up from the first directory on ``sys.path`` that has
one; ``catq.engines.sglang_env`` puts this directory first on PYTHONPATH of an SGLang server that
catq itself starts with ``device = "cpu"``, so this runs in that server's processes only.

Why: SGLang 0.5.23's LoRA layers and its ``torch_native`` LoRA backend pin host memory
unconditionally (``torch.tensor(..., pin_memory=True)``, ``tensor.pin_memory()`` in
``srt/lora/layers.py``, ``lora.py``, ``backend/torch_backend.py``). The CUDA torch build SGLang
needs (catq/engines/sglang_env.py) then raises "Found no NVIDIA driver on your system" on a host
without one, so ``--enable-lora`` kills the server at start-up whatever ``--lora-backend`` is.
Pinning only speeds host-to-GPU copies; with no GPU there are none, so returning ordinary
memory changes no result.
"""

from __future__ import annotations

import functools

FACTORIES = ("tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange",
             "empty_like", "zeros_like", "ones_like", "full_like")


def _unpinned(factory):
    @functools.wraps(factory)
    def make(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return factory(*args, **kwargs)

    return make


def _pin_memory_as_no_op() -> None:
    try:
        import torch
    except ImportError:  # not SGLang's interpreter: nothing to do
        return
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    for name in FACTORIES:
        setattr(torch, name, _unpinned(getattr(torch, name)))


_pin_memory_as_no_op()
