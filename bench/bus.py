"""Bus throughput: messages/s through Bus.publish → Bus.read → Bus.complete, against a bare
redis-py XADD / XREADGROUP / XACK loop moving the same payloads, in the same run.

    python bench/bus.py [--redis-url URL] [--messages 300] [--rounds 3]

Each message is a RolloutGroup the size the pipeline moves: 8 rollouts x 1,000 tokens, with
token ids and float log-probs (~100 KiB of msgpack). Three loops, same payloads, same run:

- bare: XADD pre-encoded bytes, XREADGROUP, XACK; moves bytes and never looks at them;
- bare + codec: the same, plus catq.messages.encode before XADD and decode after XREADGROUP,
  i.e. what any consumer that uses the messages must pay; the gap between this and the bus is
  the bus protocol's own cost (done-marker check, atomic complete script, trimming);
- bus: Bus.publish, Bus.read, Bus.complete.

Rounds alternate the loops and the median of each is reported, since the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
import uuid

from catq.bus import run_key
import redis.asyncio as aioredis

from catq.bus import Bus
from catq.config import BusConfig
from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup, decode, encode

BATCH = 16
"""Entries per XREADGROUP in both loops."""


def group_message(rng: random.Random, rollouts: int = 8, tokens: int = 1000) -> RolloutGroup:
    prompt = Prompt(prompt_id=uuid.uuid4().hex, task="math", messages=[ChatMessage("user", "What is 6*7?")])
    return RolloutGroup(
        prompt=prompt,
        prompt_token_ids=[rng.randrange(49152) for _ in range(40)],
        rollouts=[Rollout(text="The answer is 42. " * 50,
                          token_ids=[rng.randrange(49152) for _ in range(tokens)],
                          logprobs=[-rng.random() * 5 for _ in range(tokens)],
                          finish_reason="length") for _ in range(rollouts)],
        policy_version=3,
    )


async def bare_loop(url: str, payloads: list[bytes], messages: list[RolloutGroup] | None = None) -> float:
    """The bare loop; with ``messages`` it also encodes before XADD and decodes after reading."""
    client = aioredis.Redis.from_url(url)
    key = f"catq:bench-bare-{uuid.uuid4().hex[:8]}:groups"
    try:
        await client.xgroup_create(key, "anchor", id="0", mkstream=True)
        start = time.perf_counter()
        for i, payload in enumerate(payloads):
            await client.xadd(key, {"message": encode(messages[i]) if messages else payload})
        done = 0
        while done < len(payloads):
            reply = await client.xreadgroup("anchor", "c1", {key: ">"}, count=BATCH, block=1000)
            for entry_id, fields in reply[0][1]:
                if messages:
                    decode(fields[b"message"], expected=RolloutGroup)
                await client.xack(key, "anchor", entry_id)
                done += 1
        return len(payloads) / (time.perf_counter() - start)
    finally:
        await client.delete(key)
        await client.aclose()


async def bus_loop(url: str, messages: list[RolloutGroup]) -> float:
    run = f"bench-bus-{uuid.uuid4().hex[:8]}"
    bus = Bus(url, run, BusConfig(max_stream_len=100_000))
    try:
        await bus.ensure_group("groups", "anchor")
        start = time.perf_counter()
        for message in messages:
            await bus.publish("groups", message)
        done = 0
        while done < len(messages):
            for delivery in await bus.read("groups", "anchor", "c1", count=BATCH, message_type=RolloutGroup):
                await bus.complete(delivery, "anchor", [])
                done += 1
        return len(messages) / (time.perf_counter() - start)
    finally:
        keys = [k async for k in bus.redis.scan_iter(match=run_key(run, "*"), count=1000)]
        for i in range(0, len(keys), 500):
            await bus.redis.delete(*keys[i:i + 500])
        await bus.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = random.Random(0)
    messages = [group_message(rng) for _ in range(args.messages)]
    payloads = [encode(m) for m in messages]
    print(f"{args.messages} RolloutGroups of 8 x 1000 tokens, {len(payloads[0]) / 1024:.0f} KiB each, "
          f"{args.rounds} rounds")
    bare, codec, bus = [], [], []
    for _ in range(args.rounds):
        bare.append(await bare_loop(args.redis_url, payloads))
        codec.append(await bare_loop(args.redis_url, payloads, messages))
        bus.append(await bus_loop(args.redis_url, messages))
    b, k, c = statistics.median(bare), statistics.median(codec), statistics.median(bus)

    def rounds(xs: list[float]) -> str:
        return ", ".join(f"{x:.0f}" for x in xs)

    print(f"bare redis-py XADD/XREADGROUP/XACK:  {b:8.1f} msg/s  (rounds: {rounds(bare)})")
    print(f"bare + messages encode/decode:       {k:8.1f} msg/s  (rounds: {rounds(codec)})")
    print(f"catq Bus publish/read/complete:      {c:8.1f} msg/s  (rounds: {rounds(bus)})")
    print(f"ratio bus/bare: {c / b:.2f}    ratio bus/(bare + codec): {c / k:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
