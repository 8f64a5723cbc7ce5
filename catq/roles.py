"""Which code runs each process role. There is one way to start a role: ``catq worker ROLE``
(what `catq up` runs, and compose). It runs ``workers/<role>.py``'s ``run``, which that module
imports from the library, so a reader clicks through ``workers/rollout.py`` to
``catq.teacher.rollout.run``. ``python -m workers.rollout`` does the same.

Each role's module is imported only when that role starts, so starting one role never imports
the heavy modules of another (torch for the learner, the aiohttp server for ingest).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import Awaitable, Callable

from catq.config import Config
from catq.topology import ROLES

RoleRun = Callable[[Config], Awaitable[None]]


class UnknownRoleError(ValueError):
    pass


def role_entry(name: str) -> RoleRun:
    """The ``run(config)`` of role ``name``, as its ``workers/<name>.py`` imports it."""
    if name not in ROLES:
        raise UnknownRoleError(f"unknown role {name!r}; roles: {', '.join(ROLES)}")
    return importlib.import_module(f"workers.{name}").run


def start_role(name: str, config: Config) -> None:
    """Run one role in this process until it is told to stop (SIGTERM/SIGINT)."""
    asyncio.run(role_entry(name)(config))


def worker_command(args: argparse.Namespace, config: Config) -> int:
    """`catq worker ROLE`."""
    start_role(args.role, config)
    return 0
