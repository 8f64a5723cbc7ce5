"""Client-side chat templating: callers turn chat messages into token ids with the model's own
tokenizer and chat template, so the token ids the learner trains on are exactly the ones the
engine generated from (no server-side re-tokenization in between)."""

from __future__ import annotations

from collections.abc import Sequence

from catq.engines.models import load_tokenizer
from catq.messages import ChatMessage


class ChatTokenizer:
    """The tokenizer of ``model`` (a path or "default") with chat templating."""

    def __init__(self, model: str, cache_dir: str | None = None):
        self.tokenizer = load_tokenizer(model, cache_dir)
        self.eos_token_id: int = self.tokenizer.eos_token_id

    def encode_chat(self, messages: Sequence[ChatMessage] | Sequence[dict]) -> list[int]:
        """Token ids of the chat, ending with the assistant generation prompt."""
        turns = [_as_dict(m) for m in messages]
        ids = self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return [int(i) for i in ids]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        """Plain token ids of ``text`` (no template, no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)


def _as_dict(message: ChatMessage | dict) -> dict:
    if isinstance(message, dict):
        return {"role": message["role"], "content": message["content"]}
    return {"role": message.role, "content": message.content}
