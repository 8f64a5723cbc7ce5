"""Scored groups turned into training samples: group-normalised advantages, the checks a group
must pass before a forward pass (lengths, token ids inside the vocabulary), CaT-SFT's one sample
per group, and batches of prepared groups.

Pure logic on messages and lists (torch only for the advantage arithmetic); the loss and the
optimizer step that consume these are in :mod:`catq.learner.grpo`, which re-exports every name
here (``grpo.prepare_batch`` and friends are what callers use).

Groups whose rewards are all equal have zero advantage everywhere and carry no signal: they are
counted, not trained on (:data:`NO_SIGNAL`); a CaT-SFT group with no reference text is set aside
with :data:`NO_REFERENCE`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from catq.messages import ScoredGroup

ADV_EPS = 1e-6
"""ε in (r - mean) / (std + ε); groups with std below this count as zero-variance."""

NO_SIGNAL = "no signal: every answer got the same reward"
NO_REFERENCE = "no reference: the anchor gave no text to fine-tune on"

@dataclass
class TrainSample:
    """One rollout ready for the loss: prompt + completion ids, behaviour log-probs, advantage."""

    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: list[float]
    advantage: float
    policy_version: int = 0
    anchor_logprobs: list[float] | None = None
    """π0's log-prob of each completion token when the anchor engine supplied them."""


@dataclass
class PreparedBatch:
    samples: list[TrainSample]
    rewards: list[float] = field(default_factory=list)
    """Rewards of every rollout of every group given (zero-variance groups included)."""
    groups_used: int = 0
    groups_skipped: int = 0
    """Zero-variance groups: all rewards equal, no signal."""


def group_advantages(rewards: list[float], eps: float = ADV_EPS) -> list[float] | None:
    """(r - mean) / (std + eps) within one group (population std); None when all rewards are
    equal (the group carries no signal)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    std = r.std(unbiased=False).item() if len(rewards) > 1 else 0.0
    if std < eps:
        return None
    return ((r - r.mean()) / (std + eps)).tolist()


@dataclass
class PreparedGroup:
    """One scored group checked and turned into training samples (empty without signal)."""

    samples: list[TrainSample]
    rewards: list[float]
    has_signal: bool
    why: str = NO_SIGNAL
    """Why it carries no signal (when it does not)."""


def prepare_group(scored: ScoredGroup, vocab_size: int | None = None) -> PreparedGroup:
    """Check one scored group and compute its samples and advantages, once. Raises ValueError
    when it cannot be trained on (mismatched lengths, a token id outside ``[0, vocab_size)``).
    Rollouts with no tokens are left out."""
    group = scored.group
    if vocab_size is not None:
        check_token_ids(scored, vocab_size)
    if len(scored.rewards) != len(group.rollouts):
        raise ValueError(f"group {group.prompt.prompt_id}: {len(scored.rewards)} rewards for "
                         f"{len(group.rollouts)} rollouts")
    advantages = group_advantages(scored.rewards)
    if advantages is None:
        return PreparedGroup([], list(scored.rewards), has_signal=False)
    samples = []
    for rollout, adv in zip(group.rollouts, advantages):
        if not rollout.token_ids:
            continue
        if len(rollout.logprobs) != len(rollout.token_ids):
            raise ValueError(f"group {group.prompt.prompt_id}: {len(rollout.logprobs)} behaviour "
                             f"log-probs for {len(rollout.token_ids)} tokens")
        anchor = rollout.anchor_logprobs
        if anchor is not None and len(anchor) != len(rollout.token_ids):
            raise ValueError(f"group {group.prompt.prompt_id}: {len(anchor)} anchor log-probs for "
                             f"{len(rollout.token_ids)} tokens")
        samples.append(TrainSample(
            prompt_ids=list(group.prompt_token_ids),
            completion_ids=list(rollout.token_ids),
            behaviour_logprobs=list(rollout.logprobs),
            advantage=float(adv),
            policy_version=group.policy_version,
            anchor_logprobs=None if anchor is None else list(anchor),
        ))
    return PreparedGroup(samples, list(scored.rewards), has_signal=True)


def prepare_sft_group(scored: ScoredGroup, reference_ids: list[int], vocab_size: int | None = None) -> PreparedGroup:
    """CaT-SFT: one sample per group, the reference s (``reference_ids``, the policy's tokens of
    it) after the group's prompt. Empty ``reference_ids``: no signal (``why`` says so). Raises
    ValueError for a token id outside ``[0, vocab_size)``, prompt or reference."""
    group = scored.group
    rewards = list(scored.rewards)
    if not reference_ids:
        return PreparedGroup([], rewards, has_signal=False, why=NO_REFERENCE)
    if vocab_size is not None:
        bad = next((t for t in itertools.chain(group.prompt_token_ids, reference_ids)
                    if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"group {group.prompt.prompt_id}: token id {bad} is outside the model's "
                             f"vocabulary [0, {vocab_size})")
    sample = TrainSample(prompt_ids=list(group.prompt_token_ids), completion_ids=list(reference_ids),
                         behaviour_logprobs=[0.0] * len(reference_ids),  # unused: SFT has no ratio
                         advantage=1.0, policy_version=group.policy_version)
    return PreparedGroup([sample], rewards, has_signal=True)


def check_token_ids(scored: ScoredGroup, vocab_size: int) -> None:
    """Raise ValueError naming the first token id (prompt or completion) the model has no
    embedding for: the forward pass would fail on it, on every retry."""
    group = scored.group
    ids = itertools.chain(group.prompt_token_ids, *(r.token_ids for r in group.rollouts))
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"group {group.prompt.prompt_id}: token id {bad} is outside the model's "
                         f"vocabulary [0, {vocab_size})")


def combine(groups: list[PreparedGroup]) -> PreparedBatch:
    """One batch of prepared groups; zero-variance groups are counted, not trained on."""
    batch = PreparedBatch(samples=[])
    for group in groups:
        batch.rewards.extend(group.rewards)
        batch.samples.extend(group.samples)
        batch.groups_used += group.has_signal
        batch.groups_skipped += not group.has_signal
    return batch


def prepare_batch(groups: list[ScoredGroup]) -> PreparedBatch:
    """Turn scored groups into training samples; zero-variance groups are skipped and counted."""
    return combine([prepare_group(g) for g in groups])
