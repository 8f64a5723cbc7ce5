"""Which engine to run without a GPU: catq's engine against real SGLang 0.5.23 on the CPU.

    python bench/engines_cpu.py                    # default model, 8 clients x n=8 x 64 tokens
    python bench/engines_cpu.py --max-new-tokens 32 --rounds 2

Both servers serve the default model (SmolLM2-135M-Instruct, fp32) on this machine, one after the
other (never both at once: they would share the cores), with the same workload:
  throughput  8 concurrent clients, each one /generate with n=8 (T=0.7, top-p 0.8, top-k 20, as
              rollout samples), generated tokens / wall seconds;
  first token one request with max_new_tokens=1, alone (prefill + one decode step: the time to
              first token of a non-streaming request; catq's engine does not stream), median.
Each figure is the median over ``--rounds``. Prints both and the ratio catq/sglang. SGLang runs
from catq's cached CPU environment (`catq sglang install`, installed here on first use).

Measured (2026-12-04, quiet 2-core CPU, defaults): catq 96.8 tok/s, first token 306 ms; SGLang
127.4 tok/s, first token 106 ms; ratio catq/sglang 0.76x throughput, 2.88x first token.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import QUESTIONS, SAMPLING  # noqa: E402  (the same workload as bench/engine.py)
from catq.engines.client import EngineClient  # noqa: E402
from catq.engines.tokenizer import ChatTokenizer  # noqa: E402
from tests.helpers.engine_proc import EngineProcess, SGLangProcess  # noqa: E402


async def throughput(url: str, prompts: list[list[int]], n: int, max_new_tokens: int) -> float:
    clients = [EngineClient(url, timeout_s=3600) for _ in prompts]
    try:
        started = time.perf_counter()
        groups = await asyncio.gather(*[
            c.generate(p, n=n, max_new_tokens=max_new_tokens, **SAMPLING) for c, p in zip(clients, prompts)
        ])
        elapsed = time.perf_counter() - started
    finally:
        for c in clients:
            await c.close()
    return sum(c.completion_tokens for group in groups for c in group) / elapsed


async def first_token_s(url: str, prompt: list[int]) -> float:
    async with EngineClient(url, timeout_s=600) as client:
        started = time.perf_counter()
        await client.generate(prompt, max_new_tokens=1, **SAMPLING)
        return time.perf_counter() - started


async def measure(url: str, prompts: list[list[int]], args) -> dict:
    await throughput(url, prompts[:1], 1, 4)  # warm-up
    rates, firsts = [], []
    for _ in range(args.rounds):
        rates.append(await throughput(url, prompts, args.n, args.max_new_tokens))
        firsts.append(statistics.median([await first_token_s(url, p) for p in prompts[:4]]))
    return {"tokens_per_s": statistics.median(rates), "first_token_s": statistics.median(firsts)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tokenizer = ChatTokenizer("default")
    prompts = [tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    figures = {}
    for name, proc in (("catq", EngineProcess("default")), ("sglang", SGLangProcess("default"))):
        started = time.perf_counter()
        with proc:
            ready = time.perf_counter() - started
            figures[name] = {**asyncio.run(measure(proc.url, prompts, args)), "ready_s": ready}
        f = figures[name]
        print(f"{name:7s} {f['tokens_per_s']:7.1f} tok/s (8 clients x n={args.n} x {args.max_new_tokens} "
              f"tokens)   first token {f['first_token_s'] * 1000:6.0f} ms   ready in {f['ready_s']:.0f} s",
              flush=True)
    catq, sglang = figures["catq"], figures["sglang"]
    print(f"ratio catq/sglang: throughput {catq['tokens_per_s'] / sglang['tokens_per_s']:.2f}x, "
          f"first token {catq['first_token_s'] / sglang['first_token_s']:.2f}x (lower is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
