"""What the learner loop needs of its collaborators, as Protocols: the bus (a subset of
:class:`catq.bus.Bus`), the trainer (:class:`catq.learner.trainer.Trainer`, or the
:class:`catq.learner.leader.Leader` in front of it under torchrun), the result store
(:class:`catq.results.ResultStore`) and the weight broadcaster
(:class:`catq.learner.broadcast.WeightBroadcaster`). Tests pass fakes that implement them.
Types only: importing this module imports no torch and no Redis client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from catq.bus import Delivery
from catq.messages import Message, ScoredGroup

Pair = tuple[str, int]
"""(prompt id, policy version): what the learner trains at most once."""


class LearnerBus(Protocol):
    async def read(self, stream: str, group: str, consumer: str, *, count: int,
                   message_type: type, block_ms: int | None = None) -> list[Delivery]: ...

    async def take_over(self, stream: str, group: str, consumer: str, *, count: int,
                        message_type: type, idle_ms: int, block_ms: int | None = None) -> list[Delivery]: ...

    async def ack(self, deliveries: list[Delivery], group: str) -> None: ...

    async def dead_letter(self, delivery: Delivery, group: str, error: str, *, worker: str = "") -> None: ...

    async def trained_pairs(self, pairs: list[Pair]) -> set[Pair]: ...

    async def record_trained(self, pairs: list[Pair], ttl_s: int) -> None: ...

    async def last(self, stream: str, message_type: type) -> tuple[str, Message] | None: ...

    async def set_learner_step(self, fields: dict[str, Any]) -> None: ...


class StepState(Protocol):
    """What the loop reads of :class:`catq.learner.checkpoint.TrainingState`."""

    step: int
    policy_version: int


class LearnerTrainer(Protocol):
    """The training side, called from a thread (all of it synchronous)."""

    state: StepState
    device: Any

    @property
    def trained_id_set(self) -> set[str]: ...

    def prepare(self, message: ScoredGroup) -> Any: ...

    def train(self, groups: list, entry_ids: list[str], should_stop=None) -> dict: ...

    def snapshot(self) -> Any: ...

    def save_checkpoint(self, snapshot: Any = None) -> Path: ...

    def published_weights(self, snapshot: Any = None) -> dict: ...

    def write_weights(self, snapshot: Any = None) -> Path: ...


class ResultSink(Protocol):
    async def update(self, prompt_id: str, **fields: Any) -> None: ...


class Broadcaster(Protocol):
    async def push(self, weights: dict, version: int) -> list[str]: ...

    async def aclose(self) -> None: ...
