"""Per-prompt results: what clients read back (``GET /v1/prompts/{id}``, ``catq submit --wait``).

One Redis hash per prompt, ``catq:{<run>}:result:<prompt_id>``, each field JSON-encoded, merged
field by field as the prompt moves through the stages (its :class:`Status`), with a TTL
refreshed on every write.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any

from catq.bus import Bus
from catq.messages import DeadLetter, MessageDecodeError, decode, prompt_id_of


class Status(StrEnum):
    """Where a prompt is. Each stage writes its word; the last three are final."""

    QUEUED = "queued"            # ingest: on ``prompts``
    ROLLED_OUT = "rolled_out"    # rollout: G answers sampled
    REFERENCED = "referenced"    # anchor: the CaT reference (``cat_answer``) is there
    SCORED = "scored"            # judge: rewards are there (final when no learner runs)
    TRAINED = "trained"          # learner: in a checkpoint; ``trained_in_version`` names the first
                                 # published policy version whose weights include it
    SET_ASIDE = "set_aside"      # learner: not trained on (``set_aside`` says why: no signal, stale)
    DEAD = "dead"                # dead-lettered (``error`` says why)


ORDER = list(Status)


def reached(status: str | None, target: Status) -> bool:
    """Whether a prompt at ``status`` is at ``target`` or past it for good (dead and the
    learner's verdicts count as past every earlier stage)."""
    if status is None:
        return False
    if status in (Status.DEAD, Status.TRAINED, Status.SET_ASIDE):
        return True
    return ORDER.index(Status(status)) >= ORDER.index(target)


WAITING_ON = {"prompts": Status.QUEUED, "groups": Status.ROLLED_OUT, "references": Status.REFERENCED,
              "scored": Status.SCORED}
"""A prompt's status while its message waits on each work stream (what a replay puts back)."""


class ResultStore:
    def __init__(self, bus: Bus, ttl_s: int):
        self.bus = bus
        self.ttl_s = ttl_s

    @staticmethod
    def hash_name(prompt_id: str) -> str:
        return f"result:{prompt_id}"

    @staticmethod
    def encode_fields(**fields: Any) -> dict[str, str]:
        """Fields as stored in a result hash: each JSON-encoded, stamped with ``updated_at``."""
        mapping = {name: json.dumps(value) for name, value in fields.items()}
        mapping["updated_at"] = json.dumps(time.time())
        return mapping

    async def update(self, prompt_id: str, **fields: Any) -> None:
        """Merge JSON-able fields into the prompt's result (and stamp ``updated_at``)."""
        await self.bus.write_hash(self.hash_name(prompt_id), self.encode_fields(**fields), self.ttl_s)

    async def record_dead_letter(self, letter: DeadLetter) -> None:
        """Mark the prompt behind a dead-lettered entry as "dead", with the reason, so a client
        waiting on it learns it failed instead of waiting forever."""
        try:
            prompt_id = prompt_id_of(decode(letter.payload))
        except MessageDecodeError:
            return  # garbage: no prompt to tell
        if prompt_id is not None:
            await self.update(prompt_id, status=Status.DEAD, error=letter.error, dead_stream=letter.stream)

    async def get(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's result with its ``prompt_id``; None for an unknown (or expired) id."""
        raw = await self.bus.read_hash(self.hash_name(prompt_id))
        if not raw:
            return None
        fields = {name: json.loads(value) for name, value in raw.items()}
        return {"prompt_id": prompt_id, **fields}
