"""Who is alive and what they did: heartbeats, per-role work counters (``catq top``), and the
policy engine replicas the syncer lists (:mod:`catq.engines.replicas`)."""

from __future__ import annotations

import json
import time

from catq.bus.connection import Connection
from catq.bus.entries import as_str

LATENCY_SAMPLES = 200
"""Handler latencies kept per role for `catq top`'s percentiles and throughput."""


class Liveness(Connection):
    # -- heartbeats --

    async def heartbeats(self, role: str) -> dict[str, dict]:
        """Live workers of ``role`` (heartbeat keys not yet expired): worker id -> what the
        worker wrote (pid, host, "at": unix time of its newest beat)."""
        prefix = self.heartbeat_key(role, "")

        async def read() -> dict[str, dict]:
            keys = [k async for k in self.redis.scan_iter(match=prefix + "*", count=1000)]
            values = await self.redis.mget(keys) if keys else []
            return {as_str(k)[len(prefix):]: _json_or_empty(v) for k, v in zip(keys, values) if v is not None}

        return await self.retrying(read, f"heartbeats {role}")

    async def beat(self, role: str, worker_id: str, info: dict, ttl_ms: int) -> None:
        """One heartbeat: ``info`` (JSON) under the worker's key, expiring after ``ttl_ms``.
        Not retried: a missed beat only ages the key, and the caller beats again."""
        await self.redis.set(self.heartbeat_key(role, worker_id), json.dumps(info), px=ttl_ms)

    async def clear_beat(self, role: str, worker_id: str) -> None:
        """Drop the worker's heartbeat at a clean stop (else it lingers until it expires)."""
        await self.redis.delete(self.heartbeat_key(role, worker_id))

    async def live_workers(self, role: str) -> list[str]:
        """Worker ids of ``role`` whose heartbeat key has not expired."""
        return sorted(await self.heartbeats(role))

    # -- per-role work counters (`catq top`) --

    async def record_handled(self, role: str, outcome: str, seconds: float) -> None:
        """Count one message a ``role`` worker finished (``outcome``: handled, failed, dead) and
        keep its handler latency among the newest LATENCY_SAMPLES (one round trip; not retried:
        these numbers only inform `catq top`)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hincrby(self.role_stats_key(role), outcome, 1)
        pipe.lpush(self.latency_key(role), f"{time.time():.3f} {seconds:.4f} {outcome}")
        pipe.ltrim(self.latency_key(role), 0, LATENCY_SAMPLES - 1)
        await pipe.execute()

    async def role_stats(self, role: str) -> tuple[dict[str, int], list[tuple[float, float, str]]]:
        """A role's counters and its newest latency samples as (unix time, seconds, outcome)."""
        async def read() -> list:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hgetall(self.role_stats_key(role))
            pipe.lrange(self.latency_key(role), 0, -1)
            return await pipe.execute()

        counts, samples = await self.retrying(read, f"role stats {role}")
        parsed = []
        for sample in samples:
            at, seconds, outcome = as_str(sample).split(" ")
            parsed.append((float(at), float(seconds), outcome))
        return {as_str(k): int(v) for k, v in counts.items()}, parsed

    # -- policy engine replicas (catq/engines/replicas.py): url -> JSON entry, listed by the syncer --

    async def list_replica(self, pool: str, url: str, entry: dict) -> None:
        await self.retrying(lambda: self.redis.hset(self.replicas_key(pool), url, json.dumps(entry)),
                            f"list replica {url}")

    async def unlist_replica(self, pool: str, url: str) -> None:
        await self.retrying(lambda: self.redis.hdel(self.replicas_key(pool), url), f"unlist replica {url}")

    async def replicas(self, pool: str) -> dict[str, dict]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.replicas_key(pool)), f"read replicas {pool}")
        return {as_str(url): json.loads(value) for url, value in raw.items()}


def _json_or_empty(value: bytes | str) -> dict:
    try:
        parsed = json.loads(value)
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}
