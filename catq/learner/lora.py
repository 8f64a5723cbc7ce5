"""A LoRA policy in the learner (``[learner.lora] enabled = true``): only an adapter trains.

:func:`wrap` puts a PEFT LoRA adapter (rank, alpha, dropout, target modules from the config)
on the policy; every base weight is frozen, so the optimizer (:func:`catq.learner.grpo.make_optimizer`
takes the parameters that require grad) holds only the adapter and its AdamW moments.

- **Checkpoints** hold the adapter's tensors (:func:`adapter_state`: the ``lora_`` entries of the
  model's state dict, under their full names) and the optimizer's state, with the step, version,
  RNGs and trained ids as for a full policy (:mod:`catq.learner.checkpoint`); :func:`load_adapter_state`
  restores them exactly, refusing a checkpoint whose adapter does not fit (a full-weights one, or
  another rank or target set).
- **Publishing** writes each version as a PEFT adapter directory ``weights/v<N>/``
  (``adapter_config.json`` + ``adapter_model.safetensors``) with :func:`catq.learner.publish.write_weights`,
  so it is as atomic and fsynced as a full version. SGLang and catq's engine load it with
  ``POST /load_lora_adapter``; the syncer does (catq/learner/syncer.py).
- **The KL anchor** is the base model, i.e. the policy with its adapter off: with
  ``learner.anchor_logprobs = "learner"`` the learner runs :class:`AdapterOff` (the same model under
  peft's ``disable_adapter()``) instead of loading a second copy; with "engine" the anchor engine
  serves the base model, as it does for a full policy.

A sharded (FSDP, torchrun) learner is refused with a ConfigError until that combination is tested.
"""

from __future__ import annotations

import torch

from catq.config import ConfigError, LoraConfig

LORA_KEY = "lora_"
"""What every adapter tensor's state-dict name contains (``...q_proj.lora_A.default.weight``)."""


def refuse_sharded(distributed: bool) -> None:
    if distributed:
        raise ConfigError("learner.lora is not supported with a sharded learner (FSDP under torchrun, "
                          "world size > 1) yet: run the LoRA learner as one process")


def peft_config(settings: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def wrap(policy: torch.nn.Module, settings: LoraConfig):
    """The policy with a fresh LoRA adapter (B = 0, so it starts as the base model); only the
    adapter requires grad."""
    from peft import get_peft_model

    model = get_peft_model(policy, peft_config(settings))
    for name, param in model.named_parameters():
        param.requires_grad_(LORA_KEY in name)
    return model


def is_lora(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors by their full state-dict names (what a checkpoint holds)."""
    return {name: tensor for name, tensor in model.state_dict().items() if LORA_KEY in name}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    """Restore the adapter from :func:`adapter_state`'s dict; ValueError, with nothing changed,
    when it does not fit this adapter (other names, or other shapes)."""
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the checkpoint's weights do not fit this LoRA adapter: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (a full-weights checkpoint, or another "
                         "learner.lora rank or target set?)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != the adapter's {tuple(expected[name].shape)} "
                             "(another learner.lora rank?)")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor.to(expected[name].dtype))


class AdapterOff(torch.nn.Module):
    """The base model as the KL anchor: calls run the policy with its adapter disabled (peft's
    ``disable_adapter()``), so no second model is held. Not a submodule of anything trained;
    its calls run under ``no_grad`` in the step (catq/learner/grpo.py)."""

    def __init__(self, policy):
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not registered: its parameters are the policy's

    def forward(self, *args, **kwargs):
        with self.policy.disable_adapter():
            return self.policy(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)


def merged_copy(model):
    """(tests) A plain model with the adapter merged into its base weights: W + (alpha/r) B A."""
    import copy

    return copy.deepcopy(model).merge_and_unload()
