"""Client for OpenAI-compatible chat endpoints (/v1/chat/completions): a hosted judge such as
GPT-4o, vLLM, SGLang, or catq's own engine.

    judge = ChatClient("https://api.openai.com/v1", model="gpt-4o", api_key_env="OPENAI_API_KEY")
    [answer] = await judge.complete([{"role": "user", "content": "..."}], max_tokens=8)

``base_url`` may end in ``/v1`` (OpenAI's convention) or be the server root. The API key comes
from the environment (never from config files). Retries: transport errors, 5xx, and 429 (hosted
APIs rate-limit; the request is fine, only early), bounded by attempts and total time; other 4xx
raise ``EngineError`` at once with the server's message.
"""

from __future__ import annotations

import os

from catq.engines.client import EngineError, HttpJsonClient


def is_retryable_chat_status(status: int) -> bool:
    return status >= 500 or status == 429


class ChatClient(HttpJsonClient):
    def __init__(self, base_url: str, *, model: str = "", api_key: str | None = None,
                 timeout_s: float = 300, max_attempts: int = 3, api_key_env: str = "OPENAI_API_KEY",
                 chat_template_kwargs: dict | None = None):
        key = api_key if api_key is not None else os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        root = base_url.rstrip("/")
        self.path = "/chat/completions" if root.endswith("/v1") else "/v1/chat/completions"
        self.model = model
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        """Sent as ``chat_template_kwargs`` (SGLang's and vLLM's field) when not empty."""
        super().__init__(root, timeout_s=timeout_s, max_attempts=max_attempts, headers=headers,
                         retry_status=is_retryable_chat_status)

    async def complete(self, messages: list[dict], *, max_tokens: int = 16,
                       temperature: float = 0.0, n: int = 1) -> list[str]:
        """The ``n`` reply texts, in choice order."""
        payload = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                   "temperature": temperature, "n": n}
        reply = await self.request("POST", self.path, self._with_template_kwargs(payload))
        try:
            choices = sorted(reply["choices"], key=lambda c: c.get("index", 0))
            texts = [c["message"]["content"] or "" for c in choices]
        except (KeyError, TypeError) as exc:
            raise EngineError(f"malformed chat completion ({exc}): {str(reply)[:300]}") from None
        if len(texts) != n:
            raise EngineError(f"chat completion returned {len(texts)} choices, asked for {n}")
        return texts

    async def first_token_logprobs(self, messages: list[dict], *,
                                   top_logprobs: int = 5) -> list[tuple[str, float]] | None:
        """(token, logprob) of the ``top_logprobs`` likeliest first reply tokens (one greedy
        token with ``logprobs``/``top_logprobs``); None when the endpoint returns none or
        refuses the fields with a 400."""
        payload = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0.0,
                   "logprobs": True, "top_logprobs": top_logprobs}
        try:
            reply = await self.request("POST", self.path, self._with_template_kwargs(payload))
        except EngineError as exc:
            if exc.status == 400:
                return None
            raise
        try:
            content = (reply["choices"][0].get("logprobs") or {}).get("content") or []
            top = content[0].get("top_logprobs") if content else None
            return [(str(t["token"]), float(t["logprob"])) for t in top] if top else None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise EngineError(f"malformed chat completion ({exc}): {str(reply)[:300]}") from None

    def _with_template_kwargs(self, payload: dict) -> dict:
        return {**payload, "chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else payload
