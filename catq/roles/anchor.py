"""The anchor role (the anchor: a reference answer (or rubric) for each rolled-out group): a stream role, run by :func:`catq.runtime.run_worker` with
the handler :func:`catq.teacher.anchor.build_anchor_handler` builds."""

from __future__ import annotations

from catq.config import Config
from catq.runtime import run_worker
from catq.teacher.anchor import build_anchor_handler


async def run(config: Config) -> None:
    await run_worker(config, "anchor", build_anchor_handler)
