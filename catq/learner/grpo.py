"""GRPO on scored groups: advantages, log-probs, the clipped off-policy loss, one optimizer step.

Pure training logic (torch + a transformers causal LM); no Redis, no files. The worker
(:mod:`catq.learner.worker`) feeds it batches of ScoredGroups, turned into samples with their
advantages by :mod:`catq.learner.samples` (whose names this module re-exports).

The objective, per completion token t of rollout i in group g (DESIGN §1 step 4, §2):

    A_i      = (r_i - mean(r_g)) / (std(r_g) + eps)              group-normalised advantage
    ratio    = exp(log πθ(t) - log π_behaviour(t))                 behaviour log-prob from the engine
    w        = min(ratio, C)                                      C = behaviour_weight_cap
    obj      = min(w * A_i, clip(ratio, 1 - ε, 1 + ε) * A_i)       clipped PPO, ratio capped at C
    kl       = exp(log π_anchor - log πθ) - (log π_anchor - log πθ) - 1     (k3, ≥ 0)
    loss     = mean over all completion tokens of the batch of (-obj + kl_coef * kl)

Why the cap. Rollouts arrive up to ``max_staleness`` versions old, so π_behaviour can be far from
πθ. PPO's clip bounds the weight of positively-advantaged tokens (at 1 + ε) but leaves the
negative side unbounded: a token with A < 0 whose probability has since grown a lot gets weight
ratio → ∞ and one stale sample can dominate the step. Capping the importance weight at C bounds
every token's weight (dual-clip PPO, Ye et al. 2020; the truncated-importance-sampling idea).
In decoupled PPO (Hilton et al. 2021) terms: the learner takes one optimizer step per batch, so
the proximal policy π_prox is exactly the weights the step starts from (πθ at forward time), the
behaviour weight π_prox/π_behaviour is this same ratio, and the cap C truncates it. A capped or
clipped token contributes no policy gradient (its objective is constant in θ) but still counts
in the token mean and in ``clip_frac``; the KL term keeps its gradient everywhere.

Log-probs are log_softmax of the raw logits at each completion token given prompt + preceding
completion tokens, with no temperature and no top-p/top-k — the same distribution the engine
reports as behaviour log-probs, so at version 0 the ratio is 1 up to numerics.

Groups whose rewards are all equal have zero advantage everywhere and carry no signal: they are
skipped (no forward, no KL) and counted. A batch with no signal left takes no optimizer step.
Nor does a batch whose loss or gradient norm is NaN or infinite (:class:`NonFiniteStep`).

CaT-SFT (``learner.objective = "sft"``, the paper's SFT baseline) trains on the same groups with
another loss: one sample per group, the synthesized reference s as the completion of the prompt
the policy saw (:func:`prepare_sft_group`), and

    loss     = mean over the completion tokens of s of -log πθ(t)        (token NLL; no ratio, no KL)

Rewards play no part, so a group with all-equal rewards still trains; a group with no reference
text carries nothing and is set aside with that reason.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from catq.learner.samples import (  # noqa: F401  (re-exported: grpo.prepare_batch, grpo.TrainSample, ...)
    ADV_EPS,
    NO_REFERENCE,
    NO_SIGNAL,
    PreparedBatch,
    PreparedGroup,
    TrainSample,
    check_token_ids,
    combine,
    group_advantages,
    prepare_batch,
    prepare_group,
    prepare_sft_group,
)

GRPO, SFT = "grpo", "sft"
"""The learner's objectives (``learner.objective``)."""


@dataclass
class LossConfig:
    objective: str = GRPO
    clip_eps: float = 0.2
    behaviour_weight_cap: float = 2.0
    kl_coef: float = 1e-3


class StepCancelled(Exception):
    """The step was asked to stop between micro-batches; no update was applied."""


class NonFiniteStep(Exception):
    """The step's loss or gradient norm is NaN or infinite; no update was applied (the message
    says which)."""


# ---------------------------------------------------------------------------------------------
# Forward pass: per-token log-probs of completions


@dataclass
class MicroBatch:
    input_ids: torch.Tensor        # (B, L) right-padded prompt + completion
    attention_mask: torch.Tensor   # (B, L)
    prompt_lens: list[int]
    completion_lens: list[int]
    behaviour_logprobs: torch.Tensor  # (N,) completion tokens of all rows, concatenated
    advantages: torch.Tensor          # (N,) each row's advantage repeated over its tokens
    anchor_logprobs: torch.Tensor | None = None
    """(N,) π0's log-probs as the anchor engine gave them, NaN for rows without; None when no
    row has them."""


def collate(samples: list[TrainSample], device: torch.device | str = "cpu", pad_id: int = 0) -> MicroBatch:
    lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in samples]
    width = max(lengths)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, (s, n) in enumerate(zip(samples, lengths)):
        ids[row, :n] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.long)
        mask[row, :n] = 1
    behaviour = torch.tensor([lp for s in samples for lp in s.behaviour_logprobs], dtype=torch.float32)
    advantages = torch.tensor(
        [s.advantage for s in samples for _ in s.completion_ids], dtype=torch.float32
    )
    return MicroBatch(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        prompt_lens=[len(s.prompt_ids) for s in samples],
        completion_lens=[len(s.completion_ids) for s in samples],
        behaviour_logprobs=behaviour.to(device),
        advantages=advantages.to(device),
        anchor_logprobs=_anchor_column(samples, device),
    )


def _anchor_column(samples: list[TrainSample], device) -> torch.Tensor | None:
    if all(s.anchor_logprobs is None for s in samples):
        return None
    nan = float("nan")
    values = [lp for s in samples for lp in (s.anchor_logprobs or [nan] * len(s.completion_ids))]
    return torch.tensor(values, dtype=torch.float32).to(device)


def completion_logits(model, mb: MicroBatch) -> torch.Tensor:
    """Logits (N, V) predicting each completion token, all rows concatenated. Position p's
    logits predict token p + 1, so completion token j of a row with prompt length P is predicted
    at position P - 1 + j. One forward pass over prompt + completion."""
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    rows = [
        logits[b, p - 1 : p - 1 + c]
        for b, (p, c) in enumerate(zip(mb.prompt_lens, mb.completion_lens))
    ]
    return torch.cat(rows, dim=0)


def token_logprobs(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of each completion token, log_softmax of all logits), in fp32."""
    logp_all = F.log_softmax(logits.float(), dim=-1)
    targets = torch.cat(
        [
            mb.input_ids[b, p : p + c]
            for b, (p, c) in enumerate(zip(mb.prompt_lens, mb.completion_lens))
        ]
    )
    return logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1), logp_all


def sequence_logprobs(model, samples: list[TrainSample], device="cpu") -> list[torch.Tensor]:
    """Per-token log-probs of each sample's completion under ``model`` (no grad); for tests and
    evaluation."""
    mb = collate(samples, device)
    with torch.no_grad():
        logp, _ = token_logprobs(completion_logits(model, mb), mb)
    return list(torch.split(logp.cpu(), mb.completion_lens))


# ---------------------------------------------------------------------------------------------
# The loss


@dataclass
class LossTerms:
    """Per-token sums over a micro-batch (divide by the batch's token count for means)."""

    loss_sum: torch.Tensor  # differentiable: sum of (-obj + kl_coef * kl)
    pg_sum: float
    kl_sum: float
    clipped: int
    capped: int
    ratio_sum: float
    tokens: int
    kl_tokens: int = 0
    """Tokens with an anchor log-prob, i.e. under the KL term."""


def policy_loss(
    logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    cfg: LossConfig,
    anchor_logp: torch.Tensor | None = None,
) -> LossTerms:
    """The per-token clipped, capped objective plus the k3 KL to the anchor, summed over tokens.
    All arguments are flat (N,) tensors over completion tokens; only ``logp`` carries grad. A
    NaN in ``anchor_logp`` (a rollout the anchor engine did not score) puts that token outside
    the KL term: its KL is 0 with no gradient."""
    log_ratio = (logp - behaviour_logp).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    capped_ratio = torch.clamp(ratio, max=cfg.behaviour_weight_cap)
    unclipped = capped_ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    pg = -objective
    # A token has no policy gradient when the min picks the clipped branch with ratio outside
    # [1-ε, 1+ε], or when the cap binds.
    clip_hit = (clipped < unclipped) & ((ratio < 1.0 - cfg.clip_eps) | (ratio > 1.0 + cfg.clip_eps))
    cap_hit = (ratio > cfg.behaviour_weight_cap) & (unclipped <= clipped)
    kl_tokens = 0
    if anchor_logp is not None and cfg.kl_coef > 0:
        known = ~torch.isnan(anchor_logp)
        anchor_logp = torch.where(known, anchor_logp, logp.detach())  # delta 0: k3 and its slope are 0
        delta = (anchor_logp - logp).clamp(-20.0, 20.0)
        kl = torch.exp(delta) - delta - 1.0
        kl_tokens = int(known.sum().item())
    else:
        kl = torch.zeros_like(logp)
    total = pg + cfg.kl_coef * kl
    return LossTerms(
        loss_sum=total.sum(),
        pg_sum=pg.detach().sum().item(),
        kl_sum=kl.detach().sum().item(),
        clipped=int(clip_hit.sum().item()),
        capped=int(cap_hit.sum().item()),
        ratio_sum=ratio.detach().sum().item(),
        tokens=int(logp.numel()),
        kl_tokens=kl_tokens,
    )


def sft_loss(logp: torch.Tensor) -> LossTerms:
    """CaT-SFT's token NLL of the reference, summed over tokens (``pg_sum`` carries it; there is
    no importance ratio, reported as 1, and no KL)."""
    nll = -logp
    tokens = int(logp.numel())
    return LossTerms(loss_sum=nll.sum(), pg_sum=nll.detach().sum().item(), kl_sum=0.0, clipped=0,
                     capped=0, ratio_sum=float(tokens), tokens=tokens)


def micro_batch_loss(logp: torch.Tensor, mb: MicroBatch, cfg: LossConfig, anchor_logp: torch.Tensor | None) -> LossTerms:
    """The configured objective's loss terms for one micro-batch."""
    if cfg.objective == SFT:
        return sft_loss(logp)
    return policy_loss(logp, mb.behaviour_logprobs, mb.advantages, cfg, anchor_logp)


def entropy_sum(logp_all: torch.Tensor) -> float:
    """Sum over tokens of the policy's entropy at each completion position."""
    with torch.no_grad():
        return float(-(logp_all.exp() * logp_all).sum().item())


# ---------------------------------------------------------------------------------------------
# One optimizer step


@dataclass
class StepConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    micro_batch_rollouts: int = 8
    max_grad_norm: float = 1.0
    autocast_bf16: bool = False
    """CUDA: run forwards under bf16 autocast (params, grads and optimizer stay fp32)."""


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    policy,
    optimizer: torch.optim.Optimizer,
    batch: PreparedBatch,
    cfg: StepConfig,
    anchor=None,
    should_stop=None,
    *,
    total_tokens: int | None = None,
    micro_batches: list[list[TrainSample]] | None = None,
    reduce_sums=None,
) -> dict:
    """One optimizer step (GRPO, or CaT-SFT with ``cfg.loss.objective = "sft"``) over ``batch`` with gradient accumulation over micro-batches of
    ``cfg.micro_batch_rollouts`` rollouts. ``should_stop()`` is asked before each micro-batch:
    when it says yes the gradients are dropped and :class:`StepCancelled` is raised (a stopping
    learner does not wait for a long step; its groups stay pending and are trained later). A
    loss or gradient norm that is not finite raises :class:`NonFiniteStep` before the optimizer
    moves: weights and optimizer state stay as they were. The loss is the mean over every
    completion token of the batch, so accumulation gives exactly the full-batch gradient. Returns step metrics;
    takes no step (``"updated": False``, with ``kl`` and ``clip_frac`` 0.0 so every step's
    metrics carry them) when no sample carries signal.

    Data parallelism (:mod:`catq.learner.distributed`) uses three hooks; left out, the step is
    the single-process one. ``total_tokens``: the token count of the whole batch across ranks
    (each rank's loss is its own token sum over it, so the gradients summed over ranks are the
    single-process gradient). ``micro_batches``: this rank's share of ``batch.samples`` already cut
    into micro-batches, the same number on every rank; an empty one runs a forward and backward
    that contribute nothing (a rank's collectives must match its peers'). ``reduce_sums(sums)``:
    the metric sums added up over ranks, before the non-finite check and the metrics."""
    started = time.perf_counter()
    metrics = _reward_metrics(batch)
    samples = batch.samples
    local_tokens = sum(len(s.completion_ids) for s in samples)
    if total_tokens is None:
        total_tokens = local_tokens
    if total_tokens == 0:
        return {**metrics, "updated": False, "kl": 0.0, "kl_coverage": 0.0, "clip_frac": 0.0, "tokens": 0,
                "step_time_s": time.perf_counter() - started}
    if micro_batches is None:
        micro_batches = [samples[i : i + cfg.micro_batch_rollouts]
                         for i in range(0, len(samples), cfg.micro_batch_rollouts)]
    device = next(policy.parameters()).device
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    sums = {"pg": 0.0, "kl": 0.0, "clipped": 0, "capped": 0, "ratio": 0.0, "entropy": 0.0, "kl_tokens": 0}
    done = 0
    for chunk in micro_batches:
        if should_stop is not None and should_stop():
            optimizer.zero_grad(set_to_none=True)
            raise StepCancelled(f"stopped after {done} of {len(samples)} rollouts")
        if not chunk:
            _idle_pass(policy, device, cfg)
            continue
        done += len(chunk)
        mb = collate(chunk, device)
        anchor_logp = mb.anchor_logprobs  # from the anchor engine, when it supplied them
        if anchor is not None and cfg.loss.kl_coef > 0 and cfg.loss.objective == GRPO:
            with torch.no_grad(), _autocast(device, cfg.autocast_bf16):
                anchor_logp, _ = token_logprobs(completion_logits(anchor, mb), mb)
        with _autocast(device, cfg.autocast_bf16):
            logits = completion_logits(policy, mb)
        logp, logp_all = token_logprobs(logits, mb)
        terms = micro_batch_loss(logp, mb, cfg.loss, anchor_logp)
        (terms.loss_sum / total_tokens).backward()
        sums["entropy"] += entropy_sum(logp_all)
        del logits, logp_all
        for key, value in (("pg", terms.pg_sum), ("kl", terms.kl_sum), ("clipped", terms.clipped),
                           ("capped", terms.capped), ("ratio", terms.ratio_sum), ("kl_tokens", terms.kl_tokens)):
            sums[key] += value
    if reduce_sums is not None:
        sums = reduce_sums(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # sharded (DTensor) parameters: the global norm
        grad_norm = grad_norm.full_tensor()
    _refuse_nonfinite(sums, float(grad_norm), total_tokens, cfg.loss.kl_coef, optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    pg, kl = sums["pg"] / total_tokens, sums["kl"] / total_tokens
    return {
        **metrics,
        "updated": True,
        "loss": pg + cfg.loss.kl_coef * kl,
        "pg_loss": pg,
        "kl": kl,
        "kl_coverage": sums["kl_tokens"] / total_tokens,
        "clip_frac": (sums["clipped"] + sums["capped"]) / total_tokens,
        "cap_frac": sums["capped"] / total_tokens,
        "ratio_mean": sums["ratio"] / total_tokens,
        "entropy": sums["entropy"] / total_tokens,
        "grad_norm": float(grad_norm),
        "tokens": total_tokens,
        "rollouts": len(samples),
        "step_time_s": elapsed,
        "tokens_per_s": total_tokens / elapsed if elapsed > 0 else math.inf,
    }


def _idle_pass(policy, device, cfg: StepConfig) -> None:
    """A forward and backward that add nothing to any gradient: for a rank with no samples left
    in this micro-batch, whose sharded model must still take part in its peers' collectives."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    with _autocast(device, cfg.autocast_bf16):
        logits = policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    (logits.float().sum() * 0.0).backward()


def _refuse_nonfinite(sums: dict, grad_norm: float, tokens: int, kl_coef: float, optimizer) -> None:
    """Raise :class:`NonFiniteStep` (gradients dropped) rather than let one NaN or inf, from a
    bad behaviour log-prob or reward, poison the weights and the optimizer's moments for good."""
    loss = (sums["pg"] + kl_coef * sums["kl"]) / tokens
    reason = ("non-finite loss" if not math.isfinite(loss)
              else "non-finite gradient norm" if not math.isfinite(grad_norm) else None)
    if reason is not None:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteStep(reason)


def _reward_metrics(batch: PreparedBatch) -> dict:
    rewards = torch.tensor(batch.rewards or [0.0], dtype=torch.float64)
    adv = torch.tensor([s.advantage for s in batch.samples] or [0.0], dtype=torch.float64)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "adv_mean": adv.mean().item(),
        "adv_std": adv.std(unbiased=False).item(),
        "adv_min": adv.min().item(),
        "adv_max": adv.max().item(),
        "groups_used": batch.groups_used,
        "groups_skipped": batch.groups_skipped,
    }


def make_optimizer(model, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )
