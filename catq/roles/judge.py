"""The judge role (the judge: rewards for each referenced group): a stream role, run by :func:`catq.runtime.run_worker` with
the handler :func:`catq.teacher.judge.build_judge_handler` builds."""

from __future__ import annotations

from catq.config import Config
from catq.runtime import run_worker
from catq.teacher.judge import build_judge_handler


async def run(config: Config) -> None:
    await run_worker(config, "judge", build_judge_handler)
