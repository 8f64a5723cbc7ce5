"""Client-side chat templating: callers turn chat messages into token ids with the model's own
tokenizer and chat template, so the token ids the learner trains on are exactly the ones the
engine generated from (no server-side re-tokenization in between)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from catq.engines.models import load_tokenizer
from catq.messages import ChatMessage

if TYPE_CHECKING:
    from catq.config import Config


class ChatTokenizer:
    """The tokenizer of ``model`` (a path or "default") with chat templating. ``template_kwargs``
    are extra template variables (``model.chat_template_kwargs``, e.g. enable_thinking=False)."""

    def __init__(self, model: str, cache_dir: str | None = None,
                 template_kwargs: Mapping[str, object] | None = None):
        self.tokenizer = load_tokenizer(model, cache_dir)
        self.eos_token_id: int = self.tokenizer.eos_token_id
        self.template_kwargs = dict(template_kwargs or {})

    def encode_chat(self, messages: Sequence[ChatMessage] | Sequence[dict]) -> list[int]:
        """Token ids of the chat, ending with the assistant generation prompt."""
        return render_chat(self.tokenizer, [_as_dict(m) for m in messages], self.template_kwargs)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        """Plain token ids of ``text`` (no template, no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False)


def render_chat(tokenizer, turns: list[dict], template_kwargs: Mapping[str, object] | None = None) -> list[int]:
    """The one call that applies a chat template (client side and catq's engine): token ids of
    ``turns`` plus the generation prompt, the template given ``template_kwargs`` as variables."""
    ids = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, tokenize=True, return_dict=False, **dict(template_kwargs or {})
    )
    return [int(i) for i in ids]


def chat_tokenizer(config: Config, model: str,
                   template_kwargs: Mapping[str, object] | None = None) -> ChatTokenizer:
    """``model``'s ChatTokenizer as the run configures it (cache dir, and the template variables
    of ``model.chat_template_kwargs`` unless ``template_kwargs`` is given)."""
    kwargs = config.model.chat_template_kwargs if template_kwargs is None else template_kwargs
    return ChatTokenizer(model, config.model.cache_dir or None, kwargs)


def _as_dict(message: ChatMessage | dict) -> dict:
    if isinstance(message, dict):
        return {"role": message["role"], "content": message["content"]}
    return {"role": message.role, "content": message.content}
