"""Chat models as async callables (``await chat(messages) -> str``), the shape the estimators and
the judge take (:class:`catq.teacher.estimators.ChatFn`).

- :class:`EngineChat`: a catq/SGLang engine via ``/generate``, with the chat template applied
  client-side by the model's tokenizer (the same path rollouts take).
- :class:`OpenAIChat`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (e.g. a hosted
  judge), with its API key from the environment.

Both also answer ``await chat.yes_no(messages) -> (P(yes), P(no)) | None``: the probabilities of
"yes" and "no" as the first reply token (the log-prob judge, ``catq.teacher.judging``).
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from typing import TYPE_CHECKING

from catq.config import Config, SamplingConfig

if TYPE_CHECKING:
    from catq.engines.client import EngineClient
    from catq.engines.openai import ChatClient
    from catq.engines.tokenizer import ChatTokenizer

YES_SPELLINGS = (" yes", "yes", " Yes", "Yes")
NO_SPELLINGS = (" no", "no", " No", "No")
"""The first reply tokens that mean "yes" / "no" to the log-prob judge."""


class EngineChat:
    """``prefix`` starts the assistant's turn (response priming: the model continues it, which
    makes small models keep a format); the returned text includes it. ``lora_path``: the LoRA
    adapter every call names (a LoRA policy's version); None: the engine's own weights."""

    def __init__(self, client: EngineClient, tokenizer: ChatTokenizer, sampling: SamplingConfig,
                 lora_path: str | None = None):
        self.client = client
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.lora_path = lora_path

    supports_prefix = True

    def on_adapter(self, lora_path: str) -> EngineChat:
        """The same chat on the adapter ``lora_path`` (sharing this one's connection)."""
        return EngineChat(self.client, self.tokenizer, self.sampling, lora_path)

    @property
    def _adapter(self) -> dict:
        return {"lora_path": self.lora_path} if self.lora_path else {}

    async def __call__(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                       prefix: str = "", max_new_tokens: int | None = None) -> str:
        ids = self.tokenizer.encode_chat(messages) + (self.tokenizer.encode(prefix) if prefix else [])
        (completion,) = await self.client.generate(
            ids,
            n=1,
            max_new_tokens=max_new_tokens or self.sampling.max_new_tokens,
            temperature=self.sampling.temperature if temperature is None else temperature,
            top_p=self.sampling.top_p,
            top_k=self.sampling.top_k,
            return_logprob=False,
            **self._adapter,
        )
        return prefix + completion.text

    async def yes_no(self, messages: list[dict[str, str]]) -> tuple[float, float] | None:
        """(P(yes), P(no)) of the reply's first token, each summed over the single-token
        spellings in YES_SPELLINGS / NO_SPELLINGS: one prefill, one new token. None when the
        tokenizer spells either word in no single token."""
        yes_ids, no_ids = self.yes_no_token_ids
        if not yes_ids or not no_ids:
            return None
        (completion,) = await self.client.generate(
            self.tokenizer.encode_chat(messages), n=1, max_new_tokens=1, temperature=0.0,
            token_ids_logprob=yes_ids + no_ids, **self._adapter,
        )
        [position] = completion.token_ids_logprobs
        return sum(math.exp(position[i]) for i in yes_ids), sum(math.exp(position[i]) for i in no_ids)

    @cached_property
    def yes_no_token_ids(self) -> tuple[list[int], list[int]]:
        """The distinct token ids of the spellings of "yes" and of "no" that are one token."""
        def single(spellings: tuple[str, ...]) -> list[int]:
            encoded = [self.tokenizer.encode(s) for s in spellings]
            return list(dict.fromkeys(ids[0] for ids in encoded if len(ids) == 1))
        return single(YES_SPELLINGS), single(NO_SPELLINGS)

    async def close(self) -> None:
        await self.client.close()


class OpenAIChat:
    def __init__(self, client: ChatClient, sampling: SamplingConfig):
        self.client = client
        self.sampling = sampling

    supports_prefix = False

    async def __call__(self, messages: list[dict[str, str]], *, temperature: float | None = None,
                       prefix: str = "", max_new_tokens: int | None = None) -> str:
        if prefix:  # chat APIs have no portable way to start the assistant's turn
            raise ValueError("OpenAI-compatible endpoints take no response prefix")
        (text,) = await self.client.complete(
            messages,
            max_tokens=max_new_tokens or self.sampling.max_new_tokens,
            temperature=self.sampling.temperature if temperature is None else temperature,
        )
        return text

    logprobs_offered: bool | None = None
    """Whether the endpoint returns log-probs (None: not asked yet)."""

    async def yes_no(self, messages: list[dict[str, str]]) -> tuple[float, float] | None:
        """(P(yes), P(no)) of the first reply token from the endpoint's ``top_logprobs`` (tokens
        reading "yes"/"no" once stripped and lower-cased; absent from the top 5 counts as 0).
        None when the endpoint offers no log-probs, and from then on without asking again."""
        if self.logprobs_offered is False:
            return None
        top = await self.client.first_token_logprobs(messages, top_logprobs=5)
        self.logprobs_offered = top is not None
        if top is None:
            return None
        prob = {w: sum(math.exp(lp) for t, lp in top if t.strip().lower() == w) for w in ("yes", "no")}
        return prob["yes"], prob["no"]

    async def close(self) -> None:
        await self.client.close()


def engine_chat(config: Config, url: str, model: str, sampling: SamplingConfig,
                template_kwargs: dict | None = None) -> EngineChat:
    """An EngineChat on ``url`` using ``model``'s tokenizer (a path or "default") and chat
    template, with ``model.chat_template_kwargs`` unless ``template_kwargs`` is given."""
    from catq.engines.client import EngineClient
    from catq.engines.tokenizer import chat_tokenizer

    client = EngineClient.from_config(config.engines, url)
    return EngineChat(client, chat_tokenizer(config, model, template_kwargs), sampling)


def judge_chat(config: Config) -> EngineChat | OpenAIChat:
    """The judge endpoint of the config: greedy, ``judge.max_new_tokens`` long replies.
    For an SGLang/catq judge the tokenizer is ``engines.judge_model`` when set, else the anchor
    model (the default config serves the judge from the anchor's engine). Its chat-template
    variables: ``engines.judge_chat_template_kwargs`` (see there)."""
    sampling = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=config.judge.max_new_tokens)
    engines = config.engines
    if engines.judge_api == "openai":
        from catq.engines.openai import ChatClient

        client = ChatClient(engines.judge_url, model=engines.judge_model,
                            api_key=os.environ.get(engines.judge_api_key_env),
                            timeout_s=engines.request_timeout_s, max_attempts=engines.max_attempts,
                            chat_template_kwargs=engines.judge_chat_template_kwargs)
        return OpenAIChat(client, sampling)
    return engine_chat(config, engines.judge_url, engines.judge_model or config.model.anchor, sampling,
                       engines.judge_chat_template_kwargs)


def judge_served_model(config: Config) -> str:
    """The model the judge endpoint serves, as far as the config says: the `catq up` engine at
    ``judge_url``, else an OpenAI-compatible judge's ``judge_model``, else the anchor's model when
    the judge is the anchor's engine, else the model whose tokenizer an engine judge uses."""
    engines = config.engines
    for spec in engines.launch:
        if _same_url(spec.url, engines.judge_url):
            return spec.model
    if engines.judge_api == "openai":
        return engines.judge_model
    if _same_url(engines.anchor_url, engines.judge_url):
        return config.model.anchor
    return engines.judge_model or config.model.anchor


def judge_independence_warning(config: Config) -> str | None:
    """Why the judge is not independent of the policy (it is a policy engine, or serves the
    policy's initial weights), or None. The paper's judge is a separate, stronger model: a judge
    that is the policy grades its own answers, which invites reward hacking."""
    engines, policy = config.engines, config.model.policy
    if any(_same_url(url, engines.judge_url) for url in engines.policy_urls):
        reason = f"the judge ({engines.judge_url}) is a policy engine"
    elif _same_model(judge_served_model(config), policy):
        reason = f"the judge serves the policy's own weights ({judge_served_model(config)})"
    else:
        return None
    return (f"{reason}: on open prompts the policy would grade itself, which invites reward hacking "
            "(the paper's judge is an independent, stronger model; math needs no judge); point "
            "engines.judge_url / judge_model at another model (configs/gpu-open.toml shows how)")


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def _same_model(a: str, b: str) -> bool:
    """Same path or name ("/models/Qwen3-4B" and "Qwen/Qwen3-4B" both end in "qwen3-4b")."""
    def name(model: str) -> str:
        return model.rstrip("/").rsplit("/", 1)[-1].lower()
    return bool(a and b) and (a == b or name(a) == name(b))
