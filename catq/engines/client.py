"""Async client for SGLang's native HTTP API (and catq's engine, which speaks the same subset).

    async with EngineClient("http://127.0.0.1:30000") as engine:
        [completion] = await engine.generate(prompt_ids, max_new_tokens=64, temperature=0)

Prompts go in as token ids: the caller applies the chat template (``ChatTokenizer``) so the ids
the learner trains on are exactly those the engine generated from. ``Completion.logprobs`` are
the behaviour log-probs of the sampled tokens: raw-logit log-softmax on catq's engine (see
``catq.engines.sampling``; start SGLang with ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` to match).
``top_logprobs_num`` / ``token_ids_logprob`` (SGLang's names) ask for other tokens' log-probs at
each output position: ``Completion.top_logprobs`` / ``Completion.token_ids_logprobs``.

Retries: transport errors (connection refused/reset, timeouts) and HTTP 5xx are retried with
exponential backoff, stopping at ``max_attempts`` or when ``timeout_s`` (for the whole call,
retries included) runs out. 4xx are never retried: ``EngineError`` carries the server's message.
401 and 403 raise ``EngineAuthError``, a configuration error (a missing or wrong key), never a
property of one prompt: roles stop on it instead of dead-lettering work.

Keys: SGLang's ``--api-key`` guards every route but /health*; ``--admin-api-key``, when set, is
the only key for weight updates and pause/continue. The client sends ``api_key`` on ordinary
routes and ``admin_api_key or api_key`` on those.

Context: SGLang refuses a prompt plus ``max_new_tokens`` longer than the model's context (HTTP
400) unless started with ``--allow-auto-truncate``; the client reads the context length once
(``/v1/models``' ``max_model_len``) and lowers ``max_new_tokens`` to fit, as catq's engine used
to do silently.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from catq.config import ConfigError

RETRY_BACKOFF_S = 0.5
"""First wait between attempts; doubles each time, capped by the time left."""


class EngineError(Exception):
    """An engine call that failed: a 4xx (at once) or retries exhausted."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message

    @property
    def refused(self) -> bool:
        """The engine answered 4xx: this request can never work, whatever the retries."""
        return self.status is not None and 400 <= self.status < 500


def parse_version(weight_version: str | None) -> int:
    """An engine's reported weight_version as a policy version: "7" or "v7" -> 7;
    None, "default" or anything unnumbered -> 0 (the initial weights)."""
    if not weight_version:
        return 0
    text = str(weight_version).strip().lower().removeprefix("v")
    return int(text) if text.isdigit() else 0


@dataclass
class Completion:
    text: str
    output_ids: list[int]
    logprobs: list[float] | None
    """One per output token (raw-logit log-probs) when return_logprob, else None."""
    finish_reason: str
    """"stop" (eos, stop token or stop string), "length" or "abort"."""
    prompt_tokens: int
    completion_tokens: int
    weight_version: str | None
    """The weights that produced it, as the engine reports them ("default" before any update)."""
    top_logprobs: list[dict[int, float]] | None = None
    """Per output position, {token id: logprob} of the likeliest ``top_logprobs_num`` tokens
    (SGLang's ``output_top_logprobs``); None when not asked for."""
    token_ids_logprobs: list[dict[int, float]] | None = None
    """Per output position, {token id: logprob} of the ``token_ids_logprob`` tokens (SGLang's
    ``output_token_ids_logprobs``); None when not asked for."""

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"


class EngineAuthError(ConfigError):
    """The engine refused our key (HTTP 401/403): fix the configuration; no retry helps."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(
            f"engine {url} answered HTTP {status} ({message}): it needs an API key that catq does "
            "not send or that is wrong; set engines.api_key_env / engines.admin_api_key_env (or "
            "the CATQ_ENGINE_API_KEY / CATQ_ENGINE_ADMIN_API_KEY variables) to the engine's keys"
        )
        self.status = status


def is_retryable_status(status: int) -> bool:
    return status >= 500


RETRYABLE_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)
"""Transport failures worth another attempt (refused, reset, disconnected, timed out)."""


class HttpJsonClient:
    """JSON over HTTP with bounded retries; shared by EngineClient and ChatClient."""

    def __init__(self, base_url: str, *, timeout_s: float, max_attempts: int,
                 headers: dict[str, str] | None = None, retry_status=is_retryable_status):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self._headers = headers or {}
        self._retry_status = retry_status
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def request(self, method: str, path: str, payload: Any = None, *,
                      headers: dict[str, str] | None = None) -> Any:
        """The decoded JSON reply (text when not JSON); raises EngineError (EngineAuthError on
        401/403)."""
        deadline = time.monotonic() + self.timeout_s
        last_error = "no attempt made"
        for attempt in range(1, self.max_attempts + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                status, body = await self._once(method, path, payload, left, headers)
            except RETRYABLE_ERRORS as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if status < 400:
                    return body
                message = _error_message(body)
                if status in (401, 403):
                    raise EngineAuthError(self.base_url, status, message)
                if not self._retry_status(status):
                    raise EngineError(message, status)
                last_error = f"HTTP {status}: {message}"
            if attempt < self.max_attempts:
                await asyncio.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
        raise EngineError(f"{method} {self.base_url}{path} failed after retries: {last_error}")

    async def _once(self, method: str, path: str, payload: Any, timeout_s: float,
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self._http().request(method, self.base_url + path, json=payload, timeout=timeout,
                                        headers=headers) as resp:
            text = await resp.text()
            try:
                body = await resp.json(content_type=None) if text else None
            except ValueError:
                body = text
            return resp.status, body


def _error_message(body: Any) -> str:
    """SGLang's {"error": {"message"}}, OpenAI's {"object": "error", "message"}, or the text."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if isinstance(error, str):
            return error
        if "message" in body:
            return str(body["message"])
        if body.get("error_message"):  # SGLang's LoRAUpdateOutput
            return str(body["error_message"])
    return str(body)[:2000]


class EngineClient(HttpJsonClient):
    """SGLang native API: /generate, /update_weights_from_disk, /model_info, /health."""

    def __init__(self, base_url: str, *, timeout_s: float = 300, max_attempts: int = 3,
                 api_key: str = "", admin_api_key: str = ""):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        super().__init__(base_url, timeout_s=timeout_s, max_attempts=max_attempts, headers=headers)
        admin = admin_api_key or api_key
        self._admin_headers = {"Authorization": f"Bearer {admin}"} if admin else None
        self._context_len: int | None = None

    @classmethod
    def from_config(cls, engines, url: str) -> EngineClient:
        """A client for ``url`` with ``engines`` (an EnginesConfig)'s timeouts and keys."""
        return cls(url, timeout_s=engines.request_timeout_s, max_attempts=engines.max_attempts,
                   api_key=engines.api_key(), admin_api_key=engines.admin_api_key())

    async def context_length(self) -> int:
        """The model's context (prompt + output tokens), read once from /v1/models."""
        if self._context_len is None:
            reply = await self.request("GET", "/v1/models")
            try:
                self._context_len = int(reply["data"][0]["max_model_len"])
            except (KeyError, IndexError, TypeError, ValueError):
                raise EngineError(f"/v1/models gave no max_model_len: {str(reply)[:200]}") from None
        return self._context_len

    async def fit_max_new_tokens(self, prompts: list[list[int]], max_new_tokens: int) -> int:
        """``max_new_tokens`` lowered so the longest prompt plus it fits the context; an
        EngineError with status 400 when the prompt alone fills it."""
        room = await self.context_length() - max(len(p) for p in prompts)
        if room <= 0:
            raise EngineError(f"the prompt has {max(len(p) for p in prompts)} tokens; the model's "
                              f"context is {await self.context_length()}", 400)
        return min(max_new_tokens, room)

    async def generate(self, input_ids: list[int], *, n: int = 1, max_new_tokens: int = 128,
                       temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                       stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                       return_logprob: bool = True, top_logprobs_num: int = 0,
                       token_ids_logprob: list[int] | None = None, lora_path: str | None = None) -> list[Completion]:
        """``n`` samples of one prompt (on the LoRA adapter named ``lora_path`` when given)."""
        [group] = await self.generate_batch(
            [input_ids], n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            top_k=top_k, stop=stop, stop_token_ids=stop_token_ids, return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num, token_ids_logprob=token_ids_logprob, lora_path=lora_path,
        )
        return group

    async def generate_batch(self, prompts: list[list[int]], *, n: int = 1, max_new_tokens: int = 128,
                             temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                             stop: list[str] | None = None, stop_token_ids: list[int] | None = None,
                             return_logprob: bool = True, top_logprobs_num: int = 0,
                             token_ids_logprob: list[int] | None = None,
                             lora_path: str | None = None) -> list[list[Completion]]:
        """``n`` samples of each prompt, grouped by prompt, in one request. Asking for
        ``top_logprobs_num`` or ``token_ids_logprob`` implies ``return_logprob`` (as SGLang needs)."""
        if not prompts:
            return []
        max_new_tokens = await self.fit_max_new_tokens(prompts, max_new_tokens)
        sampling: dict[str, Any] = {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                    "top_p": top_p, "top_k": top_k, "n": n}
        if stop:
            sampling["stop"] = list(stop)
        if stop_token_ids:
            sampling["stop_token_ids"] = list(stop_token_ids)
        return_logprob = return_logprob or top_logprobs_num > 0 or bool(token_ids_logprob)
        payload: dict[str, Any] = {"input_ids": [list(p) for p in prompts], "sampling_params": sampling,
                                   "return_logprob": return_logprob}
        if top_logprobs_num > 0:
            payload["top_logprobs_num"] = top_logprobs_num
        if token_ids_logprob:
            payload["token_ids_logprob"] = list(token_ids_logprob)
        if lora_path:
            payload["lora_path"] = lora_path
        reply = await self.request("POST", "/generate", payload)
        items = reply if isinstance(reply, list) else [reply]
        if len(items) != len(prompts) * n:
            raise EngineError(f"/generate returned {len(items)} items for {len(prompts)} prompts x n={n}")
        completions = [
            parse_completion(item, return_logprob, top_logprobs=top_logprobs_num > 0,
                             token_ids_logprobs=bool(token_ids_logprob))
            for item in items
        ]
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    async def completion_logprobs(self, prompt_ids: list[int], completions: list[list[int]],
                                  lora_path: str | None = None) -> list[list[float]]:
        """This engine's log-prob of every token of each completion after ``prompt_ids``: one
        prefill-only request (SGLang's ``max_new_tokens: 0`` with ``return_logprob`` and
        ``logprob_start_len`` at the completion, read from ``input_token_logprobs``), on the
        LoRA adapter ``lora_path`` when given. How the anchor engine serves π0's log-probs for
        the learner's KL term."""
        wanted = [i for i, c in enumerate(completions) if len(c)]
        values: list[list[float]] = [[] for _ in completions]
        if not wanted:
            return values
        start = len(prompt_ids) - 1  # SGLang nulls the first scored token: start one before the completion
        payload = {"input_ids": [list(prompt_ids) + list(completions[i]) for i in wanted],
                   # T=1, no top-p/k: a server that scales or renormalises input log-probs by the
                   # sampling parameters leaves raw ones alone.
                   "sampling_params": {"max_new_tokens": 0, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
                   "return_logprob": True, "logprob_start_len": start}
        if lora_path:
            payload["lora_path"] = lora_path
        reply = await self.request("POST", "/generate", payload)
        items = reply if isinstance(reply, list) else [reply]
        if len(items) != len(wanted):
            raise EngineError(f"/generate returned {len(items)} items for {len(wanted)} prefills")
        for i, item in zip(wanted, items, strict=True):
            values[i] = parse_input_logprobs(item, [prompt_ids[-1], *completions[i]])[1:]
        return values

    async def update_weights_from_disk(self, model_path: str, weight_version: str | None = None,
                                       abort_all_requests: bool = False) -> dict:
        """Load new weights; the reply {"success", "message", "num_paused_requests"}."""
        payload: dict[str, Any] = {"model_path": model_path, "abort_all_requests": abort_all_requests}
        if weight_version is not None:
            payload["weight_version"] = weight_version
        reply = await self.request("POST", "/update_weights_from_disk", payload, headers=self._admin_headers)
        if not reply.get("success", False):
            raise EngineError(str(reply.get("message", reply)), 400)
        return reply

    # -- LoRA adapters (SGLang's dynamic LoRA API; catq/engines/lora.py) ------------------

    async def load_lora_adapter(self, lora_name: str, lora_path: str, pinned: bool = False) -> dict:
        """The reply {"success", "error_message", "loaded_adapters"}; EngineError(400) on refusal."""
        return await self._lora("/load_lora_adapter", {"lora_name": lora_name, "lora_path": lora_path,
                                                       "pinned": pinned})

    async def unload_lora_adapter(self, lora_name: str) -> dict:
        return await self._lora("/unload_lora_adapter", {"lora_name": lora_name})

    async def _lora(self, path: str, payload: dict) -> dict:
        reply = await self.request("POST", path, payload, headers=self._admin_headers)
        if not isinstance(reply, dict) or not reply.get("success", False):
            raise EngineError(_error_message(reply), 400)
        return reply

    async def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> dict:
        """SGLang's /update_weight_version: what /model_info reports, weights untouched."""
        return await self.request("POST", "/update_weight_version",
                                  {"new_version": new_version, "abort_all_requests": abort_all_requests},
                                  headers=self._admin_headers)

    # -- weights over a process group (catq.engines.weight_group; the trainer is rank 0) ----

    async def init_weights_update_group(self, *, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str,
                                        timeout_s: float) -> dict:
        """Join the trainer's group; answers once every rank has joined."""
        return await self._collective("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": group_name, "backend": backend,
        }, timeout_s)

    async def update_weights_from_distributed(self, *, names: list[str], dtypes: list[str],
                                              shapes: list[list[int]], group_name: str,
                                              weight_version: str | None, timeout_s: float) -> dict:
        """Receive the named tensors from the trainer's broadcasts; answers once loaded."""
        return await self._collective("/update_weights_from_distributed", {
            "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name,
            "weight_version": weight_version, "flush_cache": True,
        }, timeout_s)

    async def destroy_weights_update_group(self, group_name: str, timeout_s: float) -> dict:
        return await self._collective("/destroy_weights_update_group", {"group_name": group_name}, timeout_s)

    async def _collective(self, path: str, payload: dict, timeout_s: float) -> dict:
        """One attempt, never retried: the other ranks of the group act once, so a second request
        would wait for a broadcast that never comes."""
        status, body = await self._once("POST", path, payload, timeout_s, self._admin_headers)
        if status in (401, 403):
            raise EngineAuthError(self.base_url, status, _error_message(body))
        if status >= 400 or not isinstance(body, dict) or not body.get("success", False):
            raise EngineError(_error_message(body), status)
        return body

    async def pause_generation(self, mode: str = "abort") -> dict:
        """SGLang's modes: "abort" (its default) ends queued and running requests as aborted;
        "retract" and "in_place" keep them for after /continue_generation."""
        return await self.request("POST", "/pause_generation", {"mode": mode}, headers=self._admin_headers)

    async def continue_generation(self) -> dict:
        return await self.request("POST", "/continue_generation", {}, headers=self._admin_headers)

    async def model_info(self) -> dict:
        """GET /model_info, or the older /get_model_info where the former is missing."""
        try:
            return await self.request("GET", "/model_info")
        except EngineError as exc:
            if exc.status != 404:
                raise
            return await self.request("GET", "/get_model_info")

    async def weight_version(self) -> str | None:
        return (await self.model_info()).get("weight_version")

    async def health(self) -> bool:
        """True when GET /health answers 200 now (no retries)."""
        try:
            status, _ = await self._once("GET", "/health", None, min(self.timeout_s, 10.0))
        except RETRYABLE_ERRORS:
            return False
        return status == 200


RAW_LOGPROB_TOLERANCE = 1e-3


async def check_raw_logprobs(client: EngineClient, prompt_ids: list[int]) -> float:
    """Raise ConfigError unless the engine returns raw (temperature-free) behaviour log-probs,
    as catq's learner recomputes them; return the gap seen. The likeliest next token is the same
    at any temperature, so its log-prob at T=1 and T=0.5 must agree: SGLang without
    ``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` returns log-softmax(logits / T), and the importance
    ratio would then be quietly wrong."""
    values = []
    for temperature in (1.0, 0.5):
        [completion] = await client.generate(prompt_ids, max_new_tokens=1, temperature=temperature,
                                             top_p=1.0, top_k=-1, top_logprobs_num=1)
        values.append(max(completion.top_logprobs[0].values()))
    gap = abs(values[0] - values[1])
    if gap > RAW_LOGPROB_TOLERANCE:
        raise ConfigError(
            f"engine {client.base_url} returns temperature-scaled log-probs (the same token: "
            f"{values[0]:.4f} at T=1, {values[1]:.4f} at T=0.5); catq trains on raw ones: start "
            "SGLang with SGLANG_RETURN_ORIGINAL_LOGPROB=1 (catq up does this for engines it starts)")
    return gap


def parse_completion(item: dict, return_logprob: bool, *, top_logprobs: bool = False,
                     token_ids_logprobs: bool = False) -> Completion:
    """One /generate item -> Completion; EngineError when a field is missing or mistyped
    (including a log-prob field asked for and absent)."""
    try:
        meta = item["meta_info"]
        reason = meta.get("finish_reason") or {}
        if isinstance(reason, dict) and reason.get("type") == "abort":
            return _aborted(item, meta, reason)
        logprobs = None
        if return_logprob:
            logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
        output_ids = [int(t) for t in item["output_ids"]]
        version = meta.get("weight_version")
        return Completion(
            text=str(item["text"]),
            output_ids=output_ids,
            logprobs=logprobs,
            finish_reason=str(reason.get("type", "abort") if isinstance(reason, dict) else reason),
            prompt_tokens=int(meta["prompt_tokens"]),
            completion_tokens=int(meta.get("completion_tokens", len(output_ids))),
            weight_version=None if version is None else str(version),
            top_logprobs=_per_position(meta["output_top_logprobs"]) if top_logprobs else None,
            token_ids_logprobs=_per_position(meta["output_token_ids_logprobs"]) if token_ids_logprobs else None,
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"malformed /generate item ({type(exc).__name__}: {exc}): {str(item)[:300]}") from None


def parse_input_logprobs(item: dict, expected_ids: list[int]) -> list[float]:
    """The log-probs of ``expected_ids`` from a prefill item's ``input_token_logprobs`` (the
    first one None: SGLang gives the first scored token no log-prob); EngineError unless the
    engine scored exactly those tokens, each after the first with a number."""
    try:
        entries = item["meta_info"]["input_token_logprobs"]
        ids = [int(entry[1]) for entry in entries]
        if ids != expected_ids:
            raise ValueError(f"scored {len(ids)} tokens, expected {len(expected_ids)}")
        return [None, *(float(entry[0]) for entry in entries[1:])]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"malformed prefill item ({type(exc).__name__}: {exc}): {str(item)[:300]}") from None


def _aborted(item: dict, meta: dict, reason: dict) -> Completion:
    """An item aborted while queued or running (``/pause_generation``, ``abort_all_requests``,
    ``/abort_request``): SGLang gives it no ``prompt_tokens`` and maybe no log-probs. Callers
    must not train on it (``Completion.aborted``)."""
    output_ids = [int(t) for t in item.get("output_ids") or []]
    return Completion(
        text=str(item.get("text", "")), output_ids=output_ids, logprobs=None, finish_reason="abort",
        prompt_tokens=int(meta.get("prompt_tokens") or 0), completion_tokens=len(output_ids),
        weight_version=None if meta.get("weight_version") is None else str(meta["weight_version"]),
    )


def _per_position(positions: list[list[list]]) -> list[dict[int, float]]:
    """SGLang's per-position lists of [logprob, token_id, text|None] -> {token id: logprob}."""
    return [{int(entry[1]): float(entry[0]) for entry in position or []} for position in positions]
