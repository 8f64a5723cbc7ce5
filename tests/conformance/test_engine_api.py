"""One conformance suite, two backends: catq's engine and real SGLang 0.5.23 (on the CPU, from
catq's cached SGLang environment, installed on first use).

    python3 -m pytest tests/conformance                # both backends
    python3 -m pytest tests -m sglang                  # the real-SGLang half (and `catq up` on it)

Each backend serves the default model (SmolLM2-135M-Instruct, fp32) with an API key and an admin
key, as SGLang's --api-key / --admin-api-key. Every test talks HTTP to a real server process.
What one backend does and the other does not is fixed in catq, never here.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch

from catq.config import ConfigError
from catq.engines.client import (
    EngineAuthError,
    EngineClient,
    EngineError,
    check_raw_logprobs,
)
from catq.engines.tokenizer import ChatTokenizer
from tests.helpers.engine_proc import EngineProcess, SGLangProcess

pytestmark = pytest.mark.slow

API_KEY, ADMIN_KEY = "conformance-key", "conformance-admin-key"
LOGPROB_AGREEMENT = 1e-3
"""Mean |Δ| allowed between an engine's behaviour log-probs and the learner's recomputation."""


@pytest.fixture(scope="module", params=["catq", pytest.param("sglang", marks=pytest.mark.sglang)])
def engine(request, tmp_path_factory):
    """(backend name, url, weights dir) of a running server with both keys set."""
    weights = tmp_path_factory.mktemp(f"weights-{request.param}")
    if request.param == "catq":
        proc = EngineProcess("default", weights_dir=weights,
                             env={"CATQ_ENGINE_API_KEY": API_KEY, "CATQ_ENGINE_ADMIN_API_KEY": ADMIN_KEY})
    else:
        proc = SGLangProcess("default", api_key=API_KEY, admin_api_key=ADMIN_KEY)
    with proc:
        yield request.param, proc.url, weights


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return ChatTokenizer("default").encode_chat([{"role": "user", "content": "What is 7 + 5?"}])


@pytest.fixture(scope="module")
def model():
    from catq.engines.models import load_causal_lm

    return load_causal_lm("default")


def client(url: str, *, api_key: str = API_KEY, admin_api_key: str = ADMIN_KEY) -> EngineClient:
    return EngineClient(url, timeout_s=120, max_attempts=1, api_key=api_key, admin_api_key=admin_api_key)


async def post(url: str, path: str, body: dict, key: str | None = API_KEY) -> tuple[int, object]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http, http.post(url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def learner_logprobs(model, prompt_ids: list[int], output_ids: list[int]) -> list[float]:
    """What catq's learner computes for these tokens (catq.learner.grpo.sequence_logprobs)."""
    from catq.learner.grpo import TrainSample, sequence_logprobs

    sample = TrainSample(prompt_ids, output_ids, [0.0] * len(output_ids), 0.0)
    return sequence_logprobs(model, [sample])[0].tolist()


def behaviour_deltas(model, prompt_ids: list[int], completions) -> list[float]:
    """|engine - learner| for every sampled token: each completion's log-probs of its own tokens
    against :func:`learner_logprobs` of the same tokens."""
    deltas = []
    for completion in completions:
        recomputed = learner_logprobs(model, prompt_ids, completion.output_ids)
        deltas += [abs(a - b) for a, b in zip(completion.logprobs, recomputed, strict=True)]
    return deltas


# -- generation ---------------------------------------------------------------------------------


async def test_generate_n_samples_with_logprobs(engine, prompt_ids):
    _, url, _ = engine
    async with client(url) as c:
        completions = await c.generate(prompt_ids, n=3, max_new_tokens=8, temperature=0.7, top_k=20)
    assert len(completions) == 3
    for completion in completions:
        assert 0 < len(completion.output_ids) == len(completion.logprobs) == completion.completion_tokens <= 8
        assert completion.prompt_tokens == len(prompt_ids)
        assert completion.finish_reason in ("stop", "length")
        assert completion.weight_version == "default"


async def test_batch_of_prompts_comes_back_grouped_in_order(engine, prompt_ids):
    _, url, _ = engine
    other = ChatTokenizer("default").encode_chat([{"role": "user", "content": "Name a colour."}])
    async with client(url) as c:
        groups = await c.generate_batch([prompt_ids, other], n=2, max_new_tokens=6, temperature=0.7)
    assert [len(g) for g in groups] == [2, 2]
    assert [g[0].prompt_tokens for g in groups] == [len(prompt_ids), len(other)]


async def test_max_new_tokens_and_stop_strings(engine, prompt_ids):
    _, url, _ = engine
    async with client(url) as c:
        [full] = await c.generate(prompt_ids, max_new_tokens=24, temperature=0)
        [short] = await c.generate(prompt_ids, max_new_tokens=3, temperature=0)
        assert short.finish_reason == "length" and short.output_ids == full.output_ids[:3]
        words = full.text.split()
        assert len(words) >= 3, full.text
        stop = words[2]
        [stopped] = await c.generate(prompt_ids, max_new_tokens=24, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text and full.text.startswith(stopped.text)


async def test_input_logprobs_from_logprob_start_len_with_the_leading_null(engine, prompt_ids, model):
    _, url, _ = engine
    status, item = await post(url, "/generate", {
        "input_ids": prompt_ids, "return_logprob": True, "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    assert status == 200
    entries = item["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt_ids
    assert entries[0] == [None, prompt_ids[0], None]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(prompt_ids[1:]).unsqueeze(-1))
    assert [e[0] for e in entries[1:]] == pytest.approx(expected.squeeze(-1).tolist(), abs=2e-3)
    status, item = await post(url, "/generate", {
        "input_ids": prompt_ids, "return_logprob": True, "logprob_start_len": 5,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0}})
    entries = item["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in entries] == prompt_ids[5:]
    assert entries[0][0] is None and all(e[0] is not None for e in entries[1:])  # SGLang nulls the first


async def test_behaviour_logprobs_agree_with_the_learner(engine, prompt_ids, model):
    """The numbers: sampled at T=0.7, the engine's log-probs of its own tokens against the
    learner's recomputation with the same weights (raw, temperature-free on both sides)."""
    name, url, _ = engine
    async with client(url) as c:
        completions = await c.generate(prompt_ids, n=4, max_new_tokens=32, temperature=0.7, top_p=0.8, top_k=20)
        gap = await check_raw_logprobs(c, prompt_ids)
    deltas = behaviour_deltas(model, prompt_ids, completions)
    mean = sum(deltas) / len(deltas)
    print(f"\n[{name}] behaviour vs learner log-probs: mean |delta| {mean:.2e}, max {max(deltas):.2e} "
          f"over {len(deltas)} tokens; raw-logprob check gap {gap:.1e}")
    assert mean < LOGPROB_AGREEMENT


async def test_anchor_logprobs_from_a_prefill_agree_with_the_learner(engine, prompt_ids, model):
    """The anchor engine's π0 log-probs for the KL term (a prefill with max_new_tokens 0, read
    from input_token_logprobs) against the learner's own recomputation; an empty completion
    costs no request and scores nothing."""
    name, url, _ = engine
    async with client(url) as c:
        sampled = await c.generate(prompt_ids, n=3, max_new_tokens=24, temperature=1.0)
        completions = [s.output_ids for s in sampled] + [[]]
        scored = await c.completion_logprobs(prompt_ids, completions)
    assert [len(s) for s in scored] == [len(c) for c in completions]
    deltas = []
    for completion, values in zip(completions[:-1], scored[:-1], strict=True):
        deltas += [abs(a - b) for a, b in zip(values, learner_logprobs(model, prompt_ids, completion), strict=True)]
    mean = sum(deltas) / len(deltas)
    print(f"\n[{name}] anchor prefill vs learner log-probs: mean |delta| {mean:.2e} over {len(deltas)} tokens")
    assert mean < LOGPROB_AGREEMENT


# -- refusals, as SGLang refuses ------------------------------------------------------------------


async def test_refusals_and_tolerances(engine, prompt_ids):
    _, url, _ = engine
    base = {"input_ids": prompt_ids, "sampling_params": {"max_new_tokens": 2}}
    status, reply = await post(url, "/generate", {**base, "sampling_params": {"max_new_tokens": 2, "top_k": 0}})
    assert status == 400 and "top_k must be -1 (disable) or at least 1" in str(reply)
    status, reply = await post(url, "/generate", {**base, "sampling_params": {"max_new_tokens": 10**6}})
    assert status == 400 and "maximum context length" in str(reply)
    status, reply = await post(url, "/generate", {**base, "sampling_params": {"max_new_tokens": 2, "bogus": 1}})
    assert status == 400 and "bogus" in str(reply)
    status, _ = await post(url, "/generate", {**base, "not_an_sglang_field": 1})
    assert status == 200  # unknown top-level keys are ignored
    status, _ = await post(url, "/generate", {**base, "sampling_params": {"max_new_tokens": 2, "min_p": 0.1}})
    assert status == 200
    async with client(url) as c:
        context = await c.context_length()
        assert await c.fit_max_new_tokens([prompt_ids], 10**6) == context - len(prompt_ids)
        with pytest.raises(EngineError) as refused:
            await c.generate([1] * (context + 1), max_new_tokens=4)
        assert refused.value.status == 400


async def test_api_keys_as_sglang_checks_them(engine, prompt_ids):
    _, url, _ = engine
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/health") as resp:
            assert resp.status == 200  # open to probes without a key
        async with http.get(url + "/model_info") as resp:
            assert resp.status == 401
    status, _ = await post(url, "/generate", {"input_ids": prompt_ids}, key=None)
    assert status == 401
    async with client(url, api_key="") as c:
        with pytest.raises(EngineAuthError) as caught:
            await c.generate(prompt_ids, max_new_tokens=1)
    assert isinstance(caught.value, ConfigError) and "api_key_env" in str(caught.value)
    async with client(url, admin_api_key="") as c:  # the API key does not open admin routes
        with pytest.raises(EngineAuthError):
            await c.update_weights_from_disk("/nonexistent", weight_version="9")
        assert await c.weight_version() == "default"


# -- control: pause/continue and aborted items ----------------------------------------------------


async def test_pause_abort_gives_aborted_items_and_continue_resumes(engine, prompt_ids):
    _, url, _ = engine
    story = ChatTokenizer("default").encode_chat(
        [{"role": "user", "content": "Write a very long story about a ship at sea."}])
    async with client(url) as c:
        running = asyncio.create_task(c.generate(story, n=2, max_new_tokens=400, temperature=0.7))
        await asyncio.sleep(1.5)
        await c.pause_generation(mode="abort")
        completions = await asyncio.wait_for(running, 60)
        assert len(completions) == 2 and any(x.aborted for x in completions)  # a sample may end first
        assert all(x.aborted or x.finish_reason == "stop" for x in completions)
        await c.continue_generation()
        [after] = await c.generate(prompt_ids, max_new_tokens=2, temperature=0)
    assert not after.aborted and after.completion_tokens >= 1


# -- weights ----------------------------------------------------------------------------------------


def write_version(weights_dir, version: int, scale: float):
    from catq.engines.models import load_causal_lm, load_tokenizer
    from catq.learner.publish import write_weights

    model = load_causal_lm("default")
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(scale)
    return write_weights(model, load_tokenizer("default"), weights_dir, version)


async def test_weight_update_from_disk_round_trip_and_a_bad_path(engine, prompt_ids):
    _, url, weights = engine
    changed, original = write_version(weights, 1, 0.9), write_version(weights, 2, 1.0)
    async with client(url) as c:
        [before] = await c.generate(prompt_ids, max_new_tokens=6, temperature=0)
        reply = await c.update_weights_from_disk(str(changed), weight_version="1")
        assert reply["success"] is True
        assert await c.weight_version() == "1"
        [moved] = await c.generate(prompt_ids, max_new_tokens=6, temperature=0)
        assert moved.weight_version == "1"
        assert moved.logprobs[0] != pytest.approx(before.logprobs[0], abs=1e-3)
        await c.update_weights_from_disk(str(original), weight_version="2")
        [back] = await c.generate(prompt_ids, max_new_tokens=6, temperature=0)
        assert back.output_ids == before.output_ids and back.weight_version == "2"
        assert back.logprobs == pytest.approx(before.logprobs, abs=1e-3)
        with pytest.raises(EngineError) as refused:
            await c.update_weights_from_disk(str(weights / "missing"), weight_version="3")
        assert refused.value.status == 400
        assert await c.weight_version() == "2"
        [still] = await c.generate(prompt_ids, max_new_tokens=2, temperature=0)
    assert still.completion_tokens >= 1


# -- the log-prob convention check ---------------------------------------------------------------


@pytest.mark.sglang
async def test_sglang_without_original_logprobs_is_caught_at_start(prompt_ids):
    """An SGLang that catq did not start, without SGLANG_RETURN_ORIGINAL_LOGPROB=1, returns
    temperature-scaled log-probs: rollout's start-up check refuses it."""
    proc = SGLangProcess("default")
    proc.environment = lambda: {k: v for k, v in SGLangProcess.environment(proc).items()
                                if k != "SGLANG_RETURN_ORIGINAL_LOGPROB"}
    with proc:
        async with client(proc.url, api_key="", admin_api_key="") as c:
            with pytest.raises(ConfigError, match="SGLANG_RETURN_ORIGINAL_LOGPROB"):
                await check_raw_logprobs(c, prompt_ids)
