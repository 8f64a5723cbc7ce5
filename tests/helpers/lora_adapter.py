"""PEFT LoRA adapters for tests: random, non-zero A and B, saved as PEFT saves them.

    from tests.helpers.lora_adapter import make_adapter

    peft_model = make_adapter(base_model, weights_dir / "v3", rank=8, targets=("q_proj", "v_proj"))
    merged = peft_model.merge_and_unload().eval()   # the model the served adapter must equal
"""

from __future__ import annotations

import copy

import torch


def make_adapter(base, out, *, rank=8, targets=("q_proj", "v_proj"), seed=0, base_name=None, b_scale=0.05):
    """A PEFT adapter on a copy of ``base`` with random A and B (B scaled by ``b_scale``: how far
    the adapter moves the model) saved to ``out``; returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                           init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(b_scale)
    if base_name is not None:
        model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(str(out))
    return model
