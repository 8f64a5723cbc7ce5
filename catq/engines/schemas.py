"""The request bodies catq's engine accepts, as SGLang names and checks them
(``managers/io_struct.py`` and ``entrypoints/openai/protocol.py`` are the reference): pydantic
models the handlers in :mod:`catq.engines.server` validate against. A refusal here is a 400."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catq.engines import weight_group
from catq.engines.http_body import BadRequest
from catq.engines.sampling import SamplingParams


class SamplingParamsIn(BaseModel):
    """The ``sampling_params`` keys catq's engine honours (SGLang names, defaults and checks:
    unknown keys are refused, as SGLang refuses them)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int | None = Field(128, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    sampling_seed: int | None = None
    n: int = Field(1, ge=1, le=256)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int) -> int:
        if value < 1 and value != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {value}.")
        return value

    def to_params(self) -> SamplingParams:
        if self.repetition_penalty != 1.0 or self.sampling_seed is not None:
            raise BadRequest("repetition_penalty and sampling_seed are valid SGLang sampling "
                             "params that catq's engine does not implement; leave them unset")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_new_tokens=128 if self.max_new_tokens is None else self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens, n=self.n,
        )


class GenerateIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # as SGLang: unknown top-level keys are ignored
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SamplingParamsIn | list[SamplingParamsIn] = SamplingParamsIn()
    return_logprob: bool | list[bool] = False
    rid: str | list[str] | None = None
    stream: bool = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    """With return_logprob: also return this many likeliest tokens at each output position."""
    token_ids_logprob: list[int] | list[list[int]] | None = None
    """With return_logprob: also return these tokens' log-probs at each output position; one
    list for every prompt, or a list of lists, one per prompt (as SGLang)."""
    return_text_in_logprobs: bool = False
    lora_path: str | list[str | None] | None = None
    """SGLang's: the LoRA adapter (by name) for every prompt, or one per prompt; null = the base
    model (catq/engines/lora.py)."""


class UpdateWeightsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # SGLang has more knobs (load_format, ...)
    model_path: str
    weight_version: str | None = None
    abort_all_requests: bool = False


class InitWeightsUpdateGroupIn(BaseModel):
    """SGLang's InitWeightsUpdateGroupReqInput."""

    model_config = ConfigDict(extra="ignore")
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    """This engine's rank in the group (rank 0 is the trainer)."""
    world_size: int = Field(ge=2)
    group_name: str = weight_group.DEFAULT_GROUP
    backend: Literal["nccl", "gloo"] = "nccl"


class UpdateWeightsFromDistributedIn(BaseModel):
    """SGLang's UpdateWeightsFromDistributedReqInput (load_format, torch_empty_cache: ignored)."""

    model_config = ConfigDict(extra="ignore")
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = weight_group.DEFAULT_GROUP
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None


class DestroyWeightsUpdateGroupIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    group_name: str = weight_group.DEFAULT_GROUP


class PauseIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ChatCompletionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send many optional fields
    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str = ""
    n: int = Field(1, ge=1, le=256)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    stop: str | list[str] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """With logprobs: the likeliest tokens at each position (OpenAI allows 0..20)."""
    stream: bool = False
    lora_path: str | None = None
    """An adapter by name (else ``model = "<base>:<adapter>"`` names it, as SGLang reads it)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Extra chat-template variables (SGLang's field), e.g. {"enable_thinking": false}."""
