"""The rollout/anchor/judge handlers with fake engines, bus and result store (no Redis, no model)."""

from types import SimpleNamespace

import pytest
import structlog

from catq.config import load_config
from catq.engines.client import EngineError, parse_version
from catq.messages import ChatMessage, Prompt, RolloutGroup
from catq.runtime import DeadLetterError, WorkerContext
from catq.teacher.anchor import AnchorHandler
from catq.teacher.judge import JudgeHandler
from catq.teacher.rollout import BackpressureState, RolloutHandler

RUBRIC = "<rubric>" + "".join(f"<criterion>c{i}</criterion>" for i in range(5)) + "</rubric>"


class FakeResults:
    def __init__(self):
        self.fields = {}

    async def update(self, prompt_id, **fields):
        self.fields.setdefault(prompt_id, {}).update(fields)


class FakeBus:
    def __init__(self, version=0, lags=None):
        self.version = version
        self.lags = lags or {}

    async def get_policy_version(self):
        return self.version

    async def live_workers(self, role):
        return []  # no syncer: rollout uses the configured engine URLs

    async def stats(self, streams):
        groups = {"groups": "anchor", "references": "judge", "scored": "learner"}
        return {s: {"length": 0, "groups": [{"group": groups[s], "pending": 0, "lag": self.lags.get(s, 0)}]}
                for s in streams}


def make_ctx(**overrides):
    config = load_config(None, run="unit")
    for section, fields in overrides.items():
        setattr(config, section, getattr(config, section).model_copy(update=fields))
    return WorkerContext(config, FakeBus(), FakeResults(), "w1", structlog.get_logger())


class FakeEngine:
    def __init__(self, texts, version="3"):
        self.texts = texts
        self.version = version
        self.calls = []

    async def generate(self, ids, **kwargs):
        self.calls.append((ids, kwargs))
        return [SimpleNamespace(text=t, output_ids=[7, 8], logprobs=[-0.5, -0.25], finish_reason="stop",
                                weight_version=self.version) for t in self.texts[: kwargs["n"]]]

    async def weight_version(self):
        return self.version

    async def completion_logprobs(self, prompt_ids, completions):
        self.calls.append(("prefill", list(prompt_ids), [list(c) for c in completions]))
        if getattr(self, "prefill_error", None):
            raise self.prefill_error
        return [[-1.0 - i for i in range(len(c))] for c in completions]

    async def close(self):
        pass


class FakeTokenizer:
    def encode_chat(self, messages):
        return [1, 2, 3]


class FakeChat:
    def __init__(self, replies):
        self.replies = list(replies)
        self.client = FakeEngine([])
        self.calls = []

    async def __call__(self, messages, *, temperature=None, prefix=""):
        self.calls.append((messages, temperature))
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]

    async def close(self):
        pass


def prompt(task="math"):
    return Prompt("p1", task, [ChatMessage("user", "What is 2+2?")])


@pytest.mark.parametrize("raw,version", [(None, 0), ("default", 0), ("7", 7), ("v12", 12), ("abc", 0)])
def test_parse_version(raw, version):
    assert parse_version(raw) == version


async def test_rollout_builds_a_group_round_robin_and_records_the_result():
    ctx = make_ctx(rollout={"group_size": 2}, engines={"policy_urls": ["http://a", "http://b"]})
    engines = [FakeEngine(["\\boxed{4}", "\\boxed{5}"]), FakeEngine(["x", "y"])]
    handler = RolloutHandler(ctx, engines, FakeTokenizer())
    (out,) = await handler.handle(prompt())
    await handler.handle(prompt("open"))
    group = out.message
    assert out.stream == "groups" and isinstance(group, RolloutGroup)
    assert group.prompt_token_ids == [1, 2, 3] and group.policy_version == 3
    assert [r.text for r in group.rollouts] == ["\\boxed{4}", "\\boxed{5}"]
    assert group.rollouts[0].token_ids == [7, 8] and group.rollouts[0].logprobs == [-0.5, -0.25]
    assert len(engines[0].calls) == len(engines[1].calls) == 1
    kwargs = engines[0].calls[0][1]
    assert kwargs["n"] == 2 and kwargs["max_new_tokens"] == ctx.config.rollout.math.max_new_tokens
    assert engines[1].calls[0][1]["max_new_tokens"] == ctx.config.rollout.open.max_new_tokens
    assert ctx.results.fields["p1"]["status"] == "rolled_out"


def test_backpressure_rules():
    assert BackpressureState(9, 0, 0).reason(max_staleness=4, groups_per_version=2) is None
    assert "not yet trained" in BackpressureState(10, 0, 0).reason(max_staleness=4, groups_per_version=2)
    assert "behind the learner" in BackpressureState(0, 5, 0).reason(max_staleness=4, groups_per_version=2)
    assert BackpressureState(0, 4, 0).reason(max_staleness=4, groups_per_version=2) is None
    assert BackpressureState(1, 0, 0).reason(max_staleness=0, groups_per_version=2) is None


async def test_rollout_pauses_on_backlog_and_stale_engine():
    ctx = make_ctx(rollout={"max_staleness": 1}, learner={"batch_groups": 2, "publish_every": 1})
    engine = FakeEngine(["a"], version="0")
    handler = RolloutHandler(ctx, [engine], FakeTokenizer())
    assert await handler.ready()
    ctx.bus.lags = {"groups": 1, "references": 1, "scored": 2}
    handler.backpressure._checked_at = -1e9
    assert not await handler.ready()
    ctx.bus.lags = {}
    ctx.bus.version = 2
    handler.backpressure._checked_at = -1e9
    assert not await handler.ready()
    engine.version = "2"  # the syncer caught the engine up
    handler.backpressure._checked_at = -1e9
    assert await handler.ready()


async def test_anchor_math_synthesis():
    ctx = make_ctx()
    anchor = FakeChat(["Summary: most say 4.\nUnified response: 2+2=4, \\boxed{4}"])
    group = (await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}", "\\boxed{5}", "4"] * 3)],
                                  FakeTokenizer()).roll_out(prompt()))
    (out,) = await AnchorHandler(ctx, anchor).handle(group)
    ref = out.message
    assert out.stream == "references" and ref.reference == "2+2=4, \\boxed{4}" and ref.reference_answer == "4"
    assert ref.majority_answer == "4" and ref.rubric == [] and not ref.format_fallback and ref.anchor_version == 3
    fields = ctx.results.fields["p1"]
    assert fields["status"] == "referenced" and fields["cat_answer"] == ref.reference
    assert fields["estimator"] == "synthesis"


async def test_anchor_attaches_the_anchor_engines_logprobs_for_the_kl_term():
    ctx = make_ctx()
    group = await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}"] * 8)], FakeTokenizer()).roll_out(prompt())
    anchor = FakeChat(["Unified response: \\boxed{4}"])
    (out,) = await AnchorHandler(ctx, anchor).handle(group)
    assert ("prefill", [1, 2, 3], [[7, 8]] * 8) in anchor.client.calls
    assert all(r.anchor_logprobs == [-1.0, -2.0] for r in out.message.group.rollouts)


async def test_no_prefill_without_a_kl_term_with_the_anchor_in_the_learner_or_under_sft():
    for learner in ({"kl_coef": 0.0}, {"anchor_logprobs": "learner"}, {"objective": "sft"}):
        ctx = make_ctx(learner=learner)
        group = await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}"] * 8)], FakeTokenizer()).roll_out(prompt())
        anchor = FakeChat(["Unified response: \\boxed{4}"])
        (out,) = await AnchorHandler(ctx, anchor).handle(group)
        assert not [c for c in anchor.client.calls if c[0] == "prefill"]
        assert all(r.anchor_logprobs is None for r in out.message.group.rollouts)


async def test_an_anchor_engine_that_refuses_the_prefill_leaves_the_group_without_kl_not_lost():
    ctx = make_ctx()
    group = await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}"] * 8)], FakeTokenizer()).roll_out(prompt())
    anchor = FakeChat(["Unified response: \\boxed{4}"])
    anchor.client.prefill_error = EngineError("input_token_logprobs unsupported", 400)
    (out,) = await AnchorHandler(ctx, anchor).handle(group)
    assert out.message.reference_answer == "4"
    assert all(r.anchor_logprobs is None for r in out.message.group.rollouts)
    anchor.client.prefill_error = EngineError("engine down")  # not a refusal: the runtime retries it
    with pytest.raises(EngineError):
        await AnchorHandler(ctx, anchor).handle(group)


async def test_anchor_open_rubric_retried_then_dead_lettered():
    ctx = make_ctx(anchor={"rubric_attempts": 2})
    group = await RolloutHandler(ctx, [FakeEngine(["a"] * 8)], FakeTokenizer()).roll_out(prompt("open"))
    anchor = FakeChat(["Unified response: sleep well", "not xml", RUBRIC])
    (out,) = await AnchorHandler(ctx, anchor).handle(group)
    assert out.message.rubric == [f"c{i}" for i in range(5)]
    assert [t for _, t in anchor.calls] == [None, None, 0.8]  # synthesis, rubric, rubric retry
    with pytest.raises(DeadLetterError, match="no valid rubric after 2 attempts"):
        await AnchorHandler(ctx, FakeChat(["Unified response: x", "nope"])).handle(group)
    assert ctx.results.fields["p1"]["cat_answer"] == "x"  # the runtime marks it dead


async def test_judge_open_and_math():
    ctx = make_ctx()
    group = await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}", "\\boxed{5}"])], FakeTokenizer()).roll_out(prompt())
    (ref,) = await AnchorHandler(ctx, FakeChat(["Unified response: \\boxed{4}"])).handle(group)
    (out,) = await JudgeHandler(ctx, FakeChat(["unused"])).handle(ref.message)
    assert out.stream == "scored" and out.message.rewards[:2] == [1.0, 0.0]
    assert ctx.results.fields["p1"]["status"] == "scored"

    group = await RolloutHandler(ctx, [FakeEngine(["r"] * 8)], FakeTokenizer()).roll_out(prompt("open"))
    (ref,) = await AnchorHandler(ctx, FakeChat(["Unified response: s", RUBRIC])).handle(group)
    (out,) = await JudgeHandler(ctx, FakeChat(["yes"])).handle(ref.message)
    assert out.message.rewards == [1.0] * 8 and len(out.message.verdicts) == 40
    fields = ctx.results.fields["p1"]
    assert fields["reward_mean"] == 1.0 and len(fields["verdicts"]) == 40


async def test_engine_chat_primes_the_reply_with_a_prefix():
    from catq.config import SamplingConfig
    from catq.teacher.chat import EngineChat

    class Tok(FakeTokenizer):
        def encode(self, text):
            return [9] * len(text)

    engine = FakeEngine([" rest"])
    chat = EngineChat(engine, Tok(), SamplingConfig(temperature=0.0, max_new_tokens=5))
    assert await chat([{"role": "user", "content": "hi"}], prefix="ab") == "ab rest"
    ids, kwargs = engine.calls[0]
    assert ids == [1, 2, 3, 9, 9] and kwargs["temperature"] == 0.0 and kwargs["max_new_tokens"] == 5
    assert await chat([{"role": "user", "content": "hi"}], temperature=0.5) == " rest"
    assert engine.calls[1][0] == [1, 2, 3] and engine.calls[1][1]["temperature"] == 0.5


async def test_anchor_starts_its_replies_in_format():
    from catq.teacher.prompts import RUBRIC_PREFIX, SYNTHESIS_PREFIX

    seen = []

    class Recorder(FakeChat):
        async def __call__(self, messages, *, temperature=None, prefix=""):
            seen.append(prefix)
            return await super().__call__(messages, temperature=temperature, prefix=prefix)

    ctx = make_ctx()
    group = await RolloutHandler(ctx, [FakeEngine(["a"] * 8)], FakeTokenizer()).roll_out(prompt("open"))
    await AnchorHandler(ctx, Recorder(["Unified response: s", RUBRIC])).handle(group)
    assert seen == [SYNTHESIS_PREFIX, RUBRIC_PREFIX]


async def test_rollout_dead_letters_a_prompt_the_engine_refuses():
    from catq.engines.client import EngineError

    class Refusing(FakeEngine):
        async def generate(self, ids, **kwargs):
            raise EngineError("prompt too long", 400)

    ctx = make_ctx()
    with pytest.raises(DeadLetterError, match="prompt too long"):
        await RolloutHandler(ctx, [Refusing([])], FakeTokenizer()).handle(prompt())

    class Failing(FakeEngine):
        async def generate(self, ids, **kwargs):
            raise EngineError("overloaded", 503)

    with pytest.raises(EngineError):  # left pending for a retry, not dead-lettered
        await RolloutHandler(ctx, [Failing([])], FakeTokenizer()).handle(prompt())


async def test_openai_judge_endpoint(monkeypatch):
    from catq.teacher.chat import OpenAIChat, judge_chat

    monkeypatch.setenv("MY_JUDGE_KEY", "secret")
    ctx = make_ctx(engines={"judge_api": "openai", "judge_url": "http://judge", "judge_model": "gpt-x",
                            "judge_api_key_env": "MY_JUDGE_KEY"})
    chat = judge_chat(ctx.config)
    assert isinstance(chat, OpenAIChat) and chat.client.model == "gpt-x"
    assert chat.sampling.temperature == 0.0 and chat.sampling.max_new_tokens == ctx.config.judge.max_new_tokens
    calls = []

    async def complete(messages, *, max_tokens, temperature, n=1):
        calls.append((max_tokens, temperature))
        return ["yes"]

    chat.client.complete = complete
    assert await chat([{"role": "user", "content": "?"}]) == "yes" and calls == [(8, 0.0)]
    with pytest.raises(ValueError):
        await chat([{"role": "user", "content": "?"}], prefix="x")
    await chat.close()


async def test_rollout_samples_a_group_again_when_the_engine_aborted_some_rollouts(monkeypatch):
    import catq.teacher.rollout as rollout

    monkeypatch.setattr(rollout, "ABORT_RETRY_WAIT_S", 0.0)

    class AbortingOnce(FakeEngine):
        async def generate(self, ids, **kwargs):
            group = await super().generate(ids, **kwargs)
            if len(self.calls) == 1:  # a weight update aborted the first try mid-way
                group[1].finish_reason = "abort"
            return group

    engine = AbortingOnce(["\\boxed{4}"] * 8)
    group = await RolloutHandler(make_ctx(), [engine], FakeTokenizer()).roll_out(prompt())
    assert len(engine.calls) == 2 and all(r.finish_reason == "stop" for r in group.rollouts)

    class AlwaysAborting(FakeEngine):
        async def generate(self, ids, **kwargs):
            group = await super().generate(ids, **kwargs)
            group[0].finish_reason = "abort"
            return group

    with pytest.raises(rollout.AbortedGroupError):  # left pending for a later retry, never trained
        await RolloutHandler(make_ctx(), [AlwaysAborting(["x"] * 8)], FakeTokenizer()).roll_out(prompt())


def test_backpressure_says_which_downstream_role_it_waits_for():
    state = BackpressureState(10, 0, 0, {"anchor": 7, "judge": 0, "learner": 3})
    assert state.reason(max_staleness=4, groups_per_version=2).endswith("waiting for anchor 7, learner 3")
    assert "waiting for the syncer" in BackpressureState(0, 5, 0).reason(max_staleness=4, groups_per_version=2)


@pytest.mark.parametrize("lora,served,expected", [(True, "4", "v4"), (True, "0", None), (False, "4", None)])
async def test_self_best_of_n_asks_the_policy_on_the_adapter_its_engine_serves(lora, served, expected):
    from catq.config import LoraConfig, SamplingConfig
    from catq.teacher.chat import EngineChat

    ctx = make_ctx(anchor={"estimator": "self_bon"})
    ctx.config.learner = ctx.config.learner.model_copy(update={"lora": LoraConfig(enabled=lora)})
    policy_engine = FakeEngine(["2"], version=served)
    policy = EngineChat(policy_engine, FakeTokenizer(), SamplingConfig(temperature=0.0, max_new_tokens=4))
    group = (await RolloutHandler(ctx, [FakeEngine(["\\boxed{4}", "\\boxed{5}", "4"] * 3)],
                                  FakeTokenizer()).roll_out(prompt()))
    (out,) = await AnchorHandler(ctx, FakeChat(["unused"]), policy).handle(group)
    (_, selection_call) = policy_engine.calls[-1]
    assert selection_call.get("lora_path") == expected
    assert out.message.reference == group.rollouts[1].text  # the policy picked answer 2
