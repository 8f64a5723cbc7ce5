"""Learner throughput: trained tokens/s of one GRPO step (catq.learner.grpo.train_step) on the
default model, against a bare forward/backward/AdamW loop on the same batch, in the same run.

    python bench/learner.py [--model default] [--groups 2] [--group-size 4] [--prompt-tokens 64]
                            [--completion-tokens 128] [--micro-batch 8] [--rounds 3] [--device auto]
                            [--anchor-logprobs engine|learner]

The bare loop is the floor for this model on this machine: one forward over prompt + completion,
a log-softmax gather on the completion tokens, backward, AdamW. The learner step adds what GRPO
needs on top: the KL term, the clipped/capped objective, entropy and metrics, grad clipping. It
is reported with and without the KL term so the anchor's share is visible.

``--anchor-logprobs`` says where the KL term's π0 log-probs come from, as
``learner.anchor_logprobs`` does: "engine" (the default: they arrive with each group from the
anchor engine, whose prefill is the anchor engine's work, so this process loads only the policy)
or "learner" (this process holds a frozen anchor and runs its forward on every micro-batch). Run
both to compare peak memory. Rounds rotate the order and the median of each is reported (the
machine is shared). Peak memory: max RSS of the process on CPU (every model it loaded),
torch.cuda.max_memory_allocated on CUDA.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from catq.engines.models import load_causal_lm, resolve_device
from catq.learner import grpo
from catq.messages import (
    ChatMessage,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
)


def make_groups(args, vocab: int) -> list[ScoredGroup]:
    """Random groups; with ``--anchor-logprobs engine`` each rollout carries π0 log-probs as the
    anchor engine attaches them (random numbers here: their values do not change the cost)."""
    rng = random.Random(0)
    groups = []
    engine = args.anchor_logprobs == "engine"
    for g in range(args.groups):
        rollouts = [
            Rollout(text="", token_ids=[rng.randrange(vocab) for _ in range(args.completion_tokens)],
                    logprobs=[-rng.uniform(1, 10) for _ in range(args.completion_tokens)],
                    finish_reason="length",
                    anchor_logprobs=[-rng.uniform(1, 10) for _ in range(args.completion_tokens)] if engine else None)
            for _ in range(args.group_size)
        ]
        prompt = Prompt(prompt_id=f"bench{g}", task="math", messages=[ChatMessage("user", "q")])
        group = RolloutGroup(prompt=prompt, prompt_token_ids=[rng.randrange(vocab) for _ in range(args.prompt_tokens)],
                             rollouts=rollouts, policy_version=0)
        rewards = [float(i % 2) for i in range(args.group_size)]
        groups.append(ScoredGroup(ReferencedGroup(group, "s", "synthesis", "s"), rewards))
    return groups


def bare_step(model, optimizer, batch: grpo.PreparedBatch, micro: int, device) -> int:
    """forward + log-prob gather + backward + AdamW on the same tokens; returns tokens trained."""
    samples = batch.samples
    total = sum(len(s.completion_ids) for s in samples)
    optimizer.zero_grad(set_to_none=True)
    for start in range(0, len(samples), micro):
        mb = grpo.collate(samples[start : start + micro], device)
        logits = grpo.completion_logits(model, mb)
        targets = torch.cat([mb.input_ids[b, p : p + c]
                             for b, (p, c) in enumerate(zip(mb.prompt_lens, mb.completion_lens))])
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        (-(logp * mb.advantages).sum() / total).backward()
    optimizer.step()
    return total


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--anchor-logprobs", choices=["engine", "learner"], default="engine")
    args = parser.parse_args()

    device = torch.device(resolve_device(args.device))
    policy = load_causal_lm(args.model, device=str(device)).train()
    anchor = None
    if args.anchor_logprobs == "learner":
        anchor = load_causal_lm(args.model, device=str(device)).requires_grad_(False).eval()
    optimizer = grpo.make_optimizer(policy, lr=1e-7)
    batch = grpo.prepare_batch(make_groups(args, policy.config.vocab_size))
    tokens = sum(len(s.completion_ids) for s in batch.samples)
    cuda = device.type == "cuda"
    step_cfg = grpo.StepConfig(micro_batch_rollouts=args.micro_batch, autocast_bf16=cuda)
    no_kl = grpo.StepConfig(loss=grpo.LossConfig(kl_coef=0.0), micro_batch_rollouts=args.micro_batch,
                            autocast_bf16=cuda)

    def run_bare():
        if cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bare_step(policy, optimizer, batch, args.micro_batch, device)
        else:
            bare_step(policy, optimizer, batch, args.micro_batch, device)

    phases = {
        "bare fwd/bwd/AdamW": run_bare,
        "learner step (KL)": lambda: grpo.train_step(policy, optimizer, batch, step_cfg, anchor=anchor),
        "learner step (no KL)": lambda: grpo.train_step(policy, optimizer, batch, no_kl, anchor=None),
    }
    phases["learner step (KL)"]()  # warm-up: allocator, AdamW state, anchor
    times: dict[str, list[float]] = {name: [] for name in phases}
    names = list(phases)
    for round_index in range(args.rounds):  # rotate the order so no phase always runs first
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            times[name].append(timed(phases[name], device))

    print(f"model={args.model} device={device} threads={torch.get_num_threads()} "
          f"anchor log-probs from the {args.anchor_logprobs} "
          f"batch={len(batch.samples)} rollouts x ({args.prompt_tokens} prompt + "
          f"{args.completion_tokens} completion) tokens, micro-batch {args.micro_batch}, "
          f"rounds={args.rounds} (median)")
    bare = tokens / statistics.median(times["bare fwd/bwd/AdamW"])
    for name, ts in times.items():
        rate = tokens / statistics.median(ts)
        print(f"  {name:22s} {statistics.median(ts):7.2f} s/step  {rate:8.1f} trained tok/s  "
              f"ratio to bare {rate / bare:5.2f}")
    if cuda:
        print(f"  peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (cuda max allocated)")
    else:
        rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        models = "policy and anchor" if anchor is not None else "policy only"
        print(f"  peak memory: {rss_gib:.2f} GiB (max RSS, {models})")


if __name__ == "__main__":
    main()
