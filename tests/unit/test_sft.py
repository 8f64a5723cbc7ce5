"""CaT-SFT (learner.objective = "sft"): the loss is the mean token NLL of the reference s after the
prompt, on a tiny random Llama (seconds, no files), compared with a manual forward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catq.config import load_config
from catq.learner import grpo
from catq.learner.grpo import LossConfig, StepConfig
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)
from tests.unit.test_grpo import VOCAB, scored_group, tiny_model
from tests.unit.test_learner_metrics import delivery, lines, make_loop

SFT = StepConfig(loss=LossConfig(objective="sft"), micro_batch_rollouts=1)


def manual_nll(model, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Mean over every reference token of -log p(token | prompt, earlier tokens): one plain
    forward pass per (prompt ids, reference ids)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reference in pairs:
            logits = model(input_ids=torch.tensor([prompt + reference])).logits[0]
            logp = F.log_softmax(logits.float(), dim=-1)
            for j, token in enumerate(reference):
                total -= logp[len(prompt) - 1 + j, token].item()
                count += 1
    return total / count


def sft_groups(model):
    g1 = scored_group(model, [1, 2, 3], [[5, 6], [7, 8, 9]], [1.0, 1.0])  # equal rewards: trains anyway
    g2 = scored_group(model, [4, 5], [[20, 21]], [0.0])
    return [(g1, [30, 31, 32, 33]), (g2, [40, 41])]


def test_the_sft_loss_is_the_mean_token_nll_of_the_reference():
    model = tiny_model()
    groups = sft_groups(model)
    expected = manual_nll(model, [(list(g.group.prompt_token_ids), ref) for g, ref in groups])
    batch = grpo.combine([grpo.prepare_sft_group(g, ref, VOCAB) for g, ref in groups])
    assert batch.groups_used == 2 and [len(s.completion_ids) for s in batch.samples] == [4, 2]
    metrics = grpo.train_step(model, grpo.make_optimizer(model, lr=1e-6), batch, SFT)
    assert metrics["updated"] and metrics["tokens"] == 6
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["pg_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == 0.0 and metrics["clip_frac"] == 0.0


def test_sft_steps_raise_the_likelihood_of_the_reference():
    model = tiny_model()
    groups = sft_groups(model)
    pairs = [(list(g.group.prompt_token_ids), ref) for g, ref in groups]
    before = manual_nll(model, pairs)
    optimizer = grpo.make_optimizer(model, lr=1e-2)
    for _ in range(3):
        batch = grpo.combine([grpo.prepare_sft_group(g, ref, VOCAB) for g, ref in groups])
        grpo.train_step(model, optimizer, batch, SFT)
    assert manual_nll(model, pairs) < before - 0.1


def test_a_group_without_a_reference_carries_no_signal_and_says_why():
    model = tiny_model()
    group = scored_group(model, [1, 2], [[3], [4]], [1.0, 0.0])
    prepared = grpo.prepare_sft_group(group, [])
    assert not prepared.has_signal and prepared.why == grpo.NO_REFERENCE and prepared.samples == []
    with pytest.raises(ValueError, match="token id 99 is outside"):
        grpo.prepare_sft_group(group, [5, 99], vocab_size=64)


def test_grpo_is_the_default_and_sft_is_the_other_objective():
    assert load_config(None).learner.objective == "grpo"
    from catq.config import LearnerConfig

    assert LearnerConfig(objective="sft").objective == "sft"
    with pytest.raises(ValueError):
        LearnerConfig(objective="dpo")



async def test_an_sft_learner_trains_on_the_reference_tokens_and_sets_aside_empty_ones(tmp_path, tiny_model_path):  # noqa: F811
    lp = make_loop(tmp_path, tiny_model_path, objective="sft", batch_groups=2)
    equal, blank, mixed = delivery(1, [1.0, 1.0]), delivery(2, [1.0, 0.0]), delivery(3, [0.0, 1.0])
    equal.message.referenced.reference = "The answer is \\boxed{4}."
    blank.message.referenced.reference = "  "
    mixed.message.referenced.reference = "4"
    await lp.intake([equal, blank, mixed])
    assert [d.entry_id for d in lp.buffer] == ["1-0", "3-0"]  # all-equal rewards still train
    assert lp.bus.acked == ["2-0"] and lp.counts.skipped_no_reference == 1
    (sample,) = lp.prepared["1-0"].samples
    assert sample.prompt_ids == list(equal.message.group.prompt_token_ids)
    decoded = lp.trainer.tokenizer.decode(sample.completion_ids)
    assert decoded == "The answer is \\boxed{4}.<|im_end|>"
    await lp.step()
    await lp.settle()
    (line,) = lines(tmp_path)
    assert line["groups_used"] == 2 and line["tokens"] == len(sample.completion_ids) + 2
    assert line["groups_skipped_no_reference"] == 1 and line["signal_frac"] == pytest.approx(2 / 3)
