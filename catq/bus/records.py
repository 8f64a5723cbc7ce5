"""Plain keys beside the streams: per-prompt result hashes, restart counts, the learner's last
step, the policy version, and the (prompt, version) pairs the learner has trained."""

from __future__ import annotations

import json
from typing import Any

from catq.bus.connection import Connection
from catq.bus.entries import as_str


class Records(Connection):
    async def write_hash(self, name: str, mapping: dict[str, str], ttl_s: int) -> None:
        """Merge ``mapping`` into the hash ``name`` and (re)set its expiry, atomically."""
        key = self.key(name)

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl_s)
            await pipe.execute()

        await self.retrying(write, f"write {name}")

    async def read_hash(self, name: str) -> dict[str, bytes]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key(name)), f"read {name}")
        return {as_str(k): v for k, v in raw.items()}

    async def record_restart(self, child: str) -> None:
        """Count one restart of a supervised child (`catq up`), for `catq status`."""
        await self.retrying(lambda: self.redis.hincrby(self.key("restarts"), child, 1), "record restart")

    async def restart_counts(self) -> dict[str, int]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key("restarts")), "restart counts")
        return {as_str(k): int(v) for k, v in raw.items()}

    async def set_learner_step(self, fields: dict[str, Any]) -> None:
        """The learner's newest per-step metrics (`catq top`), each field JSON; replaces the last."""
        key, mapping = self.key("learner:last_step"), {k: json.dumps(v) for k, v in fields.items()}

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            await pipe.execute()

        await self.retrying(write, "set learner step")

    async def learner_step(self) -> dict[str, Any]:
        raw = await self.retrying(lambda: self.redis.hgetall(self.key("learner:last_step")), "learner step")
        return {as_str(k): json.loads(v) for k, v in raw.items()}

    async def get_policy_version(self) -> int:
        value = await self.retrying(lambda: self.redis.get(self.key("policy_version")), "get policy version")
        return int(value) if value is not None else 0

    async def set_policy_version(self, version: int) -> None:
        await self.retrying(lambda: self.redis.set(self.key("policy_version"), int(version)),
                            "set policy version")

    # Trained (prompt id, policy version) pairs: the learner trains each pair once, across
    # restarts and duplicate stream entries.

    async def record_trained(self, pairs: list[tuple[str, int]], ttl_s: int) -> None:
        """Remember each (prompt id, policy version) pair as trained for ``ttl_s`` seconds."""
        if not pairs:
            return

        async def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for prompt_id, version in pairs:
                pipe.set(self.trained_key(prompt_id, version), 1, ex=ttl_s)
            await pipe.execute()

        await self.retrying(write, "record trained")

    async def trained_pairs(self, pairs: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Those of ``pairs`` recorded as trained."""
        if not pairs:
            return set()

        async def read() -> list:
            pipe = self.redis.pipeline(transaction=False)
            for prompt_id, version in pairs:
                pipe.exists(self.trained_key(prompt_id, version))
            return await pipe.execute()

        found = await self.retrying(read, "read trained")
        return {pair for pair, exists in zip(pairs, found) if exists}
