"""The log-prob judge: SGLang's top_logprobs_num / token_ids_logprob end to end on a tiny model
(engine, client), the client on hand-made SGLang replies, EngineChat.yes_no, and yes/no verdicts
and soft rewards from P(yes) and P(no) (catq.teacher.judging)."""

from __future__ import annotations

import math

import pytest
import torch
from aiohttp import web

from catq.config import JudgeConfig, SamplingConfig
from catq.engines.batching import BatchGenerator, Sequence
from catq.engines.client import EngineClient, EngineError
from catq.engines.models import load_causal_lm, load_tokenizer
from catq.engines.openai import ChatClient
from catq.engines.sampling import SamplingParams
from catq.engines.app import build_app
from catq.engines.server import Engine
from catq.engines.tokenizer import ChatTokenizer
from catq.messages import ChatMessage, Prompt, ReferencedGroup, Rollout, RolloutGroup
from catq.teacher.chat import EngineChat, OpenAIChat
from catq.teacher.judging import score_group
from tests.helpers.engine_proc import free_port
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401

PROMPT = [1, 9690, 198, 2683, 359]

# One /generate item exactly as SGLang sends it for max_new_tokens=1, return_logprob,
# top_logprobs_num=2, token_ids_logprob=[9, 7] (entries are [logprob, token_id, text|None]).
SGLANG_ITEM = {
    "text": "Yes", "output_ids": [7],
    "meta_info": {
        "id": "5f0c", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": 12,
        "weight_version": "default", "completion_tokens": 1, "cached_tokens": 0, "e2e_latency": 0.03,
        "input_token_logprobs": [[None, 4, None]],
        "output_token_logprobs": [[-0.25, 7, None]],
        "input_top_logprobs": [None],
        "output_top_logprobs": [[[-0.25, 7, None], [-1.75, 9, None]]],
        "input_token_ids_logprobs": [None],
        "output_token_ids_logprobs": [[[-1.75, 9, None], [-0.25, 7, None]]],
    },
}


# -- the client on SGLang's reply shape ------------------------------------------------------


@pytest.fixture
async def scripted():
    """(url, replies, requests): each request gets the next (status, body) of ``replies``."""
    replies: list[tuple[int, object]] = []
    requests: list[dict] = []

    async def reply(request: web.Request) -> web.Response:
        if request.path == "/v1/models":  # the client reads the context length once, unscripted
            return web.json_response({"object": "list", "data": [{"id": "m", "max_model_len": 2048}]})
        requests.append(await request.json())
        status, body = replies.pop(0)
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", reply)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}", replies, requests
    await runner.cleanup()


async def test_client_parses_sglang_top_and_token_ids_logprobs(scripted):
    url, replies, requests = scripted
    replies.append((200, SGLANG_ITEM))
    async with EngineClient(url) as client:
        [c] = await client.generate([1, 2], max_new_tokens=1, return_logprob=False,
                                    top_logprobs_num=2, token_ids_logprob=[9, 7])
    assert requests[0]["top_logprobs_num"] == 2 and requests[0]["token_ids_logprob"] == [9, 7]
    assert requests[0]["return_logprob"] is True  # SGLang returns neither without it
    assert c.logprobs == [-0.25]
    assert c.top_logprobs == [{7: -0.25, 9: -1.75}]
    assert c.token_ids_logprobs == [{9: -1.75, 7: -0.25}]


async def test_client_leaves_the_new_fields_out_unless_asked(scripted):
    url, replies, requests = scripted
    replies.append((200, SGLANG_ITEM))
    async with EngineClient(url) as client:
        [c] = await client.generate([1, 2])
    assert "top_logprobs_num" not in requests[0] and "token_ids_logprob" not in requests[0]
    assert c.top_logprobs is None and c.token_ids_logprobs is None


async def test_a_requested_field_missing_from_the_reply_is_an_error(scripted):
    url, replies, _ = scripted
    item = {**SGLANG_ITEM, "meta_info": {k: v for k, v in SGLANG_ITEM["meta_info"].items()
                                         if k != "output_token_ids_logprobs"}}
    replies.append((200, item))
    async with EngineClient(url) as client:
        with pytest.raises(EngineError, match="malformed"):
            await client.generate([1, 2], token_ids_logprob=[9])


# -- catq's engine: the same fields, from the raw distribution ---------------------------------


@pytest.fixture(scope="module")
def generator(tiny_model_path) -> BatchGenerator:  # noqa: F811
    return BatchGenerator(load_causal_lm(str(tiny_model_path)), load_tokenizer(str(tiny_model_path)), seed=0)


@pytest.fixture
async def engine_url(generator, tiny_model_path):  # noqa: F811
    engine = Engine(generator, model_path=str(tiny_model_path), served_name="tiny", weights_dir=None, max_batch=8)
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


def forward_logprobs(generator: BatchGenerator, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(generator.model(torch.tensor([ids])).logits[0, -1].float(), -1)


async def test_engine_returns_sglang_shaped_top_and_token_ids_logprobs(engine_url, generator):
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0},
            "return_logprob": True, "top_logprobs_num": 3, "token_ids_logprob": [11, 5, 11],
            "return_text_in_logprobs": True}
    async with EngineClient(engine_url) as client:
        item = await client.request("POST", "/generate", body)
    meta = item["meta_info"]
    assert len(meta["output_top_logprobs"]) == len(meta["output_token_ids_logprobs"]) == 2
    assert [[tok for _, tok, _ in pos] for pos in meta["output_token_ids_logprobs"]] == [[11, 5, 11]] * 2
    assert all(isinstance(text, str) for pos in meta["output_top_logprobs"] for _, _, text in pos)
    expected = forward_logprobs(generator, PROMPT)
    top = torch.topk(expected, 3)
    first = meta["output_top_logprobs"][0]
    assert [tok for _, tok, _ in first] == top.indices.tolist()
    assert [lp for lp, _, _ in first] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert first[0][1] == item["output_ids"][0] and first[0][0] == pytest.approx(meta["output_token_logprobs"][0][0])
    assert [lp for lp, _, _ in meta["output_token_ids_logprobs"][0]] == pytest.approx(
        expected[[11, 5, 11]].tolist(), abs=1e-4)


async def test_engine_returns_them_only_with_return_logprob_and_refuses_bad_ids(engine_url):
    async with EngineClient(engine_url) as client:
        item = await client.request("POST", "/generate", {
            "input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1},
            "top_logprobs_num": 2, "token_ids_logprob": [3]})
        assert "output_top_logprobs" not in item["meta_info"]
        with pytest.raises(EngineError, match="token_ids_logprob") as caught:
            await client.generate(PROMPT, max_new_tokens=1, token_ids_logprob=[10 ** 9])
        assert caught.value.status == 400
        with pytest.raises(EngineError, match="2 lists for 1 prompts"):
            await client.request("POST", "/generate", {"input_ids": [PROMPT], "return_logprob": True,
                                                       "token_ids_logprob": [[1], [2]]})
        groups = await client.generate_batch([PROMPT, [7, 8]], max_new_tokens=1, n=2, top_logprobs_num=4)
    assert [len(c.top_logprobs[0]) for group in groups for c in group] == [4] * 4
    assert groups[0][0].top_logprobs == groups[0][1].top_logprobs != groups[1][0].top_logprobs


async def test_openai_route_returns_top_logprobs(engine_url):
    async with ChatClient(engine_url) as client:
        top = await client.first_token_logprobs([{"role": "user", "content": "Is 2 even?"}], top_logprobs=5)
    assert len(top) == 5 and all(isinstance(t, str) and lp <= 0 for t, lp in top)
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_batches_that_ask_nothing_compute_nothing(generator):
    plain = Sequence(list(PROMPT), SamplingParams(max_new_tokens=3, temperature=0))
    asking = Sequence(list(PROMPT), SamplingParams(max_new_tokens=3, temperature=0), top_logprobs_num=1)
    generator.generate([plain, asking])
    assert plain.alternatives == [] and len(asking.alternatives) == 3
    assert [a.top[0][1] for a in asking.alternatives] == asking.output_ids  # greedy = top-1


# -- EngineChat.yes_no ---------------------------------------------------------------------------


async def test_engine_chat_yes_no_sums_single_token_spellings(engine_url, tiny_model_path, generator):  # noqa: F811
    tokenizer = ChatTokenizer(str(tiny_model_path))
    chat = EngineChat(EngineClient(engine_url), tokenizer, SamplingConfig())
    yes_ids, no_ids = chat.yes_no_token_ids
    assert len(yes_ids) == len(set(yes_ids)) >= 2 and len(no_ids) >= 2 and not set(yes_ids) & set(no_ids)
    assert all(len(tokenizer.encode(tokenizer.decode([i]))) == 1 for i in yes_ids + no_ids)
    messages = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    p_yes, p_no = await chat.yes_no(messages)
    expected = forward_logprobs(generator, tokenizer.encode_chat(messages)).exp()
    assert p_yes == pytest.approx(expected[yes_ids].sum().item(), rel=1e-3)
    assert p_no == pytest.approx(expected[no_ids].sum().item(), rel=1e-3)
    await chat.close()


# -- verdicts and rewards -------------------------------------------------------------------------


def referenced(texts, rubric):
    prompt = Prompt("p", "open", [ChatMessage("user", "How do I sleep better?")])
    rollouts = [Rollout(t, [1, 2, 3], [-1.0] * 3, "stop") for t in texts]
    return ReferencedGroup(RolloutGroup(prompt, [1], rollouts, policy_version=0), "ref", "synthesis", "out",
                           rubric=list(rubric))


def pair_of(messages) -> tuple[str, str]:
    content = messages[1]["content"]
    return (content.split("<response>\n")[1].split("\n</response>")[0],
            content.split("<criterion>\n")[1].split("\n</criterion>")[0])


class FakeEngineChat:
    """A judge with yes_no: (P(yes), P(no)) by (response, criterion); text replies likewise."""

    def __init__(self, probs, texts=None):
        self.probs, self.texts = probs, texts or {}
        self.prob_calls = self.text_calls = 0

    async def yes_no(self, messages):
        self.prob_calls += 1
        return self.probs.get(pair_of(messages))

    async def __call__(self, messages, *, temperature=None, prefix="", max_new_tokens=None):
        self.text_calls += 1
        return self.texts[pair_of(messages)]


PROBS = {("r0", "c0"): (0.6, 0.3), ("r0", "c1"): (0.2, 0.7), ("r1", "c0"): (0.05, 0.9), ("r1", "c1"): (0.1, 0.4)}


async def test_the_likelier_word_is_the_verdict_and_every_call_parses():
    judge = FakeEngineChat(PROBS)
    scored = await score_group(referenced(["r0", "r1"], ["c0", "c1"]), judge, JudgeConfig())
    by_pair = {(v.rollout_index, v.criterion_index): v for v in scored.verdicts}
    assert [by_pair[(0, 0)].satisfied, by_pair[(0, 1)].satisfied, by_pair[(1, 0)].satisfied] == [True, False, False]
    assert all(v.parsed for v in scored.verdicts)
    assert by_pair[(0, 0)].raw == "p_yes=0.6 p_no=0.3"
    assert scored.rewards == [0.5, 0.0]
    assert judge.prob_calls == 4 and judge.text_calls == 0


async def test_soft_reward_is_the_mean_normalised_p_yes():
    scored = await score_group(referenced(["r0", "r1"], ["c0", "c1"]), FakeEngineChat(PROBS),
                               JudgeConfig(soft=True, length_penalty_tokens=0))
    assert scored.rewards[0] == pytest.approx((0.6 / 0.9 + 0.2 / 0.9) / 2)
    assert scored.rewards[1] == pytest.approx((0.05 / 0.95 + 0.1 / 0.5) / 2)
    penalised = await score_group(referenced(["r0", "r1"], ["c0", "c1"]), FakeEngineChat(PROBS),
                                  JudgeConfig(soft=True, length_penalty_tokens=2))
    assert penalised.rewards == [-1.0, -1.0]  # the length penalty is unchanged


async def test_text_mode_parses_replies_and_ignores_probabilities():
    texts = {("r0", "c0"): "Yes.", ("r0", "c1"): "No", ("r1", "c0"): "maybe", ("r1", "c1"): "no"}
    judge = FakeEngineChat(PROBS, texts)
    scored = await score_group(referenced(["r0", "r1"], ["c0", "c1"]), judge, JudgeConfig(verdict="text", attempts=1))
    assert scored.rewards == [0.5, 0.0] and judge.prob_calls == 0 and judge.text_calls == 4
    unparsed = [v for v in scored.verdicts if not v.parsed]
    assert [(v.rollout_index, v.criterion_index, v.raw) for v in unparsed] == [(1, 0, "maybe")]


async def test_a_judge_without_probabilities_falls_back_to_text():
    texts = {("r0", "c0"): "yes", ("r0", "c1"): "yes"}
    judge = FakeEngineChat({("r0", "c1"): (0.0, 0.0)}, texts)  # (r0, c0): None (not offered)
    scored = await score_group(referenced(["r0"], ["c0", "c1"]), judge, JudgeConfig(soft=True))
    assert scored.rewards == [1.0] and judge.text_calls == 2
    assert [v.raw for v in scored.verdicts] == ["yes", "yes"]


def test_soft_needs_logprob_verdicts():
    with pytest.raises(ValueError, match="soft"):
        JudgeConfig(soft=True, verdict="text")


async def test_openai_judge_uses_top_logprobs_and_falls_back_once_refused(scripted):
    url, replies, requests = scripted

    def reply(top):
        content = [{"token": top[0][0], "logprob": top[0][1], "bytes": None,
                    "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": top[0][0]},
                             "logprobs": {"content": content}, "finish_reason": "length"}]}

    replies.append((200, reply([("Yes", math.log(0.5)), (" yes", math.log(0.1)), ("No", math.log(0.3)),
                                ("Maybe", math.log(0.05))])))
    chat = OpenAIChat(ChatClient(url, model="m"), SamplingConfig())
    p_yes, p_no = await chat.yes_no([{"role": "user", "content": "?"}])
    assert (p_yes, p_no) == (pytest.approx(0.6), pytest.approx(0.3))
    assert requests[0]["logprobs"] is True and requests[0]["top_logprobs"] == 5 and requests[0]["max_tokens"] == 1
    replies.append((400, {"error": {"message": "logprobs are not supported with this model"}}))
    assert await chat.yes_no([{"role": "user", "content": "?"}]) is None
    assert await chat.yes_no([{"role": "user", "content": "?"}]) is None and len(requests) == 2
    await chat.close()
