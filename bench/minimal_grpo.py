"""A minimal synchronous on-policy GRPO loop: the baseline bench/learning.py runs against catq.

    python bench/minimal_grpo.py --budget-s 60 --max-steps 2 --out /tmp/x

One process, one model: sample G completions per prompt with ``model.generate``, reward each by
agreement with its group's majority answer, take one GRPO step, repeat. Because every step trains
on completions the current weights just sampled, the importance ratio is exactly 1, so there is
no clipping and no behaviour log-probs; there is no KL term either (the catq arm runs without one).
Prompts are chat-templated exactly as catq's rollout role does (ChatTokenizer.encode_chat on one
user message), so both arms train on identical prompt tokens. For SmolLM2 that template inserts
its default system message ("You are a helpful AI assistant named SmolLM, ...").
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from catq.engines.models import load_causal_lm  # noqa: E402
from catq.engines.tokenizer import ChatTokenizer  # noqa: E402
from catq.teacher.answers import final_answer  # noqa: E402
from catq.teacher.estimators import majority_vote  # noqa: E402

ADV_EPS = 1e-6  # as catq.learner.grpo: std below this means all rewards equal, no signal


@dataclass
class MinimalRun:
    steps: int                 # optimizer steps taken
    steps_with_signal: int     # steps whose batch had at least one group with non-equal rewards
    weights_dir: Path          # final weights, HF save_pretrained format (model + tokenizer)
    metrics: list[dict]        # one dict per sampled batch (updated False when no step was taken)
    elapsed_s: float           # training wall time (model loading excluded)


def prompt_stream(prompts: list[str], seed: int):
    """Endless prompts: a fresh seeded shuffle each epoch."""
    rng = random.Random(seed)
    while True:
        order = list(prompts)
        rng.shuffle(order)
        yield from order


def majority_rewards(texts: list[str]) -> list[float]:
    """1.0 for completions whose final answer is in the group's winning class, else 0.0."""
    winners = set(majority_vote([final_answer(t) for t in texts]))
    return [1.0 if i in winners else 0.0 for i in range(len(texts))]


def group_advantages(rewards: list[float]) -> list[float] | None:
    """(r - mean) / (std + eps), population std; None when the group carries no signal."""
    r = torch.tensor(rewards, dtype=torch.float64)
    std = r.std(unbiased=False).item()
    return None if std < ADV_EPS else ((r - r.mean()) / (std + ADV_EPS)).tolist()


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: list[list[int]], group_size: int, **sampling) -> list[list[int]]:
    """``group_size`` completions per prompt in one generate call (rows grouped by prompt), each
    cut after its first EOS: pad == EOS for SmolLM2, so the padding is dropped with it."""
    eos = tokenizer.eos_token_id
    width = max(len(p) for p in prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    model.eval()
    out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True,
                         num_return_sequences=group_size, pad_token_id=pad, eos_token_id=eos,
                         **sampling)
    completions = []
    for row in out[:, width:].tolist():
        completions.append(row[: row.index(eos) + 1] if eos in row else row)
    return completions


def grpo_loss(model, samples: list[tuple[list[int], list[int], float]], pad_id: int) -> torch.Tensor:
    """-mean over every completion token of advantage * log pi(token). Rows are rebuilt as
    prompt + completion and right-padded (like catq's collate), so positions need no fixing."""
    seqs = [p + c for p, c, _ in samples]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    total, tokens = 0.0, 0
    for row, (prompt, completion, adv) in enumerate(samples):
        # logits at position t predict token t+1: completion tokens start at len(prompt)
        start = len(prompt)
        logp = F.log_softmax(logits[row, start - 1 : start - 1 + len(completion)].float(), dim=-1)
        token_logp = logp.gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)
        total = total - adv * token_logp.sum()
        tokens += len(completion)
    return total / tokens


def train_minimal_grpo(model: str, prompts: list[str], *, budget_s: float, out_dir: Path,
                       group_size: int = 8, prompts_per_step: int = 2, lr: float = 1e-5,
                       max_new_tokens: int = 48, temperature: float = 0.7, top_p: float = 0.8,
                       top_k: int = 20, seed: int = 0, max_steps: int | None = None,
                       cache_dir: str | None = None, log=None) -> MinimalRun:
    random.seed(seed)
    torch.manual_seed(seed)
    policy = load_causal_lm(model, device="cpu", cache_dir=cache_dir)
    chat = ChatTokenizer(model, cache_dir)  # catq's templating, so prompt tokens match the catq arm
    tokenizer = chat.tokenizer  # catq.engines.models.load_tokenizer(model, cache_dir)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
    stream = prompt_stream(prompts, seed)
    metrics: list[dict] = []
    steps = steps_with_signal = 0
    started = time.perf_counter()
    while time.perf_counter() - started < budget_s and (max_steps is None or steps < max_steps):
        batch_started = time.perf_counter()
        batch_prompts = [next(stream) for _ in range(prompts_per_step)]
        prompt_ids = [chat.encode_chat([{"role": "user", "content": p}]) for p in batch_prompts]
        completions = sample(policy, tokenizer, prompt_ids, group_size, **sampling)
        gen_s = time.perf_counter() - batch_started
        rewards, samples, signal_groups = [], [], 0
        for g, prompt in enumerate(prompt_ids):
            group = completions[g * group_size : (g + 1) * group_size]
            group_rewards = majority_rewards([chat.decode(c) for c in group])
            rewards += group_rewards
            advantages = group_advantages(group_rewards)
            if advantages is None:  # all rewards equal: zero advantage, nothing to learn
                continue
            signal_groups += 1
            samples += [(prompt, c, a) for c, a in zip(group, advantages)]
        loss = None
        if samples:  # the token mean is over groups with signal only, as catq's learner does
            policy.train()
            optimizer.zero_grad(set_to_none=True)
            loss_t = grpo_loss(policy, samples, tokenizer.eos_token_id)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            optimizer.step()
            loss, steps, steps_with_signal = loss_t.item(), steps + 1, steps_with_signal + 1
        elapsed = time.perf_counter() - started
        metrics.append({"step": len(metrics) + 1, "elapsed_s": elapsed, "updated": loss is not None,
                        "reward_mean": sum(rewards) / len(rewards),
                        "signal_frac": signal_groups / len(prompt_ids), "loss": loss,
                        "gen_s": gen_s, "batch_s": time.perf_counter() - batch_started})
        if log:
            log(metrics[-1])
    elapsed_s = time.perf_counter() - started
    # the same format catq.learner.publish.write_weights gives catq's engine: fp32 safetensors,
    # config.json, generation_config.json and the tokenizer, in one directory
    weights_dir = Path(out_dir) / "weights"
    policy.eval()
    policy.save_pretrained(str(weights_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(weights_dir))
    return MinimalRun(steps, steps_with_signal, weights_dir, metrics, elapsed_s)


def print_batch(m: dict) -> None:
    loss = "-" if m["loss"] is None else f"{m['loss']:+.4f}"
    print(f"batch {m['step']:3d}  t={m['elapsed_s']:7.1f}s  gen {m['gen_s']:5.1f}s  "
          f"reward {m['reward_mean']:.2f}  signal {m['signal_frac']:.2f}  loss {loss}", flush=True)


def main(argv: list[str] | None = None) -> int:
    from catq.evaluation.datasets import training_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--budget-s", type=float, default=600.0)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts = [p["text"] for p in training_split()[0]]  # the held-out problems stay unseen

    run = train_minimal_grpo(args.model, prompts, budget_s=args.budget_s, out_dir=args.out,
                             group_size=args.group_size, prompts_per_step=args.prompts_per_step,
                             lr=args.lr, seed=args.seed, max_steps=args.max_steps, log=print_batch)
    print(f"{run.steps} optimizer steps ({run.steps_with_signal} with signal) over "
          f"{len(run.metrics)} batches in {run.elapsed_s:.1f}s; weights in {run.weights_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
