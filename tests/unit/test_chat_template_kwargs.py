"""``model.chat_template_kwargs`` (e.g. enable_thinking = false for Qwen3) reaches every rendered
prompt: catq's client-side templating (rollouts, anchor, engine judge), catq's engine's
/v1/chat/completions, and the request an OpenAI-compatible judge receives. The template here is a
small local one that honours the flag as Qwen3's does (an empty think block when it is false)."""

from __future__ import annotations

import shutil

import aiohttp
import pytest
from aiohttp import web

from catq.config import Config
from catq.engines.batching import BatchGenerator
from catq.engines.models import load_causal_lm, load_tokenizer
from catq.engines.openai import ChatClient
from catq.engines.app import build_app
from catq.engines.server import Engine
from catq.engines.tokenizer import ChatTokenizer, chat_tokenizer
from catq.teacher.chat import judge_chat
from tests.helpers.engine_proc import free_port
from tests.helpers.tiny_model import tiny_model_path  # noqa: F401

THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
NO_THINK = {"enable_thinking": False}
CHAT = [{"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def thinking_model(tiny_model_path, tmp_path_factory):  # noqa: F811
    """The tiny model with a chat template that honours enable_thinking."""
    path = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model_path, path)
    tokenizer = load_tokenizer(str(path))
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def rendered(tokenizer: ChatTokenizer) -> str:
    return tokenizer.decode(tokenizer.encode_chat(CHAT), skip_special_tokens=False)


def test_client_side_template_renders_the_flag(thinking_model):
    thinking = rendered(ChatTokenizer(thinking_model))
    not_thinking = rendered(ChatTokenizer(thinking_model, template_kwargs=NO_THINK))
    assert thinking.endswith("<|im_start|>assistant\n") and "<think>" not in thinking
    assert not_thinking == thinking + "<think>\n\n</think>\n\n"


def config_with(thinking_model: str, **engines) -> Config:
    return Config.model_validate({
        "model": {"policy": thinking_model, "anchor": thinking_model, "chat_template_kwargs": NO_THINK},
        "engines": engines})


def test_the_configured_kwargs_reach_policy_anchor_and_engine_judge(thinking_model):
    config = config_with(thinking_model)
    assert rendered(chat_tokenizer(config, config.model.policy)).endswith("</think>\n\n")
    assert judge_chat(config).tokenizer.template_kwargs == NO_THINK  # judge on the anchor's engine
    own = config_with(thinking_model, judge_chat_template_kwargs={})
    assert "<think>" not in rendered(judge_chat(own).tokenizer)  # an explicit table wins


@pytest.fixture
async def engine_url(thinking_model):
    model = load_causal_lm(thinking_model)
    engine = Engine(BatchGenerator(model, load_tokenizer(thinking_model), seed=0), model_path=thinking_model,
                    served_name="tiny", weights_dir=None, max_batch=4)
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def chat_completion(url: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def test_catq_engine_applies_chat_template_kwargs_like_sglang(engine_url, thinking_model):
    base = {"messages": CHAT, "max_tokens": 1, "temperature": 0}
    status, plain = await chat_completion(engine_url, base)
    assert status == 200
    status, no_think = await chat_completion(engine_url, {**base, "chat_template_kwargs": NO_THINK})
    assert status == 200
    think_block = ChatTokenizer(thinking_model).encode("<think>\n\n</think>\n\n")
    assert no_think["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"] + len(think_block)
    status, refused = await chat_completion(engine_url, {**base, "chat_template_kwargs": {"tokenize": False}})
    assert status == 400 and "tokenize" in refused["error"]["message"]


@pytest.fixture
async def recording_endpoint():
    """An OpenAI-compatible endpoint that records each request body."""
    bodies: list[dict] = []

    async def complete(request: web.Request) -> web.Response:
        bodies.append(await request.json())
        return web.json_response({"choices": [{"index": 0, "message": {"content": "yes"}}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1", bodies
    await runner.cleanup()


async def test_openai_judge_sends_chat_template_kwargs_only_when_configured(recording_endpoint):
    url, bodies = recording_endpoint
    for kwargs in (None, NO_THINK):
        client = ChatClient(url, model="judge", chat_template_kwargs=kwargs)
        await client.complete(CHAT)
        await client.close()
    assert "chat_template_kwargs" not in bodies[0]  # hosted APIs refuse unknown fields
    assert bodies[1]["chat_template_kwargs"] == NO_THINK


def test_a_config_that_sets_catqs_own_template_arguments_is_refused(tmp_path):
    from catq.config import ConfigError, load_config

    path = tmp_path / "c.toml"
    path.write_text("[model]\nchat_template_kwargs = { tokenize = false }\n")
    with pytest.raises(ConfigError, match="model.chat_template_kwargs.*tokenize"):
        load_config(path)
    path.write_text("[engines]\njudge_chat_template_kwargs = { add_generation_prompt = false }\n")
    with pytest.raises(ConfigError, match="add_generation_prompt"):
        load_config(path)
