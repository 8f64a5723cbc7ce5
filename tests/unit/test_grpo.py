"""GRPO on a tiny random Llama built from a config (seconds, no files)."""

from __future__ import annotations

import pytest
import torch

from catq.learner import grpo
from catq.learner.grpo import LossConfig, StepConfig, TrainSample
from catq.messages import (
    ChatMessage,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
)

VOCAB = 64


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def scored_group(model, prompt_ids, completions, rewards, version=0) -> ScoredGroup:
    """A ScoredGroup whose behaviour log-probs are the model's own (on-policy)."""
    samples = [TrainSample(prompt_ids, c, [0.0] * len(c), 0.0) for c in completions]
    logps = grpo.sequence_logprobs(model, samples)
    rollouts = [
        Rollout(text="", token_ids=c, logprobs=lp.tolist(), finish_reason="stop")
        for c, lp in zip(completions, logps)
    ]
    prompt = Prompt(prompt_id="p", task="math", messages=[ChatMessage("user", "q")])
    group = RolloutGroup(prompt=prompt, prompt_token_ids=prompt_ids, rollouts=rollouts,
                         policy_version=version)
    referenced = ReferencedGroup(group=group, reference="s", estimator="synthesis", anchor_output="")
    return ScoredGroup(referenced=referenced, rewards=rewards)


def mean_logprobs(model, group: ScoredGroup) -> list[float]:
    samples = [TrainSample(group.group.prompt_token_ids, r.token_ids, r.logprobs, 0.0)
               for r in group.group.rollouts]
    return [lp.sum().item() for lp in grpo.sequence_logprobs(model, samples)]


def test_group_advantages_normalise_and_skip_zero_variance():
    adv = grpo.group_advantages([1.0, 0.0, 1.0, 0.0])
    assert adv == pytest.approx([1.0, -1.0, 1.0, -1.0], abs=1e-5)
    assert grpo.group_advantages([0.5, 0.5, 0.5]) is None
    assert grpo.group_advantages([1.0]) is None


def test_steps_raise_positive_and_lower_negative_responses():
    model = tiny_model()
    g1 = scored_group(model, [1, 2, 3], [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]], [1.0, 0.0, 0.0])
    g2 = scored_group(model, [4, 5], [[20, 21], [22, 23, 24]], [0.0, 1.0], version=0)
    before = mean_logprobs(model, g1) + mean_logprobs(model, g2)
    opt = grpo.make_optimizer(model, lr=1e-2)
    cfg = StepConfig(loss=LossConfig(kl_coef=0.0), micro_batch_rollouts=2)
    for _ in range(3):
        metrics = grpo.train_step(model, opt, grpo.prepare_batch([g1, g2]), cfg)
    assert metrics["updated"] and metrics["tokens"] == 4 + 3 + 5 + 2 + 3
    after = mean_logprobs(model, g1) + mean_logprobs(model, g2)
    positive = [0, 4]
    for i, (b, a) in enumerate(zip(before, after)):
        if i in positive:
            assert a > b, (i, b, a)
        else:
            assert a < b, (i, b, a)


def test_a_step_asked_to_stop_between_micro_batches_leaves_the_weights_unchanged():
    model = tiny_model()
    g = scored_group(model, [1, 2], [[3, 4], [5, 6, 7], [8], [9, 10]], [1.0, 0.0, 0.5, 0.2])
    before = [p.detach().clone() for p in model.parameters()]
    opt = grpo.make_optimizer(model, lr=1e-2)
    asked = []
    stop_after_first = lambda: asked.append(1) or len(asked) > 1  # noqa: E731
    with pytest.raises(grpo.StepCancelled):
        grpo.train_step(model, opt, grpo.prepare_batch([g]), StepConfig(micro_batch_rollouts=2),
                        should_stop=stop_after_first)
    assert len(asked) == 2  # checked before each micro-batch; stopped before the second
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("poison", ["logprob", "reward"])
def test_a_step_with_a_nan_loss_is_refused_and_leaves_weights_and_optimizer_unchanged(poison):
    model = tiny_model()
    opt = grpo.make_optimizer(model, lr=1e-2)
    good = scored_group(model, [1, 2], [[3, 4], [5, 6, 7]], [1.0, 0.0])
    grpo.train_step(model, opt, grpo.prepare_batch([good]), StepConfig())  # moments to protect
    bad = scored_group(model, [1, 2], [[8, 9], [10]], [1.0, 0.0])
    if poison == "logprob":
        bad.group.rollouts[0].logprobs[1] = float("nan")
    else:
        bad.rewards[1] = float("nan")  # NaN advantages
    before = [p.detach().clone() for p in model.parameters()]
    moments = [s["exp_avg"].clone() for s in opt.state.values()]
    with pytest.raises(grpo.NonFiniteStep, match="non-finite loss"):
        grpo.train_step(model, opt, grpo.prepare_batch([good, bad]), StepConfig())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, opt.state.values()))
    assert all(p.grad is None for p in model.parameters())


def test_micro_batching_accumulates_the_full_batch_gradient():
    grads = []
    for micro in (1, 5):
        model = tiny_model()
        g = scored_group(model, [1, 2], [[3, 4], [5, 6, 7], [8], [9, 10, 11, 12], [13, 14]],
                         [1.0, 0.0, 0.5, 0.2, 0.9])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        cfg = StepConfig(loss=LossConfig(kl_coef=0.0), micro_batch_rollouts=micro, max_grad_norm=1e9)
        optimizer_step = opt.step
        captured = {}
        opt.step = lambda: captured.update(g=[p.grad.clone() for p in model.parameters()]) or optimizer_step()
        grpo.train_step(model, opt, grpo.prepare_batch([g]), cfg)
        grads.append(captured["g"])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_clipped_tokens_have_zero_gradient():
    cfg = LossConfig(clip_eps=0.2, behaviour_weight_cap=2.0, kl_coef=0.0)
    behaviour = torch.zeros(6)
    # ratios: 1.5 (A>0 clipped), 0.5 (A<0 clipped), 1.1 (A>0 inside), 0.9 (A<0 inside),
    # 3.0 (A<0: capped at C), 1.5 (A<0: beyond 1+eps, weighted 1.5, not clipped)
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.9, 3.0, 1.5])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, -1.0])
    logp = ratios.log().clone().requires_grad_(True)
    terms = grpo.policy_loss(logp, behaviour, adv, cfg)
    terms.loss_sum.backward()
    grad = logp.grad
    assert grad[0] == 0 and grad[1] == 0 and grad[4] == 0
    # d(-r*A)/dlogp = -r*A
    assert grad[2].item() == pytest.approx(-1.1)
    assert grad[3].item() == pytest.approx(0.9)
    assert grad[5].item() == pytest.approx(1.5)
    assert terms.clipped == 2 and terms.capped == 1
    # the capped token's objective is bounded by C * A
    assert terms.pg_sum == pytest.approx(-(1.2 * 1) + (0.8) - 1.1 + 0.9 + 2.0 + 1.5, abs=1e-5)


def test_zero_variance_groups_change_nothing():
    model = tiny_model()
    g = scored_group(model, [1, 2, 3], [[4, 5], [6, 7, 8]], [1.0, 1.0])
    h = scored_group(model, [1, 2, 3], [[9, 10], [11]], [0.0, 0.0])
    before = [p.detach().clone() for p in model.parameters()]
    opt = grpo.make_optimizer(model, lr=1e-2)
    batch = grpo.prepare_batch([g, h])
    assert batch.groups_skipped == 2 and batch.samples == []
    metrics = grpo.train_step(model, opt, batch, StepConfig())
    assert metrics["updated"] is False and metrics["groups_skipped"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state == {}


def test_kl_is_zero_when_policy_equals_anchor():
    policy, anchor = tiny_model(seed=3), tiny_model(seed=3)
    g = scored_group(policy, [1, 2, 3], [[4, 5, 6], [7, 8]], [1.0, 0.0])
    opt = torch.optim.SGD(policy.parameters(), lr=0.0)
    metrics = grpo.train_step(policy, opt, grpo.prepare_batch([g]), StepConfig(), anchor=anchor)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-7)
    other = tiny_model(seed=4)
    metrics = grpo.train_step(policy, opt, grpo.prepare_batch([g]), StepConfig(), anchor=other)
    assert metrics["kl"] > 1e-4


def test_on_policy_ratio_is_one_and_nothing_clipped():
    model = tiny_model()
    g = scored_group(model, [1, 2], [[3, 4, 5], [6, 7]], [1.0, 0.0])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    metrics = grpo.train_step(model, opt, grpo.prepare_batch([g]), StepConfig())
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["clip_frac"] == 0.0
    assert metrics["entropy"] > 0


def with_anchor_logprobs(group: ScoredGroup, anchor, rows: list[int]) -> ScoredGroup:
    """``group`` with π0's log-probs attached to the rollouts at ``rows``, as the anchor engine
    attaches them (the anchor model's own, computed here in-process)."""
    samples = [TrainSample(group.group.prompt_token_ids, r.token_ids, r.logprobs, 0.0)
               for r in group.group.rollouts]
    for row, lp in enumerate(grpo.sequence_logprobs(anchor, samples)):
        if row in rows:
            group.group.rollouts[row].anchor_logprobs = lp.tolist()
    return group


def grads_after_step(policy, group: ScoredGroup, anchor=None) -> tuple[dict, list[torch.Tensor]]:
    """The step's metrics and the gradients it took (SGD at lr 0 keeps the weights)."""
    cfg = StepConfig(loss=LossConfig(kl_coef=0.5))
    grads = []

    class Keep(torch.optim.SGD):
        def step(self, closure=None):
            grads.extend(p.grad.detach().clone() for p in policy.parameters())

    opt = Keep(policy.parameters(), lr=0.0)
    metrics = grpo.train_step(policy, opt, grpo.prepare_batch([group]), cfg, anchor=anchor)
    return metrics, grads


def test_anchor_logprobs_from_the_engine_give_the_step_of_an_anchor_held_by_the_learner():
    policy, anchor = tiny_model(seed=3), tiny_model(seed=5)
    g = scored_group(policy, [1, 2, 3], [[4, 5, 6], [7, 8]], [1.0, 0.0])
    held, held_grads = grads_after_step(policy, g, anchor=anchor)
    supplied, supplied_grads = grads_after_step(policy, with_anchor_logprobs(g, anchor, rows=[0, 1]))
    assert held["kl"] > 1e-4 and supplied["kl"] == pytest.approx(held["kl"], rel=1e-4)
    assert supplied["kl_coverage"] == 1.0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(held_grads, supplied_grads))


def test_a_rollout_without_anchor_logprobs_is_outside_the_kl_term():
    policy, anchor = tiny_model(seed=3), tiny_model(seed=5)
    g = scored_group(policy, [1, 2, 3], [[4, 5, 6], [7, 8]], [1.0, 0.0])
    only_first, _ = grads_after_step(policy, with_anchor_logprobs(g, anchor, rows=[0]))
    assert only_first["kl_coverage"] == pytest.approx(3 / 5) and only_first["kl"] > 0.0
    # Per token: a NaN anchor log-prob gives KL 0 and the policy-gradient-only slope, no NaN.
    cfg = LossConfig(kl_coef=0.5)
    behaviour, adv = torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 1.0])
    logp = torch.tensor([-1.2, -2.5], requires_grad=True)
    grpo.policy_loss(logp, behaviour, adv, cfg, torch.tensor([-0.3, float("nan")])).loss_sum.backward()
    logp_pg = logp.detach().clone().requires_grad_(True)
    terms = grpo.policy_loss(logp_pg, behaviour, adv, cfg, None)
    terms.loss_sum.backward()
    assert logp.grad[1].item() == pytest.approx(logp_pg.grad[1].item())
    assert logp.grad[0].item() != pytest.approx(logp_pg.grad[0].item())


def test_a_group_whose_anchor_logprobs_do_not_match_its_tokens_is_refused_at_intake():
    policy = tiny_model()
    g = scored_group(policy, [1, 2], [[3, 4, 5], [6, 7]], [1.0, 0.0])
    g.group.rollouts[0].anchor_logprobs = [-1.0]
    with pytest.raises(ValueError, match="1 anchor log-probs for 3 tokens"):
        grpo.prepare_group(g)
