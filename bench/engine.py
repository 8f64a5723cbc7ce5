"""Engine throughput: catq's engine server under concurrent clients vs model.generate in-process.

    python bench/engine.py                      # default model, CPU, 8 clients x n=8 x 64 tokens
    python bench/engine.py --device cuda --max-new-tokens 128
    python bench/engine.py --prefill-only --prefill-tokens 1500   # just the shared-prefill figure

Three figures from one run, same model, prompts and sampling settings (T=0.7, top-p 0.8,
top-k 20, as the rollout config):
  server      8 concurrent clients, each one /generate with n=8, through HTTP; the engine batches
              them all together (continuous batching, one KV cache);
  sequential  model.generate in this process, one call per client request (num_return_sequences=8),
              one after another: what a one-request-at-a-time server would do;
  one-batch   model.generate once over all 64 sequences (left-padded): the in-process ceiling.
Generated tokens count each sequence up to and including its end-of-sequence token.

A fourth figure, the shared prompt prefill: the engine prefills a prompt once for the n samples
of a request and forks its KV cache n ways (catq.engines.batching.BatchGenerator.prefill). Timed
on the generator itself with a long prompt (``--prefill-tokens``, the size of the anchor's
synthesis prompts), against the same n rows made distinct by their first token, which the
generator must prefill n times; printed as ``ratio shared/separate prefill`` (prefills per second).

Measured (2026-11-22, 2 shared CPU cores under load from other processes, so noisy;
`--max-new-tokens 16`): server 22.8 tok/s, in-process sequential 3.6 tok/s, in-process one
batch 13.8 tok/s; server/sequential 6.3x, server/one-batch 1.65x (the server prefills each
distinct prompt once for its n samples; model.generate prefills all 64 rows). With the default
64 new tokens the server alone gave 17.4 tok/s on the same loaded machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from catq.engines.client import EngineClient  # noqa: E402
from catq.engines.models import load_causal_lm, resolve_device  # noqa: E402
from catq.engines.tokenizer import ChatTokenizer  # noqa: E402
from tests.helpers.engine_proc import EngineProcess  # noqa: E402

QUESTIONS = [
    "What is 17 + 25?", "A train travels 60 km in 1.5 hours. What is its speed?",
    "What is 9 times 8?", "If I have 3 apples and buy 5 more, how many do I have?",
    "What is 144 divided by 12?", "Name three primary colours.",
    "What is 15% of 200?", "Write one sentence about the sea.",
]
SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


async def bench_server(url: str, prompts: list[list[int]], n: int, max_new_tokens: int) -> tuple[int, float]:
    clients = [EngineClient(url, timeout_s=3600) for _ in prompts]
    try:
        started = time.perf_counter()
        results = await asyncio.gather(*[
            c.generate(p, n=n, max_new_tokens=max_new_tokens, **SAMPLING) for c, p in zip(clients, prompts)
        ])
        elapsed = time.perf_counter() - started
    finally:
        for c in clients:
            await c.close()
    return sum(c.completion_tokens for group in results for c in group), elapsed


def count_generated(rows: torch.Tensor, eos_ids: set[int]) -> int:
    total = 0
    for row in rows.tolist():
        ends = [i for i, t in enumerate(row) if t in eos_ids]
        total += ends[0] + 1 if ends else len(row)
    return total


@torch.no_grad()
def bench_inprocess(model, tokenizer, prompts: list[list[int]], n: int, max_new_tokens: int,
                    one_batch: bool) -> tuple[int, float]:
    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id}
    kwargs = dict(do_sample=True, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  num_return_sequences=n, **SAMPLING)
    started = time.perf_counter()
    if one_batch:
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(device)
        out = model.generate(**batch, **kwargs)
        tokens = count_generated(out[:, batch["input_ids"].shape[1]:], eos)
    else:
        tokens = 0
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            tokens += count_generated(out[:, len(prompt):], eos)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens, time.perf_counter() - started


def long_prompt(chat: ChatTokenizer, tokens: int) -> list[int]:
    """A chat prompt of about ``tokens`` tokens: the questions repeated, as an anchor reads G answers."""
    text = " ".join(QUESTIONS)
    ids = chat.encode_chat([{"role": "user", "content": text}])
    while len(ids) < tokens:
        text += " " + " ".join(QUESTIONS)
        ids = chat.encode_chat([{"role": "user", "content": text}])
    return ids[-tokens:]


def bench_prefill(model, tokenizer, prompt: list[int], n: int, rounds: int = 3) -> tuple[float, float]:
    """Median seconds of one prefill of n rows of ``prompt`` (shared: one forward, the cache
    forked n ways) and of n rows differing only in their first token (n forwards in one batch)."""
    import statistics

    from catq.engines.batching import BatchGenerator, Sequence
    from catq.engines.sampling import SamplingParams

    gen = BatchGenerator(model, tokenizer)
    params = SamplingParams(max_new_tokens=1, **SAMPLING)
    shared = [Sequence(list(prompt), params) for _ in range(n)]
    separate = [Sequence([(prompt[0] + i) % gen.vocab_size, *prompt[1:]], params) for i in range(n)]
    gen.prefill(shared[:1])  # warm-up
    times: dict[str, list[float]] = {"shared": [], "separate": []}
    for _ in range(rounds):
        for name, seqs in (("shared", shared), ("separate", separate)):
            started = time.perf_counter()
            gen.prefill(seqs)
            if gen.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["shared"]), statistics.median(times["separate"])


def report_prefill(model, chat: ChatTokenizer, args) -> None:
    prompt = long_prompt(chat, args.prefill_tokens)
    shared_s, separate_s = bench_prefill(model, chat.tokenizer, prompt, args.n)
    print(f"prefill n={args.n} x {len(prompt)}-token prompt: shared {shared_s:6.2f} s, "
          f"separate {separate_s:6.2f} s (median of 3)")
    print(f"ratio shared/separate prefill: {separate_s / shared_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--skip-one-batch", action="store_true")
    parser.add_argument("--prefill-tokens", type=int, default=1500)
    parser.add_argument("--prefill-only", action="store_true", help="only the shared-prefill figure")
    args = parser.parse_args()
    device = resolve_device(args.device)
    chat = ChatTokenizer(args.model)
    if args.prefill_only:
        report_prefill(load_causal_lm(args.model, device=device), chat, args)
        return
    prompts = [chat.encode_chat([{"role": "user", "content": q}])
               for q in (QUESTIONS * args.clients)[: args.clients]]
    print(f"model={args.model} device={device} clients={args.clients} n={args.n} "
          f"max_new_tokens={args.max_new_tokens} torch_threads={torch.get_num_threads()}")

    with EngineProcess(args.model, max_batch=args.clients * args.n, device=device) as engine:
        asyncio.run(bench_server(engine.url, prompts[:1], 1, 4))  # warm-up
        server_tokens, server_s = asyncio.run(bench_server(engine.url, prompts, args.n, args.max_new_tokens))
        engine.stop()
    report("server (HTTP, batched)", server_tokens, server_s)

    model = load_causal_lm(args.model, device=device)
    bench_inprocess(model, chat.tokenizer, prompts[:1], 1, 4, one_batch=False)  # warm-up
    seq_tokens, seq_s = bench_inprocess(model, chat.tokenizer, prompts, args.n, args.max_new_tokens, False)
    report("in-process sequential", seq_tokens, seq_s)
    if not args.skip_one_batch:
        one_tokens, one_s = bench_inprocess(model, chat.tokenizer, prompts, args.n, args.max_new_tokens, True)
        report("in-process one batch", one_tokens, one_s)
        print(f"ratio server / in-process one batch:  {(server_tokens / server_s) / (one_tokens / one_s):.2f}")
    print(f"ratio server / in-process sequential: {(server_tokens / server_s) / (seq_tokens / seq_s):.2f}")
    report_prefill(model, chat, args)


def report(label: str, tokens: int, seconds: float) -> None:
    print(f"{label:<24} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:8.1f} tokens/s")


if __name__ == "__main__":
    main()
