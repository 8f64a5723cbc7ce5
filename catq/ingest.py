"""The ingest role: an HTTP front door that puts prompts on the ``prompts`` stream.

    POST /v1/prompts       {"text": "...", "task": "math"} | {"prompts": [...]} | [...]  → 202 {"ids"}
    GET  /v1/prompts/{id}  → status and whatever result the pipeline has written (404 if unknown)
    GET  /healthz          → 200 when Redis answers, else 503 (no token needed)
    GET  /metrics          → Prometheus text: stream lengths, pending per group, dead letters

Run it with ``catq worker ingest`` or ``python workers/ingest.py --config F``. When the environment
variable named by ``ingest.token_env`` is set, every route but /healthz needs
``Authorization: Bearer <token>``.

Validation is one pure function, :func:`parse_prompts`, shared with ``catq submit``: the whole
request is checked before anything is enqueued, and each problem is named with its position.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from typing import Any

from aiohttp import web

from catq.bus import Bus
from catq.config import Config, IngestConfig
from catq.log import default_worker_id, setup_logging
from catq.messages import TASKS, ChatMessage, Prompt, new_prompt_id
from catq.results import ResultStore
from catq.runtime import heartbeat_loop, install_stop_signals

ROLES = ("system", "user", "assistant")


class PromptRequestError(ValueError):
    """A request that cannot be enqueued; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_prompts(body: Any, limits: IngestConfig, *, default_task: str | None = None,
                  check_batch: bool = True) -> list[Prompt]:
    """Turn a decoded JSON request into Prompts, or raise PromptRequestError naming the problem.

    ``body`` is one prompt object, ``{"prompts": [...]}``, or a list of prompt objects; a prompt
    object is ``{"text": str}`` or ``{"messages": [{"role", "content"}, ...]}`` plus
    ``"task": "math" | "open"`` (``default_task`` when absent, and required when that is None).
    """
    if isinstance(body, dict) and "prompts" in body:
        extra = set(body) - {"prompts"}
        if extra:
            raise PromptRequestError(f"unknown key {sorted(extra)[0]!r} next to 'prompts'")
        items, where = body["prompts"], "prompts"
        if not isinstance(items, list):
            raise PromptRequestError("'prompts' must be a list")
    elif isinstance(body, dict):
        items, where = [body], None
    elif isinstance(body, list):
        items, where = body, "prompts"
    else:
        raise PromptRequestError("body must be a JSON object or a list of objects")
    if not items:
        raise PromptRequestError("no prompts given")
    if check_batch and len(items) > limits.max_batch:
        raise PromptRequestError(f"{len(items)} prompts in one request; the limit is {limits.max_batch}", 413)
    return [_parse_one(item, f"{where}[{i}]" if where else "prompt", limits, default_task)
            for i, item in enumerate(items)]


def _parse_one(item: Any, where: str, limits: IngestConfig, default_task: str | None) -> Prompt:
    if not isinstance(item, dict):
        raise PromptRequestError(f"{where}: must be an object, got {_json_type(item)}")
    unknown = set(item) - {"text", "messages", "task"}
    if unknown:
        raise PromptRequestError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    task = item.get("task", default_task)
    if task is None:
        raise PromptRequestError(f"{where}: missing 'task' (one of {', '.join(TASKS)})")
    if task not in TASKS:
        raise PromptRequestError(f"{where}.task: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if ("text" in item) == ("messages" in item):
        raise PromptRequestError(f"{where}: give exactly one of 'text' or 'messages'")
    if "text" in item:
        messages = [ChatMessage("user", _nonempty_text(item["text"], f"{where}.text"))]
    else:
        messages = _parse_messages(item["messages"], f"{where}.messages")
    size = sum(len(m.content) for m in messages)
    if size > limits.max_text_chars:
        raise PromptRequestError(f"{where}: text is {size} characters; the limit is {limits.max_text_chars}", 413)
    return Prompt(prompt_id=new_prompt_id(), task=task, messages=messages)


def _parse_messages(value: Any, where: str) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise PromptRequestError(f"{where}: must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise PromptRequestError(f"{where}[{i}]: must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PromptRequestError(f"{where}[{i}].role: {m['role']!r} is not one of {', '.join(ROLES)}")
        messages.append(ChatMessage(m["role"], _nonempty_text(m["content"], f"{where}[{i}].content")))
    if not any(m.role == "user" for m in messages):
        raise PromptRequestError(f"{where}: needs at least one 'user' message")
    return messages


def _nonempty_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PromptRequestError(f"{where}: must be a string, got {_json_type(value)}")
    if not value.strip():
        raise PromptRequestError(f"{where}: is empty")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


async def enqueue(bus: Bus, results: ResultStore, prompts: list[Prompt]) -> list[str]:
    """Record each prompt as "queued", then publish it (in that order, so a fast pipeline's later
    status is never overwritten by "queued")."""
    for prompt in prompts:
        await results.update(prompt.prompt_id, status="queued", task=prompt.task, question=prompt.question)
        await bus.publish("prompts", prompt)
    return [p.prompt_id for p in prompts]


# -- the HTTP app ---------------------------------------------------------------------------------

BUS_KEY = web.AppKey("bus", Bus)
RESULTS_KEY = web.AppKey("results", ResultStore)
LIMITS_KEY = web.AppKey("limits", IngestConfig)


def make_app(bus: Bus, results: ResultStore, limits: IngestConfig, token: str | None) -> web.Application:
    """The ingest app; ``token`` (if non-empty) is required as a Bearer token except on /healthz."""
    middlewares = [_auth_middleware(token)] if token else []
    app = web.Application(middlewares=middlewares,
                          client_max_size=limits.max_batch * limits.max_text_chars * 4 + 65536)
    app[BUS_KEY], app[RESULTS_KEY], app[LIMITS_KEY] = bus, results, limits
    app.router.add_post("/v1/prompts", submit_prompts)
    app.router.add_get("/v1/prompts/{prompt_id}", get_prompt)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def _auth_middleware(token: str):
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path != "/healthz":
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(401, "missing or wrong 'Authorization: Bearer <token>'")
        return await handler(request)

    return auth


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


async def submit_prompts(request: web.Request) -> web.Response:
    try:
        body = json.loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"invalid JSON: {exc}")
    try:
        prompts = parse_prompts(body, request.app[LIMITS_KEY], default_task="math")
    except PromptRequestError as exc:
        return _error(exc.status, str(exc))
    ids = await enqueue(request.app[BUS_KEY], request.app[RESULTS_KEY], prompts)
    return web.json_response({"ids": ids}, status=202)


async def get_prompt(request: web.Request) -> web.Response:
    result = await request.app[RESULTS_KEY].get(request.match_info["prompt_id"])
    if result is None:
        return _error(404, f"unknown prompt id {request.match_info['prompt_id']!r}")
    return web.json_response(result)


async def healthz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[BUS_KEY].redis.ping(), timeout=2)
    except Exception as exc:
        return web.json_response({"status": "redis unreachable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    bus = request.app[BUS_KEY]
    return web.Response(text=render_metrics(bus.run, await bus.stats()),
                        content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def render_metrics(run: str, stats: dict[str, Any]) -> str:
    """Prometheus text exposition of :meth:`Bus.stats`."""
    lines = [
        "# HELP catq_stream_length Entries currently in a stream.",
        "# TYPE catq_stream_length gauge",
    ]
    lines += [f'catq_stream_length{{run="{run}",stream="{s}"}} {v["length"]}' for s, v in stats.items()]
    groups = [(s, g) for s, v in stats.items() for g in v["groups"]]
    lines += ["# HELP catq_group_pending Entries delivered to a consumer group and not yet acknowledged.",
              "# TYPE catq_group_pending gauge"]
    lines += [f'catq_group_pending{{run="{run}",stream="{s}",group="{g["group"]}"}} {g["pending"]}'
              for s, g in groups]
    lines += ["# HELP catq_group_lag Entries not yet delivered to a consumer group.",
              "# TYPE catq_group_lag gauge"]
    lines += [f'catq_group_lag{{run="{run}",stream="{s}",group="{g["group"]}"}} {g["lag"]}'
              for s, g in groups if g.get("lag") is not None]
    lines += ["# HELP catq_group_consumers Consumers registered in a consumer group.",
              "# TYPE catq_group_consumers gauge"]
    lines += [f'catq_group_consumers{{run="{run}",stream="{s}",group="{g["group"]}"}} {len(g["consumers"])}'
              for s, g in groups]
    dead = stats.get("dead", {}).get("length", 0)
    lines += ["# HELP catq_dead_letters Entries in the dead-letter stream.",
              "# TYPE catq_dead_letters gauge", f'catq_dead_letters{{run="{run}"}} {dead}']
    return "\n".join(lines) + "\n"


async def run(config: Config) -> None:
    """Serve the ingest API until SIGTERM/SIGINT."""
    worker_id = default_worker_id("ingest")
    log = setup_logging("ingest", worker_id)
    stop = asyncio.Event()
    install_stop_signals(stop)
    bus = Bus(config.redis_url, config.run, config.bus)
    token = os.environ.get(config.ingest.token_env) or None
    app = make_app(bus, ResultStore(bus, config.bus.result_ttl_s), config.ingest, token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.ingest.host, config.ingest.port)
    await site.start()
    heartbeat = asyncio.create_task(heartbeat_loop(bus, "ingest", worker_id, config.worker.heartbeat_s))
    log.info("ingest listening", host=config.ingest.host, port=config.ingest.port, auth=bool(token))
    try:
        await stop.wait()
    finally:
        log.info("ingest stopping")
        heartbeat.cancel()
        await asyncio.gather(heartbeat, return_exceptions=True)
        await runner.cleanup()
        await bus.close()
