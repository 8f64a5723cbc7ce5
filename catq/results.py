"""Per-prompt results: what clients read back (``GET /v1/prompts/{id}``, ``catq submit --wait``).

One Redis hash per prompt, ``catq:<run>:result:<prompt_id>``, each field JSON-encoded, merged
field by field as the prompt moves through the stages (status "queued" → "rolled_out" →
"referenced" → "scored" → "trained"), with a TTL refreshed on every write.
"""

from __future__ import annotations

import json
import time
from typing import Any

from catq.bus import Bus
from catq.messages import DeadLetter, MessageDecodeError, decode, prompt_id_of


class ResultStore:
    def __init__(self, bus: Bus, ttl_s: int):
        self.bus = bus
        self.ttl_s = ttl_s

    def key(self, prompt_id: str) -> str:
        return self.bus.key(f"result:{prompt_id}")

    async def update(self, prompt_id: str, **fields: Any) -> None:
        """Merge JSON-able fields into the prompt's result (and stamp ``updated_at``)."""
        mapping = {name: json.dumps(value) for name, value in fields.items()}
        mapping["updated_at"] = json.dumps(time.time())
        key = self.key(prompt_id)

        async def write() -> None:
            pipe = self.bus.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            await pipe.execute()

        await self.bus.retrying(write, "update result")

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        """Mark the prompt behind a dead-lettered entry as "dead", with the reason, so a client
        waiting on it learns it failed instead of waiting forever."""
        try:
            prompt_id = prompt_id_of(decode(letter.payload))
        except MessageDecodeError:
            return  # garbage: no prompt to tell
        if prompt_id is not None:
            await self.update(prompt_id, status="dead", error=letter.error, dead_stream=letter.stream)

    async def get(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's result with its ``prompt_id``; None for an unknown (or expired) id."""
        raw = await self.bus.retrying(lambda: self.bus.redis.hgetall(self.key(prompt_id)), "get result")
        if not raw:
            return None
        fields = {k.decode(): json.loads(v) for k, v in raw.items()}
        return {"prompt_id": prompt_id, **fields}
