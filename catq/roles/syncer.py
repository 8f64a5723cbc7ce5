"""The syncer role: keeps the policy engines on the newest published weights
(:class:`catq.learner.syncer.Syncer`), served under :func:`catq.runtime.run_role`."""

from __future__ import annotations

from catq.config import Config
from catq.learner.syncer import ROLE, serve


async def run(config: Config) -> None:
    """Run the syncer until SIGTERM/SIGINT."""
    from catq.runtime import run_role

    await run_role(config, ROLE, serve)
