"""The learner's training state: policy, frozen anchor, optimizer, step and version.

Synchronous and file-bound (no Redis); :mod:`catq.learner.worker` calls it from a thread.
The policy starts from ``model.policy``, or from the newest checkpoint when there is one.
``learner.objective`` picks the loss (:mod:`catq.learner.grpo`: GRPO, or CaT-SFT on the reference s,
which :meth:`Trainer.prepare` tokenizes with the policy's tokenizer). The KL
term's anchor log-probs normally arrive with each group from the anchor engine
(``learner.anchor_logprobs = "engine"``); with "learner" the anchor π0 is a second, frozen copy
loaded here from ``model.anchor`` even when both name the same weights: the policy is trained in
place, the anchor must never move.

Device: ``learner.device`` ("auto" = CUDA when present). Weights and optimizer state are fp32
everywhere; on CUDA the forward passes run under bf16 autocast.

Given :class:`catq.learner.distributed.Ranks` with world_size > 1 (torchrun), the policy is
sharded with FSDP2 and each step is data-parallel (:mod:`catq.learner.distributed`); every rank
calls :meth:`Trainer.train`, :meth:`Trainer.save_checkpoint` and :meth:`Trainer.write_weights`
alike (they gather full state dicts: collectives), and only rank 0 writes files, the same files
one process writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from catq.config import Config
from catq.learner import checkpoint, distributed, grpo, lora, publish
from catq.learner.distributed import SINGLE, Ranks


@dataclass
class Trainer:
    config: Config
    policy: torch.nn.Module
    anchor: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    state: checkpoint.TrainingState
    device: torch.device
    step_config: grpo.StepConfig
    ranks: Ranks = SINGLE

    @classmethod
    def from_config(cls, config: Config, ranks: Ranks = SINGLE) -> Trainer:
        from catq.engines.models import load_causal_lm, load_tokenizer, resolve_device

        cfg = config.learner
        cache_dir = config.model.cache_dir or None
        device = ranks.device if ranks.distributed else torch.device(resolve_device(cfg.device))
        torch.manual_seed(cfg.seed)
        policy = load_causal_lm(config.model.policy, device=str(device), cache_dir=cache_dir)
        policy.train()
        vocab_size = policy.get_input_embeddings().num_embeddings
        if cfg.lora.enabled:  # catq/learner/lora.py: only an adapter trains
            lora.refuse_sharded(ranks.distributed)
            policy = lora.wrap(policy, cfg.lora)
        policy = distributed.shard(policy, ranks)
        anchor = None
        if cfg.kl_coef > 0 and cfg.anchor_logprobs == "learner" and cfg.objective == grpo.GRPO:
            if cfg.lora.enabled:  # the base model is the policy with its adapter off
                anchor = lora.AdapterOff(policy)
            else:
                anchor = load_causal_lm(config.model.anchor, device=str(device), cache_dir=cache_dir)
                anchor.requires_grad_(False).eval()
        optimizer = grpo.make_optimizer(policy, cfg.lr, cfg.weight_decay)
        if cfg.lora.enabled:
            load_model = lambda sd: lora.load_adapter_state(policy, sd)  # noqa: E731
        else:
            load_model = lambda sd: distributed.load_full_model_state_dict(policy, sd, ranks)  # noqa: E731
        state = checkpoint.load_latest(
            config.checkpoint_dir, policy, optimizer,
            load_model=load_model,
            load_optimizer=lambda sd: distributed.load_full_optimizer_state_dict(policy, optimizer, sd, ranks),
        )
        step_config = grpo.StepConfig(
            loss=grpo.LossConfig(
                objective=cfg.objective, clip_eps=cfg.clip_eps, behaviour_weight_cap=cfg.behaviour_weight_cap, kl_coef=cfg.kl_coef
            ),
            micro_batch_rollouts=cfg.micro_batch_rollouts,
            max_grad_norm=cfg.max_grad_norm,
            autocast_bf16=device.type == "cuda",
        )
        return cls(
            config=config,
            policy=policy,
            anchor=anchor,
            tokenizer=load_tokenizer(config.model.policy, cache_dir),
            optimizer=optimizer,
            state=state or checkpoint.TrainingState(),
            device=device,
            step_config=step_config,
            ranks=ranks,
            _vocab_size=vocab_size,
        )

    _vocab_size: int | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids the policy has embeddings for (may exceed the tokenizer's length)."""
        if self._vocab_size is not None:
            return self._vocab_size
        return self.policy.get_input_embeddings().num_embeddings

    @property
    def trained_id_set(self) -> set[str]:
        """Entry ids already in these weights (cached per step)."""
        cached = getattr(self, "_trained_cache", None)
        if cached is None or cached[0] != self.state.step:
            cached = (self.state.step, set(self.state.trained_ids))
            self._trained_cache = cached
        return cached[1]

    def prepare(self, message) -> grpo.PreparedGroup:
        """One scored group checked and turned into samples for the configured objective (raises
        ValueError when it cannot be trained on: :func:`catq.learner.grpo.prepare_group`)."""
        if self.step_config.loss.objective == grpo.SFT:
            return grpo.prepare_sft_group(message, self.reference_ids(message.referenced.reference),
                                          self.vocab_size)
        return grpo.prepare_group(message, self.vocab_size)

    def reference_ids(self, reference: str) -> list[int]:
        """CaT-SFT's target: the policy's tokens of s as the assistant's whole reply (ending with
        the end-of-turn token, so the policy also learns where to stop); [] when s is blank."""
        if not reference.strip():
            return []
        return self.tokenizer.encode(reference.strip(), add_special_tokens=False) + [self.tokenizer.eos_token_id]

    def train(self, groups: list[grpo.PreparedGroup], entry_ids: list[str], should_stop=None) -> dict:
        """One optimizer step on ``groups``; records them as trained. Returns the step's metrics
        (the worker adds ``policy_version``: only it knows whether this step publishes). Raises
        :class:`grpo.StepCancelled`, with nothing changed, when ``should_stop()`` says so."""
        batch = grpo.combine(groups)
        metrics = distributed.train_step(self.policy, self.optimizer, batch, self.step_config, self.ranks,
                                         anchor=self.anchor, should_stop=should_stop)
        self.state.step += 1
        self.state.groups_trained += batch.groups_used
        self.state.add_trained(entry_ids)
        return {"step": self.state.step, "time": time.time(), **metrics}

    def snapshot(self) -> checkpoint.Snapshot | None:
        """Host copies of the policy, optimizer and training state, for :meth:`save_checkpoint`
        and :meth:`write_weights` to write while the live policy trains on; None when sharded
        (gathering the full state is a collective every rank must make in step)."""
        if self.ranks.distributed:
            return None
        if self.lora:
            return checkpoint.take_snapshot(self.policy, self.optimizer, self.state,
                                            model_state=lora.adapter_state(self.policy))
        return checkpoint.take_snapshot(self.policy, self.optimizer, self.state)

    @property
    def lora(self) -> bool:
        """A LoRA policy (``learner.lora``): checkpoints and versions hold only its adapter."""
        return self.config.learner.lora.enabled

    def save_checkpoint(self, snapshot: checkpoint.Snapshot | None = None) -> Path:
        """Write a checkpoint (of ``snapshot`` when given, else of the live state); sharded, every
        rank must call it and rank 0 writes the file (the path is returned on every rank)."""
        if snapshot is not None:
            return checkpoint.save_checkpoint(
                self.config.checkpoint_dir, None, None, snapshot.state, model_state=snapshot.model,
                optimizer_state=snapshot.optimizer, rng_state=snapshot.rng,
            )
        if self.lora:
            return checkpoint.save_checkpoint(self.config.checkpoint_dir, self.policy, self.optimizer, self.state,
                                              model_state=lora.adapter_state(self.policy))
        if not self.ranks.distributed:
            return checkpoint.save_checkpoint(
                self.config.checkpoint_dir, self.policy, self.optimizer, self.state
            )
        model_state = distributed.full_model_state_dict(self.policy, self.ranks)
        optimizer_state = distributed.full_optimizer_state_dict(self.policy, self.optimizer, self.ranks)
        if self.ranks.is_main:
            checkpoint.save_checkpoint(self.config.checkpoint_dir, self.policy, self.optimizer, self.state,
                                       model_state=model_state, optimizer_state=optimizer_state)
        torch.distributed.barrier()
        return checkpoint.checkpoint_path(self.config.checkpoint_dir, self.state.step)

    def published_weights(self, snapshot: checkpoint.Snapshot | None = None) -> dict[str, torch.Tensor]:
        """The weights of the version :meth:`write_weights` last wrote, by name (tied copies
        once), for a broadcast to the replicas; sharded, rank 0 alone has them."""
        if self.lora:
            raise NotImplementedError("a LoRA policy is published as an adapter directory, not broadcast")
        if snapshot is not None:
            return self._untied(snapshot.model)
        if not self.ranks.distributed:
            return {name: param.detach() for name, param in self.policy.named_parameters()}
        return getattr(self, "_published", {})

    def _untied(self, model_state: dict) -> dict:
        tied = distributed.tied_names(self.policy)
        return {k: v for k, v in model_state.items() if k not in tied}

    def write_weights(self, snapshot: checkpoint.Snapshot | None = None) -> Path:
        """Publish ``v<policy_version>`` (``snapshot``'s when given); sharded, every rank must
        call it and rank 0 writes. A LoRA policy's version is its adapter (PEFT's directory
        layout, no tokenizer: the engine serves the base model's)."""
        if self.lora:
            adapter = snapshot.model if snapshot is not None else lora.adapter_state(self.policy)
            version = snapshot.state.policy_version if snapshot is not None else self.state.policy_version
            return publish.write_weights(self.policy, None, self.config.weights_dir, version, state_dict=adapter)
        if snapshot is not None:
            return publish.write_weights(self.policy, self.tokenizer, self.config.weights_dir,
                                         snapshot.state.policy_version, state_dict=self._untied(snapshot.model))
        if not self.ranks.distributed:
            return publish.write_weights(
                self.policy, self.tokenizer, self.config.weights_dir, self.state.policy_version
            )
        model_state = distributed.full_model_state_dict(self.policy, self.ranks)
        if self.ranks.is_main:
            model_state = self._untied(model_state)
            publish.write_weights(self.policy, self.tokenizer, self.config.weights_dir,
                                  self.state.policy_version, state_dict=model_state)
            self._published = model_state
        torch.distributed.barrier()
        return publish.version_dir(self.config.weights_dir, self.state.policy_version)
