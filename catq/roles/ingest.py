"""The ingest role: the HTTP API that admits prompts (:mod:`catq.ingest`), served under
:func:`catq.runtime.run_role`."""

from __future__ import annotations

from catq.config import Config
from catq.ingest import check_exposure, ingest_token, serve
from catq.runtime import run_role


async def run(config: Config) -> None:
    """Serve the ingest API until SIGTERM/SIGINT."""
    check_exposure(config.ingest, ingest_token(config.ingest))
    await run_role(config, "ingest", serve)
