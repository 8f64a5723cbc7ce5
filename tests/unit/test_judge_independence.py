"""`catq up` warns, once, when the judge serves the policy's weights (the paper's judge is an
independent, stronger model)."""

from __future__ import annotations

import io

from catq.config import Config, load_config
from catq.launcher import Stack
from catq.teacher.chat import judge_independence_warning

URLS = {"policy_urls": ["http://127.0.0.1:30000"], "anchor_url": "http://127.0.0.1:30001"}


def config(model=None, **engines) -> Config:
    return Config.model_validate({"model": model or {"policy": "/models/Qwen3-4B", "anchor": "/models/Qwen3-4B"},
                                  "engines": {**URLS, **engines}})


def test_a_judge_on_the_anchor_engine_serves_the_policys_weights():
    warning = judge_independence_warning(config(judge_url="http://127.0.0.1:30001/"))
    assert warning and "/models/Qwen3-4B" in warning and "reward hacking" in warning


def test_a_judge_that_is_a_policy_engine_is_named():
    assert "is a policy engine" in judge_independence_warning(config(judge_url="http://127.0.0.1:30000"))


def test_a_hosted_judge_of_the_same_model_by_name_counts_too():
    assert judge_independence_warning(config(judge_api="openai", judge_url="https://x/v1", judge_model="Qwen/qwen3-4b"))


def test_independent_judges_pass():
    assert judge_independence_warning(config(judge_api="openai", judge_url="https://x/v1", judge_model="gpt-4o")) is None
    launched = config(judge_url="http://127.0.0.1:30002", judge_model="/models/Qwen3-14B",
                      launch=[{"name": "judge", "kind": "sglang", "model": "/models/Qwen3-14B", "port": 30002}])
    assert judge_independence_warning(launched) is None
    assert judge_independence_warning(load_config("configs/gpu-open.toml")) is None


def test_catq_up_says_it_once():
    out = io.StringIO()
    stack = Stack(config(judge_url="http://127.0.0.1:30001"), None, out=out)
    stack._warn_if_judge_is_policy()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[catq up] warning: the judge serves the policy's own weights")
    quiet = io.StringIO()
    Stack(load_config("configs/gpu-open.toml"), None, out=quiet)._warn_if_judge_is_policy()
    assert quiet.getvalue() == ""
