"""What a stream role's worker loop (:class:`catq.runtime._WorkerLoop`) needs of a transport.

:class:`catq.bus.Bus` implements it over Redis streams; a second transport (NATS, Kafka, an
in-process queue for tests) would implement these methods, with the same delivery rules: at
least once, processed effectively once (an output is written with the ack of its input),
failures counted per entry, exhausted entries dead-lettered.
"""

from __future__ import annotations

from typing import Protocol

from catq.bus.entries import Delivery, Output
from catq.config import BusConfig


class StreamBus(Protocol):
    config: BusConfig
    """Delivery limits (``max_attempts``, ``claim_idle_ms``, ``block_ms``)."""

    async def read(self, stream: str, group: str, consumer: str, *, count: int,
                   message_type: type, block_ms: int | None = None) -> list[Delivery]:
        """Up to ``count`` deliveries for ``consumer`` of ``group``: entries left by dead
        consumers first, then new ones; undecodable, exhausted and already-done entries are
        handled here and never returned."""
        ...

    async def complete(self, delivery: Delivery, group: str, outputs: list[Output], *,
                       prompt_id: str | None = None) -> None:
        """Write the outputs and acknowledge the delivery, atomically; only the ack when this
        work was done already."""
        ...

    async def record_failure(self, delivery: Delivery, group: str) -> int:
        """Count one handler failure on this entry; returns the failures so far."""
        ...

    async def dead_letter(self, delivery: Delivery, group: str, error: str, *, worker: str = "") -> None:
        """Give up on the entry: move it to ``dead`` with ``error``, and acknowledge it."""
        ...

    async def keep_alive(self, stream: str, group: str, consumer: str, entry_ids: list[str]) -> None:
        """Keep entries this consumer still works on from being reclaimed by another."""
        ...

    async def forget_consumer(self, stream: str, group: str, consumer: str) -> bool:
        """Forget a stopped consumer that holds nothing; True if it was forgotten."""
        ...

    async def record_handled(self, role: str, outcome: str, seconds: float) -> None:
        """Count one finished message (handled, failed, dead) for ``catq top``."""
        ...
