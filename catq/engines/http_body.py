"""Reading a request body for catq's engine: the one error type every handler turns into a 400,
and JSON parsing that raises it. Its own module so the server and its LoRA routes
(lora_http.py) share it without importing each other."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class BadRequest(ValueError):
    """A request the engine refuses with HTTP 400."""


async def read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
