"""Chat models as async callables (``await chat(messages) -> str``), the shape the estimators and
the judge take (:class:`catq.teacher.estimators.ChatFn`).

- :class:`EngineChat`: a catq/SGLang engine via ``/generate``, with the chat template applied
  client-side by the model's tokenizer (the same path rollouts take).
- :class:`OpenAIChat`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (e.g. a hosted
  judge), with its API key from the environment.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from catq.config import Config, SamplingConfig

if TYPE_CHECKING:
    from catq.engines.client import EngineClient
    from catq.engines.openai import ChatClient
    from catq.engines.tokenizer import ChatTokenizer


class EngineChat:
    """``prefix`` starts the assistant's turn (response priming: the model continues it, which
    makes small models keep a format); the returned text includes it."""

    def __init__(self, client: EngineClient, tokenizer: ChatTokenizer, sampling: SamplingConfig):
        self.client = client
        self.tokenizer = tokenizer
        self.sampling = sampling

    supports_prefix = True

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
        )
        return prefix + completion.text

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

    async def close(self) -> None:
        await self.client.close()


def engine_chat(config: Config, url: str, model: str, sampling: SamplingConfig) -> EngineChat:
    """An EngineChat on ``url`` using ``model``'s tokenizer (a path or "default")."""
    from catq.engines.client import EngineClient
    from catq.engines.tokenizer import ChatTokenizer

    client = EngineClient(url, timeout_s=config.engines.request_timeout_s, max_attempts=config.engines.max_attempts)
    return EngineChat(client, ChatTokenizer(model, config.model.cache_dir or None), sampling)


def judge_chat(config: Config) -> EngineChat | OpenAIChat:
    """The judge endpoint of the config: greedy, ``judge.max_new_tokens`` long replies.
    For an SGLang/catq judge the tokenizer is ``engines.judge_model`` when set, else the anchor
    model (the default config serves the judge from the anchor's engine)."""
    sampling = SamplingConfig(temperature=0.0, top_p=1.0, top_k=-1, max_new_tokens=config.judge.max_new_tokens)
    engines = config.engines
    if engines.judge_api == "openai":
        from catq.engines.openai import ChatClient

        client = ChatClient(engines.judge_url, model=engines.judge_model,
                            api_key=os.environ.get(engines.judge_api_key_env),
                            timeout_s=engines.request_timeout_s, max_attempts=engines.max_attempts)
        return OpenAIChat(client, sampling)
    return engine_chat(config, engines.judge_url, engines.judge_model or config.model.anchor, sampling)
