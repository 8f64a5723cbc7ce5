"""A tiny randomly initialised causal LM for unit tests.

    from tests.helpers.tiny_model import tiny_model_path  # noqa: F401  (pytest fixture)

    def test_something(tiny_model_path):
        model = load_causal_lm(str(tiny_model_path))

The model is a 2-layer, hidden-64 LlamaForCausalLM with the default model's tokenizer (so chat
templates and token ids are real), saved once per test session as an HF directory.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from catq.engines.models import tiny_model_dir


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))
