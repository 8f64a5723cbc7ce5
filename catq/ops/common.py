"""What every operator command shares: a Bus that gives up on an unreachable Redis in a few
seconds (:data:`CLI_RECONNECT_S`), one-line errors that never show a URL's password
(:func:`catq.log.redact`), and :func:`_run`, which turns an unreachable Redis into exit 1.
"""

from __future__ import annotations

import asyncio
import sys

from catq.bus import Bus, is_retryable
from catq.config import Config
from catq.log import redact, setup_cli_logging

CLI_RECONNECT_S = 3.0
"""How long a CLI command retries an unreachable Redis before giving up."""


def _bus(config: Config) -> Bus:
    setup_cli_logging()
    return Bus(config.redis_url, config.run, config.bus, reconnect_timeout_s=CLI_RECONNECT_S)


def _fail(message: str, code: int = 1) -> int:
    print(f"catq: {redact(message)}", file=sys.stderr)
    return code


def _run(config: Config, coro) -> int:
    """asyncio.run a command; an unreachable Redis is a one-line error, not a traceback."""
    try:
        return asyncio.run(coro)
    except Exception as exc:
        if not is_retryable(exc):
            raise
        return _fail(f"cannot reach Redis at {redact(config.redis_url)}: {exc}")
