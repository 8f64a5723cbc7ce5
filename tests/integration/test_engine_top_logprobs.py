"""SGLang's top_logprobs_num / token_ids_logprob on catq's engine as a real process on the default
model (SmolLM2-135M-Instruct), checked against a plain forward pass, and the log-prob judge on it."""

from __future__ import annotations

import pytest
import torch

from catq.config import JudgeConfig, SamplingConfig
from catq.engines.client import EngineClient
from catq.engines.models import load_causal_lm
from catq.engines.tokenizer import ChatTokenizer
from catq.messages import ChatMessage, Prompt, ReferencedGroup, Rollout, RolloutGroup
from catq.teacher.chat import EngineChat
from catq.teacher.judging import score_group
from tests.helpers.engine_proc import engine_factory  # noqa: F401

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-3
"""Server log-probs (KV-cached, fp32 CPU) vs one plain forward pass: float rounding only."""

QUESTION = "What is the capital of France?"
RESPONSE = "The capital of France is Paris."
CRITERION = "The response names Paris as the capital."


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    return ChatTokenizer("default")


async def test_top_and_token_ids_logprobs_match_a_forward_pass(engine_factory, tokenizer):  # noqa: F811
    engine = engine_factory("default")
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Is Paris in France? Answer yes or no."}])
    probe = [tokenizer.encode(w)[0] for w in ("Yes", "No", " yes", " no")]
    async with EngineClient(engine.url) as client:
        [c] = await client.generate(prompt, max_new_tokens=1, temperature=0.0, top_logprobs_num=5,
                                    token_ids_logprob=probe)
    with torch.no_grad():
        logits = load_causal_lm("default", device="cpu")(torch.tensor([prompt])).logits[0, -1].float()
    expected = torch.log_softmax(logits, -1)
    top = torch.topk(expected, 5)
    [served_top] = c.top_logprobs
    [served_ids] = c.token_ids_logprobs
    assert list(served_top) == top.indices.tolist()  # likeliest first, as SGLang orders them
    assert list(served_top.values()) == pytest.approx(top.values.tolist(), abs=LOGPROB_ATOL)
    assert list(served_ids) == probe
    assert list(served_ids.values()) == pytest.approx(expected[probe].tolist(), abs=LOGPROB_ATOL)
    assert c.output_ids == [top.indices[0].item()]
    assert c.logprobs[0] == pytest.approx(top.values[0].item(), abs=LOGPROB_ATOL)


async def test_a_judge_call_on_the_default_model_always_returns_a_verdict(engine_factory, tokenizer):  # noqa: F811
    engine = engine_factory("default")
    judge = EngineChat(EngineClient(engine.url), tokenizer, SamplingConfig(temperature=0.0, max_new_tokens=8))
    prompt = Prompt("p", "open", [ChatMessage("user", QUESTION)])
    group = RolloutGroup(prompt, [1], [Rollout(RESPONSE, [1, 2, 3], [-1.0] * 3, "stop")], policy_version=0)
    referenced = ReferencedGroup(group, "ref", "synthesis", "out", rubric=[CRITERION])
    try:
        hard = await score_group(referenced, judge, JudgeConfig())
        soft = await score_group(referenced, judge, JudgeConfig(soft=True))
    finally:
        await judge.close()
    [verdict] = hard.verdicts
    assert verdict.parsed and verdict.raw.startswith("p_yes=")
    p_yes, p_no = (float(part.split("=")[1]) for part in verdict.raw.split())
    assert 0 < p_yes + p_no <= 1 and verdict.satisfied == (p_yes > p_no)
    assert hard.rewards == [float(verdict.satisfied)]
    assert soft.rewards[0] == pytest.approx(p_yes / (p_yes + p_no), rel=1e-2)
