"""Serving catq's engine: the aiohttp app (routes, SGLang's API-key rule, 400s for refusals),
loading a model into an :class:`~catq.engines.server.Engine`, and `catq engine` itself."""

from __future__ import annotations

import argparse
import hmac
import os
import time
from pathlib import Path

import structlog
from aiohttp import web
from pydantic import ValidationError

from catq.engines import lora_http
from catq.engines.batching import BatchGenerator
from catq.engines.http_body import BadRequest
from catq.engines.server import Engine

log = structlog.get_logger()

ENGINE_KEY = web.AppKey("engine", object)
API_KEY_ENV = "CATQ_ENGINE_API_KEY"
ADMIN_API_KEY_ENV = "CATQ_ENGINE_ADMIN_API_KEY"
"""Where `catq engine` reads its keys when --api-key / --admin-api-key are not given (keys in
argv are visible to every local user in `ps`)."""


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts[:5])


@web.middleware
async def errors_as_400(request: web.Request, handler):
    """Every refusal as SGLang shapes it: 400 {"error": {"message": ...}}; the server goes on."""
    try:
        return await handler(request)
    except ValidationError as exc:
        message = _describe(exc)
    except (BadRequest, ValueError) as exc:  # LoraError is a ValueError
        message = str(exc)
    log.info("bad request", path=request.path, error=message)
    return web.json_response({"error": {"message": message}}, status=400)


ADMIN_ROUTES = frozenset({"/update_weights_from_disk", "/pause_generation", "/continue_generation",
                          "/flush_cache", "/init_weights_update_group", "/update_weights_from_distributed",
                          "/destroy_weights_update_group", *lora_http.ROUTES})
"""Routes SGLang marks ADMIN_OPTIONAL: with an admin key set, only the admin key opens them."""


def request_allowed(path: str, authorization: str | None, api_key: str, admin_api_key: str) -> bool:
    """SGLang's rule (srt/utils/auth.py): /health* is always open; an admin route needs the admin
    key when one is set, else the API key when one is set; any other route needs the API key
    when one is set."""
    if path.startswith("/health"):
        return True
    expected = (admin_api_key or api_key) if path in ADMIN_ROUTES else api_key
    if not expected:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token, expected)


def api_key_middleware(api_key: str, admin_api_key: str):
    @web.middleware
    async def check_key(request: web.Request, handler):
        if request_allowed(request.path, request.headers.get("Authorization"), api_key, admin_api_key):
            return await handler(request)
        return web.json_response({"error": "Unauthorized"}, status=401)

    return check_key


def build_app(engine: Engine, *, api_key: str = "", admin_api_key: str = "") -> web.Application:
    middlewares = [api_key_middleware(api_key, admin_api_key), errors_as_400]
    app = web.Application(middlewares=middlewares, client_max_size=64 * 1024 * 1024)
    app[ENGINE_KEY] = engine
    r = app.router
    r.add_route("POST", "/generate", engine.generate)
    r.add_route("PUT", "/generate", engine.generate)
    r.add_post("/update_weights_from_disk", engine.update_weights_from_disk)
    r.add_post("/init_weights_update_group", engine.init_weights_update_group)
    r.add_post("/update_weights_from_distributed", engine.update_weights_from_distributed)
    r.add_post("/destroy_weights_update_group", engine.destroy_weights_update_group)
    r.add_get("/model_info", engine.model_info)
    r.add_get("/get_model_info", engine.model_info)
    r.add_get("/server_info", engine.server_info)
    r.add_get("/get_server_info", engine.server_info)
    r.add_get("/health", engine.health)
    r.add_get("/health_generate", engine.health_generate)
    r.add_get("/v1/models", engine.models)
    r.add_post("/v1/chat/completions", engine.chat_completions)
    r.add_post("/pause_generation", engine.pause_generation)
    r.add_post("/continue_generation", engine.continue_generation)
    lora_http.add_routes(r, engine)
    r.add_route("GET", "/flush_cache", engine.flush_cache)
    r.add_post("/flush_cache", engine.flush_cache)

    async def lifecycle(app: web.Application):
        engine.scheduler.start()
        yield
        await engine.scheduler.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def load_engine(model: str, *, device: str = "auto", weights_dir: str | None = None,
                max_batch: int = 64, seed: int = 0, weight_version: str = "default",
                lora_args: argparse.Namespace | None = None) -> Engine:
    """Load the model and build an Engine (not yet serving); ``lora_args``: the LoRA server
    flags (catq/engines/lora.py), when given."""
    from catq.engines.models import (
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_model_path,
    )

    device = resolve_device(device)
    path = resolve_model_path(model)
    lm = load_causal_lm(str(path), device=device)
    generator = BatchGenerator(lm, load_tokenizer(str(path)), seed=seed)
    engine = Engine(generator, model_path=str(path), served_name=model,
                    weights_dir=Path(weights_dir) if weights_dir else None, max_batch=max_batch)
    engine.scheduler.weight_version = weight_version
    if lora_args is not None:
        from catq.engines.lora import LoraManager

        engine.lora = LoraManager.from_args(lm, lora_args, model_path=str(path), served_name=model,
                                            weights_dir=engine.weights_dir)
        generator.lora = engine.lora
    return engine


def engine_command(args: argparse.Namespace) -> int:
    """`catq engine`: load the model, then serve until SIGTERM/SIGINT."""
    from catq.log import setup_logging

    setup_logging("engine")
    started = time.time()
    engine = load_engine(args.model, device=args.device, weights_dir=args.weights_dir,
                         max_batch=args.max_batch, seed=getattr(args, "seed", 0),
                         weight_version=args.weight_version, lora_args=args)
    log.info("engine ready", model=engine.model_path, device=str(engine.gen.device),
             load_s=round(time.time() - started, 2), host=args.host, port=args.port,
             weights_dir=str(engine.weights_dir))
    api_key = args.api_key or os.environ.get(API_KEY_ENV, "")
    admin_api_key = args.admin_api_key or os.environ.get(ADMIN_API_KEY_ENV, "")
    app = build_app(engine, api_key=api_key, admin_api_key=admin_api_key)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0
