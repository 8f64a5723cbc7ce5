"""One logging setup for every catq process (structlog).

Every line carries the role and worker id; bind ``prompt_id`` where one is known
(``log.bind(prompt_id=...)``). Lines are JSON when stdout is not a terminal (containers, `catq up`
children), coloured key=value on a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import structlog


def default_worker_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def setup_logging(role: str, worker_id: str | None = None, level: str | None = None) -> structlog.BoundLogger:
    """Configure structlog for this process and return a logger bound to role and worker id."""
    level_name = (level or os.environ.get("CATQ_LOG_LEVEL", "INFO")).upper()
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stdout.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        # No file argument: print to whatever sys.stdout is at write time, so a logger set up
        # before stdout is swapped (tests capture it) never writes to a closed file.
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(role=role, worker=worker_id or default_worker_id(role))
    return structlog.get_logger()


def get_logger(**bound) -> structlog.BoundLogger:
    return structlog.get_logger().bind(**bound)
