"""A LoRA policy in the learner (catq/learner/lora.py): a real Trainer on a tiny random model,
files only (no Redis)."""

from __future__ import annotations

import json

import pytest
import torch

from catq.config import ConfigError, LoraConfig, load_config
from catq.learner import checkpoint, grpo, lora, publish
from catq.learner.trainer import Trainer
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.integration.test_learner_restart import make_scored

LORA = {"enabled": True, "rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


def make_trainer(tmp_path, model_path, lora_settings=LORA, **learner) -> Trainer:
    config = load_config(None, run="unit")
    config.run_dir = str(tmp_path)
    config.model = config.model.model_copy(update={"policy": str(model_path), "anchor": str(model_path)})
    config.learner = config.learner.model_copy(update={
        "device": "cpu", "lr": 1e-2, "batch_groups": 2, "micro_batch_rollouts": 4,
        "lora": LoraConfig(**lora_settings), **learner,
    })
    return Trainer.from_config(config)


def groups(trainer: Trainer, seed: int = 0) -> list[grpo.PreparedGroup]:
    return [trainer.prepare(make_scored(i, [1.0, 0.0, 0.5], seed=seed)) for i in range(2)]


def test_config_lora_is_off_by_default_and_checked(tmp_path):
    assert load_config(None).learner.lora.enabled is False
    path = tmp_path / "c.toml"
    path.write_text('[learner.lora]\nenabled = true\ntarget_modules = ["lm_head"]\n')
    with pytest.raises(ConfigError, match="target_modules"):
        load_config(path)
    path.write_text('[learner]\nweight_sync = "distributed"\n[learner.lora]\nenabled = true\n')
    with pytest.raises(ConfigError, match="weight_sync"):
        load_config(path)
    path.write_text('[learner.lora]\nenabled = true\nrank = 16\n')
    assert load_config(path).learner.lora.rank == 16


def test_lora_refuses_a_sharded_learner():
    with pytest.raises(ConfigError, match="FSDP"):
        lora.refuse_sharded(True)
    lora.refuse_sharded(False)


def test_a_lora_step_changes_only_adapter_parameters(tmp_path, tiny_model_path):  # noqa: F811
    trainer = make_trainer(tmp_path, tiny_model_path)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainable = {n for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all(lora.LORA_KEY in n for n in trainable)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)
    metrics = trainer.train(groups(trainer), ["1-0", "2-0"])
    assert metrics["updated"]
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B starts at 0: the adapter now does something


def test_kl_with_the_adapter_off_equals_kl_against_a_separately_loaded_base(tmp_path, tiny_model_path):  # noqa: F811
    """The anchor of a LoRA learner (anchor_logprobs = "learner") is its own base, adapter off:
    the same log-probs, hence the same KL and loss, as a second, separately loaded base model."""
    from catq.engines.models import load_causal_lm

    trainer = make_trainer(tmp_path, tiny_model_path, anchor_logprobs="learner", kl_coef=0.5)
    assert isinstance(trainer.anchor, lora.AdapterOff)
    trainer.train(groups(trainer), ["1-0", "2-0"])  # the adapter moves away from the base
    base = load_causal_lm(str(tiny_model_path))
    batch = grpo.combine(groups(trainer, seed=1))
    off = grpo.sequence_logprobs(trainer.anchor, batch.samples)
    separate = grpo.sequence_logprobs(base, batch.samples)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(off, separate))
    policy = grpo.sequence_logprobs(trainer.policy, batch.samples)
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(policy, separate))

    # One step's KL against each anchor: identical (same weights, same batch, same RNG).
    state = {n: t.clone() for n, t in lora.adapter_state(trainer.policy).items()}
    opt_state = trainer.optimizer.state_dict()
    kl = []
    for anchor in (trainer.anchor, base):
        lora.load_adapter_state(trainer.policy, state)
        trainer.optimizer.load_state_dict(opt_state)
        torch.manual_seed(0)
        metrics = grpo.train_step(trainer.policy, trainer.optimizer, batch, trainer.step_config, anchor=anchor)
        kl.append(metrics["kl"])
    assert kl[0] > 0 and kl[0] == pytest.approx(kl[1], rel=1e-6, abs=1e-9)


def test_adapter_save_load_round_trip_and_exact_resume(tmp_path, tiny_model_path):  # noqa: F811
    from peft import PeftModel
    from safetensors.torch import load_file

    from catq.engines.models import load_causal_lm

    trainer = make_trainer(tmp_path, tiny_model_path)
    trainer.train(groups(trainer), ["1-0", "2-0"])
    trainer.state.policy_version = 1
    path = trainer.write_weights()
    assert path == tmp_path / "weights" / "v1"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in path.iterdir()}
    assert not any(p.name.endswith(".safetensors") and p.name.startswith("model") for p in path.iterdir())
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(tiny_model_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)

    # The published adapter on a fresh base is the trained policy.
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(tiny_model_path)), str(path))
    samples = grpo.combine(groups(trainer, seed=2)).samples
    for a, b in zip(grpo.sequence_logprobs(trainer.policy, samples), grpo.sequence_logprobs(reloaded, samples)):
        assert torch.allclose(a, b, atol=1e-6)

    # A checkpoint holds the adapter and its optimizer state only; resuming is exact.
    saved = trainer.save_checkpoint()
    payload = torch.load(saved, weights_only=True)
    assert payload["model"].keys() == lora.adapter_state(trainer.policy).keys()
    resumed = make_trainer(tmp_path, tiny_model_path)
    assert resumed.state.step == 1 and resumed.state.policy_version == 1
    for name, tensor in lora.adapter_state(trainer.policy).items():
        assert torch.equal(tensor, lora.adapter_state(resumed.policy)[name])
    torch.manual_seed(5)
    a = trainer.train(groups(trainer, seed=3), ["3-0", "4-0"])
    torch.manual_seed(5)
    b = resumed.train(groups(resumed, seed=3), ["3-0", "4-0"])
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    for name, tensor in lora.adapter_state(trainer.policy).items():
        assert torch.allclose(tensor, lora.adapter_state(resumed.policy)[name], atol=1e-7)


def test_background_snapshot_publishes_and_checkpoints_the_adapter(tmp_path, tiny_model_path):  # noqa: F811
    trainer = make_trainer(tmp_path, tiny_model_path)
    trainer.train(groups(trainer), ["1-0", "2-0"])
    trainer.state.policy_version = 2
    snapshot = trainer.snapshot()
    assert snapshot.model.keys() == lora.adapter_state(trainer.policy).keys()
    trainer.train(groups(trainer, seed=4), ["5-0", "6-0"])  # the live adapter moves on
    path = trainer.write_weights(snapshot)
    assert publish.version_of_dir(path, tmp_path / "weights") == 2
    trainer.save_checkpoint(snapshot)
    restored = make_trainer(tmp_path / "other", tiny_model_path)
    state = checkpoint.load_latest(tmp_path / "checkpoints", restored.policy, restored.optimizer,
                                   load_model=lambda sd: lora.load_adapter_state(restored.policy, sd))
    assert state.step == 1
    for name, tensor in snapshot.model.items():
        assert torch.equal(tensor, lora.adapter_state(restored.policy)[name])


def test_a_full_weights_checkpoint_is_refused_by_a_lora_learner(tmp_path, tiny_model_path):  # noqa: F811
    full = make_trainer(tmp_path, tiny_model_path, lora_settings={"enabled": False})
    full.save_checkpoint()
    with pytest.raises(ValueError, match="do not fit this LoRA adapter"):
        make_trainer(tmp_path, tiny_model_path)
