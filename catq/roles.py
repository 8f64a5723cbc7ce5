"""Which code runs each process role: `catq worker ROLE` and `workers/<role>.py` both come here.

Each role is an ``async def run(config: Config) -> None`` in the library; the table names it by
import path so starting one role never imports the heavy modules of another (torch for the
learner, aiohttp server for ingest).
"""

from __future__ import annotations

import asyncio
import importlib

from catq.config import Config

ROLES: dict[str, str] = {
    "ingest": "catq.ingest:run",
    "rollout": "catq.teacher.rollout:run",
    "anchor": "catq.teacher.anchor:run",
    "judge": "catq.teacher.judge:run",
    "learner": "catq.learner.worker:run",
    "syncer": "catq.learner.syncer:run",
}


class UnknownRoleError(ValueError):
    pass


def role_entry(name: str):
    if name not in ROLES:
        raise UnknownRoleError(f"unknown role {name!r}; roles: {', '.join(ROLES)}")
    module, func = ROLES[name].split(":")
    return getattr(importlib.import_module(module), func)


def run_role(name: str, config: Config) -> None:
    """Run one role in this process until it is told to stop (SIGTERM/SIGINT)."""
    asyncio.run(role_entry(name)(config))
