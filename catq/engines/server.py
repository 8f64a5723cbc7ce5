"""catq's engine server: the subset of SGLang's native HTTP API that catq uses, on PyTorch.

    catq engine --model default --port 30000 --weights-dir runs/default/weights
    python -m workers.engine --model /path/to/hf-dir --device cuda

Workers cannot tell it from SGLang: the same routes, request fields and response shapes
(``python/sglang/srt/entrypoints/http_server.py`` and ``managers/io_struct.py`` are the
reference). What runs behind them is ``scheduler.Scheduler`` (continuous batching over one KV
cache) and ``sampling.sample``. Returned log-probs are ``log_softmax`` of the raw logits at each
sampled token — temperature and top-p/top-k NOT applied — see ``catq.engines.sampling``. With
``return_logprob``, ``top_logprobs_num`` adds ``meta_info.output_top_logprobs`` and
``token_ids_logprob`` adds ``meta_info.output_token_ids_logprobs`` (per output position, lists of
``[logprob, token_id, text|None]``) from that same raw distribution: one prefill with
``max_new_tokens: 1`` is how the log-prob judge reads P("yes") and P("no").

Routes: POST /generate, POST /update_weights_from_disk, GET /model_info (and /get_model_info),
GET /server_info (and /get_server_info; its ``engine_stats`` counts forward passes and the
largest batch seen, which is how tests prove that concurrent requests were batched),
GET /health, GET /health_generate, GET /v1/models, POST /v1/chat/completions,
POST /pause_generation {"mode": "abort"|"retract"|"in_place"}, POST /continue_generation,
GET|POST /flush_cache.
Malformed requests get HTTP 400 ``{"error": {"message": ...}}`` and the server keeps serving;
like SGLang it refuses a prompt plus ``max_new_tokens`` longer than the context, ``top_k = 0``
and unknown ``sampling_params`` keys, and ignores unknown top-level keys. With ``--api-key`` /
``--admin-api-key`` it checks ``Authorization: Bearer`` as SGLang does (``app.request_allowed``).
The conformance suite (tests/conformance) runs the same tests against this server and real
SGLang.
"""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from catq.engines import weight_group
from catq.engines.batching import BatchGenerator, Sequence
from catq.engines.http_body import BadRequest
from catq.engines.http_body import read_json as _json
from catq.engines.sampling import SamplingParams
from catq.engines.schemas import (
    ChatCompletionIn,
    DestroyWeightsUpdateGroupIn,
    GenerateIn,
    InitWeightsUpdateGroupIn,
    PauseIn,
    SamplingParamsIn,
    UpdateWeightsFromDistributedIn,
    UpdateWeightsIn,
)
from catq.engines.scheduler import (
    Scheduler,
    copy_weights_in_place,
    load_weights_in_place,
)

log = structlog.get_logger()



class Engine:
    """The model, its scheduler, and the HTTP handlers."""

    def __init__(self, generator: BatchGenerator, *, model_path: str, served_name: str,
                 weights_dir: Path | None, max_batch: int):
        self.gen = generator
        self.tokenizer = generator.tokenizer
        self.model_path = model_path
        self.served_name = served_name
        self.weights_dir = weights_dir.resolve() if weights_dir else None
        self.scheduler = Scheduler(generator, max_batch=max_batch)
        self.started = time.time()
        self.device = next(generator.model.parameters()).device
        self.weight_groups: dict[str, Any] = {}
        """Weight broadcast groups joined (/init_weights_update_group), by name."""
        self.group_timeout_s = 120.0
        """How long a group's rendezvous and each broadcast may wait for the other ranks."""
        self.lora = None
        """The LoRA adapters (catq/engines/lora.py's LoraManager) with --enable-lora, else None."""
        self.lora_lock = asyncio.Lock()

    async def _adapters(self, names: list[str | None]) -> list:
        """The LoRA adapters a request names (a 400 for one never loaded, or any without LoRA);
        one unloaded since is loaded again first, as SGLang does."""
        from catq.engines.lora import NOT_ENABLED

        if not any(names):
            return [None] * len(names)
        if self.lora is None:
            raise BadRequest(f"lora_path was given but {NOT_ENABLED}")
        for name in self.lora.to_reload(names):
            async with self.lora_lock:
                await asyncio.to_thread(self.lora.reload, name)
        return self.lora.resolve(names)

    def _hold(self, adapters: list):
        import contextlib

        return self.lora.hold(adapters) if self.lora is not None else contextlib.nullcontext()

    # -- /generate --------------------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.Response:
        started = time.time()
        body = GenerateIn.model_validate(await _json(request))
        if body.stream:
            raise BadRequest("streaming is not supported by catq's engine; send stream=false")
        prompts, single = self._prompts(body)
        params = _per_prompt(body.sampling_params, len(prompts), "sampling_params")
        logprob_flags = _per_prompt(body.return_logprob, len(prompts), "return_logprob")
        top_nums = _per_prompt(body.top_logprobs_num, len(prompts), "top_logprobs_num")
        id_lists = _token_ids_per_prompt(body.token_ids_logprob, len(prompts))
        adapters = await self._adapters(_per_prompt(body.lora_path, len(prompts), "lora_path"))
        with self._hold(adapters):
            return await self._generate(body, prompts, single, params, logprob_flags, top_nums, id_lists,
                                        adapters, started)

    async def _generate(self, body, prompts, single, params, logprob_flags, top_nums, id_lists, adapters,
                        started) -> web.Response:
        groups: list[list[Sequence]] = []
        for prompt, sp, flag, top_num, ids, adapter in zip(prompts, params, logprob_flags, top_nums, id_lists,
                                                           adapters, strict=True):
            sampling = sp.to_params()
            sampling.validate()
            self._check_context(len(prompt), sp.max_new_tokens)
            group = [Sequence(list(prompt), sampling, lora=adapter) for _ in range(sampling.n)]
            for seq in group:
                if flag:  # SGLang returns neither without return_logprob, so compute neither
                    seq.top_logprobs_num, seq.token_ids_logprob = top_num, ids
                self.gen.admit(seq)
            groups.append(group)
        start_lens = _per_prompt(body.logprob_start_len, len(prompts), "logprob_start_len")
        inputs = await asyncio.gather(*(
            self._input_logprobs(prompt, start if flag else -1, body.return_text_in_logprobs, adapter)
            for prompt, start, flag, adapter in zip(prompts, start_lens, logprob_flags, adapters, strict=True)
        ))
        await self.scheduler.submit([seq for group in groups for seq in group])
        items = [
            self._item(seq, flag, started, body.return_text_in_logprobs, input_logprobs)
            for group, flag, input_logprobs in zip(groups, logprob_flags, inputs, strict=True)
            for seq in group
        ]
        return web.json_response(items[0] if single and len(items) == 1 else items)

    def _check_context(self, prompt_tokens: int, max_new_tokens: int | None) -> None:
        """SGLang's refusals (without --allow-auto-truncate), in its words."""
        context = self.gen.context_len
        if prompt_tokens >= context:
            raise BadRequest(f"The input ({prompt_tokens} tokens) is longer than the model's "
                             f"context length ({context} tokens).")
        if max_new_tokens is not None and prompt_tokens + max_new_tokens > context:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {context} "
                f"tokens. You requested a total of {prompt_tokens + max_new_tokens} tokens: "
                f"{prompt_tokens} tokens from the input messages and {max_new_tokens} tokens for "
                "the completion. Please reduce the number of tokens in the input messages or the "
                "completion to fit within the limit.")

    async def _input_logprobs(self, prompt: list[int], start: int, with_text: bool,
                              adapter=None) -> list[list] | None:
        """SGLang's ``input_token_logprobs`` from ``logprob_start_len`` on: [logprob, id, text]
        per prompt token, the first of them with a null log-prob (as SGLang returns it at any
        start, not only at the prompt's first token). None when not asked for (start < 0)."""
        if start < 0:
            return None
        values = await asyncio.to_thread(self.gen.prompt_logprobs, prompt, adapter)
        pairs = list(zip([None, *values], prompt, strict=True))[start:]
        if pairs:
            pairs[0] = (None, pairs[0][1])
        return self._triples(pairs, with_text)

    def _prompts(self, body: GenerateIn) -> tuple[list[list[int]], bool]:
        if (body.text is None) == (body.input_ids is None):
            raise BadRequest("exactly one of 'text' and 'input_ids' is required")
        if body.text is not None:
            texts = [body.text] if isinstance(body.text, str) else body.text
            return [self.tokenizer.encode(t) for t in texts], isinstance(body.text, str)
        ids = body.input_ids
        if not ids:
            raise BadRequest("input_ids is empty")
        if isinstance(ids[0], int):
            return [ids], True
        return ids, False

    def _item(self, seq: Sequence, return_logprob: bool, started: float, with_text: bool = False,
              input_logprobs: list[list] | None = None) -> dict:
        version = self.scheduler.weight_version
        if seq.lora is not None and seq.lora.version is not None:
            version = seq.lora.version  # the adapter's own v<N>
        meta = {
            "id": seq.seq_id,
            "finish_reason": seq.finish_reason,
            "prompt_tokens": len(seq.prompt_ids),
            "weight_version": version,
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": 0,
            "weight_versions": [{"version": version, "start": 0, "end": len(seq.output_ids)}],
            "e2e_latency": time.time() - started,
        }
        if return_logprob:
            meta["input_token_logprobs"] = input_logprobs or []
            meta["output_token_logprobs"] = self._triples(zip(seq.logprobs, seq.output_ids, strict=True), with_text)
            if seq.top_logprobs_num > 0:
                meta["output_top_logprobs"] = [self._triples(alt.top, with_text) for alt in seq.alternatives]
            if seq.token_ids_logprob:
                meta["output_token_ids_logprobs"] = [
                    self._triples(alt.requested, with_text) for alt in seq.alternatives
                ]
        return {"text": self.gen.output_text(seq), "output_ids": list(seq.output_ids), "meta_info": meta}

    def _triples(self, pairs, with_text: bool) -> list[list]:
        """SGLang's log-prob entries: [logprob, token_id, text] (text None unless asked for)."""
        return [[lp, tok, self.tokenizer.decode([tok]) if with_text else None] for lp, tok in pairs]

    # -- weights ----------------------------------------------------------------------------

    async def update_weights_from_disk(self, request: web.Request) -> web.Response:
        body = UpdateWeightsIn.model_validate(await _json(request))
        path = self._allowed_weights_path(body.model_path)
        if isinstance(path, str):
            return _update_reply(False, path, 0)
        success, message, held = await self.scheduler.update_weights(
            functools.partial(load_weights_in_place, self.gen.model, path), str(path),
            body.weight_version, body.abort_all_requests,
        )
        if success:
            self.model_path = str(path)
            if body.weight_version is not None:
                message += f" Weight version updated to {body.weight_version}."
        return _update_reply(success, message, held)

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join a trainer's weight broadcast group (blocks until every rank has joined)."""
        body = InitWeightsUpdateGroupIn.model_validate(await _json(request))
        refusal = self._group_refusal(body)
        if refusal:
            return _group_reply(False, refusal)
        try:
            group = await asyncio.to_thread(
                weight_group.open_group, backend=body.backend, master_address=body.master_address,
                master_port=body.master_port, rank=body.rank_offset, world_size=body.world_size,
                group_name=body.group_name, timeout_s=self.group_timeout_s,
            )
        except (RuntimeError, ValueError, OSError) as exc:  # torch's DistStoreError is a RuntimeError
            return _group_reply(False, f"Failed to initialize custom process group: {exc}")
        self.weight_groups[body.group_name] = group
        log.info("joined weight update group", group=body.group_name, rank=body.rank_offset,
                 world_size=body.world_size, backend=body.backend)
        return _group_reply(True, "Succeeded to initialize custom process group.")

    def _group_refusal(self, body: InitWeightsUpdateGroupIn) -> str:
        if body.group_name in self.weight_groups:
            return f"weight update group {body.group_name!r} already exists: destroy it first"
        if body.rank_offset >= body.world_size:
            return f"rank_offset {body.rank_offset} is not below world_size {body.world_size}"
        if body.backend == "nccl" and self.device.type != "cuda":
            return f"backend nccl needs a CUDA engine; this one runs on {self.device.type}: use gloo"
        return ""

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        """Receive every named tensor from rank 0's broadcasts and load it in place."""
        body = UpdateWeightsFromDistributedIn.model_validate(await _json(request))
        group = self.weight_groups.get(body.group_name)
        if group is None:
            return _group_reply(False, f"no weight update group {body.group_name!r}: "
                                       "POST /init_weights_update_group first")
        if not len(body.names) == len(body.dtypes) == len(body.shapes):
            return _group_reply(False, "names, dtypes and shapes must have the same length")
        for dtype in body.dtypes:
            weight_group.torch_dtype(dtype)  # an unknown one is a 400 before any broadcast

        def receive_and_load() -> None:
            tensors = weight_group.receive(group, body.dtypes, body.shapes, self.device)
            copy_weights_in_place(self.gen.model, dict(zip(body.names, tensors)), complete=False)

        success, message, _ = await self.scheduler.update_weights(
            receive_and_load, f"distributed group {body.group_name!r}", body.weight_version,
            body.abort_all_requests,
        )
        if success and body.weight_version is not None:
            message += f" Weight version updated to {body.weight_version}."
        return _group_reply(success, message)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        body = DestroyWeightsUpdateGroupIn.model_validate(await _json(request))
        group = self.weight_groups.pop(body.group_name, None)
        if group is None:
            return _group_reply(False, f"no weight update group {body.group_name!r}")
        await asyncio.to_thread(weight_group.close_group, group)
        return _group_reply(True, "Succeeded to destroy custom process group.")

    def _allowed_weights_path(self, model_path: str) -> Path | str:
        """The resolved directory, or a refusal message."""
        if self.weights_dir is None:
            return "weight updates are disabled: start the engine with --weights-dir"
        path = Path(model_path).expanduser().resolve()
        if not path.is_relative_to(self.weights_dir):
            return f"model_path {model_path!r} is outside the weights directory {str(self.weights_dir)!r}"
        if not path.is_dir():
            return f"model_path {model_path!r} is not a directory"
        return path

    # -- info, health, control ---------------------------------------------------------------

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": self.scheduler.weight_version,
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": getattr(self.gen.model.config, "model_type", None),
            "architectures": getattr(self.gen.model.config, "architectures", None),
        })

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({
            "model_path": self.model_path,
            "served_model_name": self.served_name,
            "device": str(self.gen.device),
            "max_running_requests": self.scheduler.max_batch,
            "context_length": self.gen.context_len,
            "weight_version": self.scheduler.weight_version,
            "engine_stats": self.scheduler.snapshot(),
            "version": "catq",
            **self._lora_info(),
        })

    def _lora_info(self) -> dict:
        """SGLang's server_info carries its server args; these are the LoRA ones."""
        lora = self.lora
        if lora is None:
            return {"enable_lora": False}
        return {"enable_lora": True, "max_lora_rank": lora.max_lora_rank,
                "lora_target_modules": sorted(lora.target_modules), "max_loras_per_batch": lora.max_loras_per_batch,
                "loaded_lora_adapters": lora.loaded()}

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def health_generate(self, request: web.Request) -> web.Response:
        stats = self.scheduler.snapshot()
        if stats["num_running"] or stats["num_waiting"] or self.scheduler.paused:
            return web.Response(status=200)  # busy or paused on purpose: alive
        seq = Sequence([self.tokenizer.eos_token_id or 0], SamplingParams(max_new_tokens=1, temperature=0))
        self.gen.admit(seq)
        try:
            await asyncio.wait_for(self.scheduler.submit([seq]), timeout=20)
        except TimeoutError:
            return web.Response(status=503)
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.served_name, "object": "model", "created": int(self.started),
                "owned_by": "catq", "root": self.served_name, "max_model_len": self.gen.context_len}
        adapters = [{"id": name, "object": "model", "created": int(self.started), "owned_by": "catq",
                     "root": path, "parent": self.served_name, "max_model_len": self.gen.context_len}
                    for name, path in (self.lora.loaded() if self.lora is not None else {}).items()]
        return web.json_response({"object": "list", "data": [card, *adapters]})

    async def pause_generation(self, request: web.Request) -> web.Response:
        body = PauseIn.model_validate(await _json(request) if request.can_read_body else {})
        if body.mode == "abort":  # SGLang's default: queued and running requests end as aborted
            self.scheduler.abort_all("aborted by /pause_generation")
        self.scheduler.pause()  # "retract" and "in_place" both keep running sequences for later
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        self.scheduler.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        # No prefix cache to flush: KV caches live only as long as their batch.
        return web.Response(text="Cache flushed.\n", status=200)

    # -- OpenAI-compatible chat ---------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.Response:
        started = time.time()
        body = ChatCompletionIn.model_validate(await _json(request))
        if body.stream:
            raise BadRequest("streaming is not supported by catq's engine; send stream=false")
        prompt = self._chat_prompt(body.messages, body.chat_template_kwargs)
        from catq.engines.lora import split_model_field

        [adapter] = await self._adapters([body.lora_path or split_model_field(body.model)])
        with self._hold([adapter]):
            return await self._chat(body, prompt, adapter, started)

    async def _chat(self, body: ChatCompletionIn, prompt: list[int], adapter, started: float) -> web.Response:
        max_tokens = body.max_completion_tokens or body.max_tokens
        sampling = SamplingParamsIn(
            max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=body.top_k, stop=body.stop,
        ).to_params()
        seqs = [Sequence(list(prompt), sampling, lora=adapter) for _ in range(body.n)]
        for seq in seqs:
            if body.logprobs:
                seq.top_logprobs_num = body.top_logprobs or 0
            self.gen.admit(seq)
        await self.scheduler.submit(seqs)
        choices = [self._choice(i, seq, body.logprobs) for i, seq in enumerate(seqs)]
        completion = sum(len(s.output_ids) for s in seqs)
        return web.json_response({
            "id": uuid.uuid4().hex, "object": "chat.completion", "created": int(started),
            "model": body.model or self.served_name, "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion},
            "metadata": {"weight_version": adapter.version if adapter is not None and adapter.version is not None
                         else self.scheduler.weight_version},
        })

    def _chat_prompt(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        from catq.engines.tokenizer import render_chat

        for m in messages:
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRequest("each message needs string 'role' and 'content'")
        from catq.config import RESERVED_TEMPLATE_KWARGS

        reserved = RESERVED_TEMPLATE_KWARGS & set(template_kwargs or {})
        if reserved:
            raise BadRequest(f"chat_template_kwargs may not set {sorted(reserved)}")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        return render_chat(self.tokenizer, turns, template_kwargs)

    def _choice(self, index: int, seq: Sequence, logprobs: bool) -> dict:
        reason = seq.finish_reason or {}
        choice = {
            "index": index,
            "message": {"role": "assistant", "content": self.gen.output_text(seq)},
            "logprobs": None,
            "finish_reason": reason.get("type"),
            "matched_stop": reason.get("matched"),
        }
        if logprobs:
            alternatives = seq.alternatives or [None] * len(seq.output_ids)
            choice["logprobs"] = {"content": [
                {**self._openai_logprob(tok, lp),
                 "top_logprobs": [self._openai_logprob(t, v) for v, t in alt.top] if alt else []}
                for tok, lp, alt in zip(seq.output_ids, seq.logprobs, alternatives, strict=True)
            ]}
        return choice

    def _openai_logprob(self, token: int, logprob: float) -> dict:
        return {"token": self.tokenizer.decode([token]), "logprob": logprob, "bytes": None}


def _per_prompt(value, count: int, name: str) -> list:
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise BadRequest(f"{name} has {len(value)} entries for {count} prompts")
    return value


def _token_ids_per_prompt(value: list[int] | list[list[int]] | None, count: int) -> list[list[int] | None]:
    """SGLang's normalisation: None or [] for none, a flat list for every prompt, or one list per prompt."""
    if not value:
        return [None] * count
    if isinstance(value[0], int):
        return [list(value)] * count
    if len(value) != count:
        raise BadRequest(f"token_ids_logprob has {len(value)} lists for {count} prompts")
    return [list(ids) or None for ids in value]


def _update_reply(success: bool, message: str, paused: int) -> web.Response:
    body = {"success": success, "message": message, "num_paused_requests": paused}
    return web.json_response(body, status=200 if success else 400)


def _group_reply(success: bool, message: str) -> web.Response:
    return web.json_response({"success": success, "message": message}, status=200 if success else 400)


