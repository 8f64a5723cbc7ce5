"""`catq eval` measuring a LoRA policy's version on its adapter, not on the base model: one catq
engine in-process on the default model, started with the LoRA flags eval gives its own policy
engine, a published adapter ``weights/v1`` with non-zero weights, greedy rollouts compared with
what ``/generate`` answers with and without ``lora_path``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from catq.config import load_config
from catq.engines.app import load_engine
from catq.engines.tokenizer import chat_tokenizer
from catq.evaluation.command import evaluate_on_engines, lora_flags
from catq.evaluation.datasets import load_problems
from catq.evaluation.runner import resolve_versions
from tests.integration.test_lora_engine import base, generate, lora_args, make_adapter, serving  # noqa: F401

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 24


def greedy_config(run_path):
    """Greedy math rollouts, one per prompt, in a run whose weights are ``run_path/weights``."""
    config = load_config(None, run="evallora")
    config.run_dir = str(run_path)
    config.rollout.group_size = 1
    config.rollout.math = config.rollout.math.model_copy(
        update={"temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": MAX_NEW_TOKENS})
    return config


async def test_eval_measures_an_adapter_version_with_its_adapter(tmp_path, base):  # noqa: F811
    config = greedy_config(tmp_path)
    make_adapter(base, config.weights_dir / "v1")
    versions = resolve_versions("0,latest", config)
    assert [(v.label, v.lora_path) for v in versions] == [("v0", None), ("v1", "v1")]
    problems = load_problems("single_digit", 3)
    engine = load_engine("default", device="cpu", weights_dir=str(config.weights_dir), max_batch=8,
                         lora_args=lora_args(*lora_flags(versions)))  # as eval starts its policy engine
    async with serving(engine) as url:
        args = SimpleNamespace(concurrency=1, scaling=False)  # one prompt at a time: greedy, as /generate below
        results = await evaluate_on_engines(problems, config, ["majority"], args, versions, url, url)
        tokenizer = chat_tokenizer(config, config.model.policy)
        expected = {"v0": [], "v1": []}
        for problem in problems:
            ids = tokenizer.encode_chat(problem.messages)
            for label, lora_path in (("v0", None), ("v1", "v1")):
                status, item = await generate(url, ids, lora_path, max_new_tokens=MAX_NEW_TOKENS)
                assert status == 200, item
                expected[label].append(item["text"])
    measured = {v["label"]: [p["rollouts"][0] for p in v["prompts"]] for v in results}
    assert measured == expected  # v0 on the base model, v1 on its adapter
    assert measured["v1"] != measured["v0"]  # the adapter changes what greedy decoding says
    assert results[1]["weights"] == str(config.weights_dir / "v1")
