"""SGLang's dynamic LoRA API, one suite, two backends: catq's engine and real SGLang 0.5.23 on the
CPU (its ``torch_native`` LoRA backend, pinned memory a no-op: catq/engines/sglang_env.py).

    python3 -m pytest tests/conformance/test_lora_api.py     # both backends
    python3 -m pytest tests/conformance -m sglang             # the real-SGLang half

Each backend serves the default model with the flags `catq up` gives a LoRA policy's engines
(catq.engines.lora.server_flags: rank 8, q/k/v/o_proj). The adapters are PEFT adapters with
random non-zero weights; what an engine serves on one is checked against the model with that
adapter merged in, as catq's learner computes log-probs. What one backend does and the other
does not is fixed in catq, never here.
"""

from __future__ import annotations

import pytest

from catq.engines.client import EngineError
from catq.engines.lora import server_flags
from catq.engines.tokenizer import ChatTokenizer
from tests.conformance.test_engine_api import (
    ADMIN_KEY,
    API_KEY,
    LOGPROB_AGREEMENT,
    behaviour_deltas,
    client,
    learner_logprobs,
    post,
)
from tests.helpers.engine_proc import EngineProcess, SGLangProcess
from tests.helpers.lora_adapter import make_adapter

pytestmark = pytest.mark.slow

RANK, TARGETS = 8, ["q_proj", "k_proj", "v_proj", "o_proj"]
ADAPTER_EFFECT = 10 * LOGPROB_AGREEMENT
"""The adapter must move the served log-probs at least this much (mean |Δ| against the base
model), so that agreeing with the merged model is not agreeing with the base one."""


@pytest.fixture(scope="module")
def base_model():
    from catq.engines.models import load_causal_lm

    return load_causal_lm("default")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, base_model):
    """The adapter directories (in the weights dir catq's engine may load from), and the merged
    model of the one that fits the servers' flags."""
    weights = tmp_path_factory.mktemp("lora-weights")
    fitting = make_adapter(base_model, weights / "v1", rank=RANK, targets=("q_proj", "v_proj"), b_scale=0.2)
    make_adapter(base_model, weights / "rank16", rank=16, targets=("q_proj", "v_proj"))
    make_adapter(base_model, weights / "mlp", rank=RANK, targets=("q_proj", "gate_proj"))
    return {"weights": weights, "fits": str(weights / "v1"), "rank16": str(weights / "rank16"),
            "mlp": str(weights / "mlp"), "merged": fitting.merge_and_unload().eval()}


@pytest.fixture(scope="module", params=["catq", pytest.param("sglang", marks=pytest.mark.sglang)])
def lora_engine(request, adapters):
    """(backend name, url) of a running server with LoRA enabled and both keys set."""
    flags = server_flags(rank=RANK, target_modules=TARGETS)
    if request.param == "catq":
        proc = EngineProcess("default", weights_dir=adapters["weights"], extra_args=flags,
                             env={"CATQ_ENGINE_API_KEY": API_KEY, "CATQ_ENGINE_ADMIN_API_KEY": ADMIN_KEY})
    else:
        proc = SGLangProcess("default", api_key=API_KEY, admin_api_key=ADMIN_KEY, extra_args=flags)
    with proc:
        yield request.param, proc.url


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return ChatTokenizer("default").encode_chat([{"role": "user", "content": "What is 7 + 5?"}])


@pytest.fixture(scope="module")
def forced_completion() -> list[int]:
    """Tokens both engines score (the same on both, whatever either would sample)."""
    return ChatTokenizer("default").encode("7 + 5 equals 12. Adding seven and five gives twelve.")


def mean_gap(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


async def load(url: str, name: str, path: str) -> tuple[int, dict]:
    return await post(url, "/load_lora_adapter", {"lora_name": name, "lora_path": path}, key=ADMIN_KEY)


async def unload(url: str, name: str) -> tuple[int, dict]:
    return await post(url, "/unload_lora_adapter", {"lora_name": name}, key=ADMIN_KEY)


async def greedy(url: str, ids: list[int], lora_path: str | None) -> tuple[int, object]:
    body = {"input_ids": ids, "return_logprob": True, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    if lora_path is not None:
        body["lora_path"] = lora_path
    return await post(url, "/generate", body)


async def test_load_generate_unload_and_an_unloaded_name_loads_again(lora_engine, adapters, prompt_ids):
    _, url = lora_engine
    status, reply = await load(url, "life", adapters["fits"])
    assert status == 200, reply
    assert reply["success"] is True and reply["error_message"] == ""
    assert reply["loaded_adapters"].get("life") == adapters["fits"]
    status, on_adapter = await greedy(url, prompt_ids, "life")
    assert status == 200 and on_adapter["meta_info"]["completion_tokens"] >= 1

    status, reply = await load(url, "life", adapters["fits"])
    assert status == 400 and reply["success"] is False and "already loaded" in reply["error_message"]
    status, reply = await unload(url, "life")
    assert status == 200 and reply["success"] is True and "life" not in reply["loaded_adapters"]
    status, reply = await unload(url, "life")
    assert status == 400 and reply["success"] is False and "does not exist" in reply["error_message"]

    # An unload frees the adapter's slot, not its name: a request naming it loads it again.
    status, again = await greedy(url, prompt_ids, "life")
    assert status == 200 and again["output_ids"] == on_adapter["output_ids"]
    # A name never loaded is refused, and the refusal names it.
    status, reply = await greedy(url, prompt_ids, "never-loaded")
    assert status == 400 and "never been loaded: never-loaded" in str(reply)
    status, _ = await unload(url, "life")
    assert status == 200


async def test_an_adapter_scores_as_the_merged_model(lora_engine, adapters, base_model, prompt_ids,
                                                     forced_completion):
    """The numbers: the same forced tokens scored on the adapter (a prefill, as the anchor path
    reads input_token_logprobs) and the engine's own samples on it (behaviour log-probs), against
    the merged model as the learner computes them."""
    name, url = lora_engine
    status, reply = await load(url, "scored", adapters["fits"])
    assert status == 200, reply
    merged = adapters["merged"]
    async with client(url) as c:
        [served] = await c.completion_logprobs(prompt_ids, [forced_completion], lora_path="scored")
        [on_base] = await c.completion_logprobs(prompt_ids, [forced_completion])
        sampled = await c.generate(prompt_ids, n=3, max_new_tokens=24, temperature=0.7, lora_path="scored")
    expected = learner_logprobs(merged, prompt_ids, forced_completion)
    prefill_gap, effect = mean_gap(served, expected), mean_gap(served, on_base)
    behaviour = behaviour_deltas(merged, prompt_ids, sampled)
    behaviour_gap = sum(behaviour) / len(behaviour)
    print(f"\n[{name}] adapter vs merged model: prefill mean |delta| {prefill_gap:.2e} "
          f"(max {max(abs(a - b) for a, b in zip(served, expected)):.2e}) over {len(served)} tokens; "
          f"behaviour mean |delta| {behaviour_gap:.2e} over {len(behaviour)} tokens; "
          f"adapter vs base model {effect:.2e}")
    assert effect > ADAPTER_EFFECT
    assert prefill_gap < LOGPROB_AGREEMENT and behaviour_gap < LOGPROB_AGREEMENT
    status, _ = await unload(url, "scored")
    assert status == 200


async def test_an_adapter_that_does_not_fit_the_flags_is_refused_and_the_loaded_one_keeps_serving(
        lora_engine, adapters, prompt_ids):
    _, url = lora_engine
    status, _ = await load(url, "kept", adapters["fits"])
    assert status == 200
    _, before = await greedy(url, prompt_ids, "kept")
    for name, path in (("too-wide", adapters["rank16"]), ("on-mlp", adapters["mlp"])):
        status, reply = await load(url, name, path)
        assert status == 400, (name, reply)
        assert reply["success"] is False and name in reply["error_message"], (name, reply)
        assert "kept" in reply["loaded_adapters"] and name not in reply["loaded_adapters"]
    status, after = await greedy(url, prompt_ids, "kept")
    assert status == 200 and after["output_ids"] == before["output_ids"]
    async with client(url) as c:  # the client's view of a refusal: an EngineError with the 400
        with pytest.raises(EngineError) as refused:
            await c.load_lora_adapter("too-wide", adapters["rank16"])
    assert refused.value.status == 400 and "too-wide" in str(refused.value)
    status, _ = await unload(url, "kept")
    assert status == 200
