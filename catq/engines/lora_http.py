"""The HTTP side of catq's engine's LoRA API (catq/engines/lora.py has the what and why):
``/load_lora_adapter``, ``/unload_lora_adapter`` and ``/update_weight_version``, with SGLang's
request fields (``LoadLoRAAdapterReqInput``, ``UnLoadLoRAAdapterReqInput``,
``UpdateWeightVersionReqInput``) and replies."""

from __future__ import annotations

import asyncio

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from catq.engines.http_body import read_json as _json
from catq.engines.lora import NOT_ENABLED, LoraError

log = structlog.get_logger()

ROUTES = ("/load_lora_adapter", "/unload_lora_adapter", "/update_weight_version")
"""Admin routes (SGLang marks them ADMIN_OPTIONAL)."""


class LoadLoRAAdapterIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # lora_id, rid: SGLang's internal fields
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoRAAdapterIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str


class UpdateWeightVersionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    new_version: str
    abort_all_requests: bool = True


def _reply(engine, success: bool, error: str = "") -> web.Response:
    lora = engine.lora
    body = {"rid": None, "http_worker_ipc": None, "success": success, "error_message": error,
            "loaded_adapters": lora.loaded() if lora is not None else None}
    return web.json_response(body, status=200 if success else 400)


async def load_lora_adapter(engine, request: web.Request) -> web.Response:
    body = LoadLoRAAdapterIn.model_validate(await _json(request))
    if engine.lora is None:
        return _reply(engine, False, NOT_ENABLED)
    async with engine.lora_lock:
        try:
            adapter = await asyncio.to_thread(engine.lora.load, body.lora_name, body.lora_path, body.pinned)
        except LoraError as exc:
            log.info("LoRA adapter refused", lora_name=body.lora_name, lora_path=body.lora_path, error=str(exc))
            return _reply(engine, False, str(exc))
    log.info("LoRA adapter loaded", lora_name=adapter.name, lora_path=adapter.path, rank=adapter.rank,
             version=adapter.version)
    return _reply(engine, True)


async def unload_lora_adapter(engine, request: web.Request) -> web.Response:
    body = UnloadLoRAAdapterIn.model_validate(await _json(request))
    if engine.lora is None:
        return _reply(engine, False, NOT_ENABLED)
    async with engine.lora_lock:
        try:
            await engine.lora.unload(body.lora_name)
        except LoraError as exc:
            return _reply(engine, False, str(exc))
    log.info("LoRA adapter unloaded", lora_name=body.lora_name)
    return _reply(engine, True)


async def update_weight_version(engine, request: web.Request) -> web.Response:
    body = UpdateWeightVersionIn.model_validate(await _json(request))
    if body.abort_all_requests:
        engine.scheduler.abort_all("aborted by /update_weight_version")
    engine.scheduler.weight_version = body.new_version
    log.info("weight version set", weight_version=body.new_version)
    return web.json_response({"success": True, "message": f"Weight version updated to {body.new_version}",
                              "new_version": body.new_version})


def add_routes(router: web.UrlDispatcher, engine) -> None:
    for path, handler in zip(ROUTES, (load_lora_adapter, unload_lora_adapter, update_weight_version), strict=True):
        router.add_post(path, _bound(handler, engine))


def _bound(handler, engine):
    async def handle(request: web.Request) -> web.Response:
        return await handler(engine, request)

    return handle
