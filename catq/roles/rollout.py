"""The rollout role (rollout: a group of policy samples for each prompt): a stream role, run by :func:`catq.runtime.run_worker` with
the handler :func:`catq.teacher.rollout.build_rollout_handler` builds."""

from __future__ import annotations

from catq.config import Config
from catq.runtime import run_worker
from catq.teacher.rollout import build_rollout_handler


async def run(config: Config) -> None:
    await run_worker(config, "rollout", build_rollout_handler)
