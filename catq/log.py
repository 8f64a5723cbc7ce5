"""The logging setup of every catq process (structlog): workers with ``setup_logging``, CLI
commands with ``setup_cli_logging``.

Every line carries the role and worker id; bind ``prompt_id`` where one is known
(``log.bind(prompt_id=...)``). Lines are JSON when stdout is not a terminal (containers, `catq up`
children), coloured key=value on a terminal.

Secrets never reach a line: :func:`redact` masks the password of any URL (``redis://:secret@host``
→ ``redis://:***@host``), bearer tokens, ``api_key='...'``-style values and ``--api-key KEY``
flags; both setups run :func:`redact_secrets` on every event, which also masks the value of any
field whose name says it is a secret (token, api_key, password...). Error messages that name a Redis URL pass it through :func:`redact` themselves.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys

import structlog

URL_PASSWORD_RE = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+(?=@)")
BEARER_RE = re.compile(r"(?P<head>\bBearer\s+)[^\s'\"]+", re.IGNORECASE)
ASSIGNED_SECRET_RE = re.compile(
    r"(?P<head>\b\w*(?:api_key|apikey|password|passwd|secret|token)(?:\s*=\s*['\"]?|['\"]\s*:\s*['\"]?))"
    r"(?!None\b|\*\*\*)[^'\"\s,)}\]]+", re.IGNORECASE)
"""``api_key='sk-...'``, ``"token": "..."`` (a quoted key: prose such as "without a token: set
X" is left alone): SGLang prints its server args, keys included."""
SECRET_FLAG_RE = re.compile(r"(?P<head>--[\w-]*(?:api-key|password|token)(?:=|\s+))[^\s'\"]+", re.IGNORECASE)
"""``--api-key KEY`` in a printed command line."""
SECRET_FIELD_RE = re.compile(r"(^|_)(token|api_key|apikey|password|passwd|secret|authorization)$", re.IGNORECASE)
"""Field names whose value is a secret: ``token``, ``admin_api_key``... (not ``max_new_tokens``)."""
MASK = "***"


def redact(text: str) -> str:
    """``text`` with URL passwords, bearer tokens and ``<secret name>=value`` values replaced by
    ``***``."""
    for pattern in (URL_PASSWORD_RE, BEARER_RE, ASSIGNED_SECRET_RE, SECRET_FLAG_RE):
        text = pattern.sub(lambda m: m.group("head") + MASK, text)
    return text


def redact_secrets(_logger, _method, event_dict: dict) -> dict:
    """structlog processor: mask secret-named fields, and secrets inside every string value."""
    for key, value in event_dict.items():
        if SECRET_FIELD_RE.search(key) and value:
            event_dict[key] = MASK
        elif isinstance(value, str):
            event_dict[key] = redact(value)
        elif isinstance(value, (list, tuple)):
            event_dict[key] = [redact(v) if isinstance(v, str) else v for v in value]
    return event_dict


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
            redact_secrets,  # after format_exc_info: tracebacks are redacted too
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


def setup_cli_logging() -> None:
    """CLI commands print results on stdout; library warnings (Redis retries) go to stderr."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info,
                    redact_secrets, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        # sys.stderr looked up per logger, not bound once: tests swap and close it.
        logger_factory=lambda *_: structlog.PrintLogger(file=sys.stderr),
    )
