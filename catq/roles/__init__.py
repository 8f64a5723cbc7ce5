"""Roles in one home: each process role's wiring, one module a role, registered by name.

    catq/roles/<role>.py    ``run(config)``: what ``catq worker ROLE`` runs for that role

There is one way to start a role: ``catq worker ROLE`` (what `catq up` runs, and compose), which
calls :func:`worker_command`; ``python -m workers.<role>`` is the same through a thin entry point
that imports this package. The logic a role runs lives below it: ``catq.teacher`` (rollout,
anchor, judge handlers), ``catq.ingest`` (the HTTP API), ``catq.learner`` (the learner loop, the
weight syncer); a role module here only wires it to :mod:`catq.runtime`. The engine container
(``workers/engine.py``) runs ``catq engine``: :func:`catq.engines.app.engine_command`.

Each role's module is imported only when that role starts (:data:`ROLE_MODULES`), so starting
one role never imports the heavy modules of another (torch for the learner, the aiohttp server
for ingest).

Who may import it: ``catq.cli`` (``catq worker``), ``workers/*`` and tests. It imports downward
only (``catq.runtime``, ``catq.teacher``, ``catq.learner``, ``catq.ingest``); nothing in ``catq``
imports ``workers``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import Awaitable, Callable

from catq.config import Config
from catq.topology import ROLES

RoleRun = Callable[[Config], Awaitable[None]]

ROLE_MODULES = {name: f"catq.roles.{name}" for name in ROLES}
"""Role name -> the module whose ``run(config)`` starts it."""


class UnknownRoleError(ValueError):
    pass


def role_entry(name: str) -> RoleRun:
    """The ``run(config)`` of role ``name``, from its module under ``catq/roles/``."""
    if name not in ROLES:
        raise UnknownRoleError(f"unknown role {name!r}; roles: {', '.join(ROLES)}")
    return importlib.import_module(ROLE_MODULES[name]).run


def start_role(name: str, config: Config) -> None:
    """Run one role in this process until it is told to stop (SIGTERM/SIGINT)."""
    asyncio.run(role_entry(name)(config))


def worker_command(args: argparse.Namespace, config: Config) -> int:
    """`catq worker ROLE`."""
    start_role(args.role, config)
    return 0
