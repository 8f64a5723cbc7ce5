"""`catq eval` logic without engines: interval math, G-subset scaling, versions side by side,
every estimator reported, and labels that never reach an estimator."""

import math

import pytest

from catq.config import load_config
from catq.engines.client import Completion
from catq.evaluation.command import (
    differences,
    evaluate_versions,
    parse_estimators,
    version_result,
)
from catq.evaluation.datasets import EvalProblem
from catq.evaluation.records import scaling_sizes, summarize
from catq.evaluation.report import render
from catq.evaluation.runner import (
    EvalError,
    EvalModels,
    PolicyVersion,
    evaluate_version,
    resolve_versions,
)
from catq.evaluation.stats import (
    bootstrap_mean,
    mean_interval,
    paired_difference,
    pass_at_k,
    wilson,
)
from catq.messages import ChatMessage

# -- interval math -------------------------------------------------------------------------------


def test_wilson_matches_the_textbook_values():
    iv = wilson(8, 10)
    assert iv["value"] == 0.8 and iv["n"] == 10
    assert iv["low"] == pytest.approx(0.4902, abs=1e-4)
    assert iv["high"] == pytest.approx(0.9433, abs=1e-4)


def test_wilson_stays_inside_zero_one_at_the_extremes():
    assert wilson(0, 5)["low"] == 0.0 == wilson(0, 5)["value"] and 0 < wilson(0, 5)["high"] < 0.5
    assert wilson(5, 5)["high"] == 1.0 and 0.5 < wilson(5, 5)["low"] < 1
    assert math.isnan(wilson(0, 0)["value"])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.125, 0.875]
    a, b = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert a == b
    assert a["value"] == pytest.approx(0.5)
    assert a["low"] < a["value"] < a["high"]
    assert 0.0 <= a["low"] and a["high"] <= 1.0


def test_mean_interval_uses_wilson_for_rates_and_bootstrap_for_fractions():
    assert mean_interval([1.0, 0.0, 1.0, 1.0]) == wilson(3, 4)
    assert mean_interval([0.5, 1.0]) == bootstrap_mean([0.5, 1.0])


def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 5, 4) == 1.0  # only 3 wrong: any 4 include a right one
    assert pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_paired_difference_of_a_constant_gain_is_exact():
    diff = paired_difference([0.75, 0.5, 1.0], [0.5, 0.25, 0.75])
    assert diff["value"] == pytest.approx(0.25)
    assert diff["low"] == pytest.approx(0.25) and diff["high"] == pytest.approx(0.25)


def test_scaling_sizes_are_powers_of_two_up_to_g():
    assert scaling_sizes(8) == [1, 2, 4, 8]
    assert scaling_sizes(6) == [1, 2, 4, 6]
    assert scaling_sizes(1) == [1]


# -- fakes ----------------------------------------------------------------------------------------


class FakeTokenizer:
    def encode_chat(self, messages):
        return [1, 2, 3]

    def encode(self, text):
        return [4]


class FakePolicy:
    """A policy engine whose rollouts are scripted per question and per loaded version."""

    def __init__(self, scripts: dict[str, dict[str, list[str]]]):
        self.scripts = scripts  # version label -> question -> rollout texts
        self.version = "v0"
        self.loaded = []

    async def generate(self, prompt_ids, *, n, **sampling):
        raise AssertionError("eval samples through sample_group with a tokenizer; use generate_for")

    async def update_weights_from_disk(self, path, weight_version=None):
        self.loaded.append(path)
        self.version = weight_version

    async def weight_version(self):
        return self.version

    async def close(self):
        pass


class ScriptedPolicy(FakePolicy):
    """generate() answers the question whose ids were last encoded (one question per test)."""

    def __init__(self, scripts, question):
        super().__init__(scripts)
        self.question = question

    async def generate(self, prompt_ids, *, n, **sampling):
        texts = self.scripts[self.version][self.question][:n]
        return [Completion(t, [5, 6], [-0.5 - 0.1 * i, -0.5], "stop", 3, 2, self.version)
                for i, t in enumerate(texts)]


class FakeChat:
    def __init__(self, reply):
        self.reply = reply
        self.messages = []

    async def __call__(self, messages, *, temperature=None, prefix="", max_new_tokens=None):
        self.messages.append(messages)
        return self.reply

    async def close(self):
        pass


def problem(question="What is 2 + 3?", answer="5"):
    return EvalProblem([ChatMessage("user", question)], "math", answer, question)


def config_with_g(g):
    config = load_config(None)
    config.rollout.group_size = g
    return config


ROLLOUTS = ["\\boxed{5}", "\\boxed{6}", "\\boxed{6}", "\\boxed{5}",
            "\\boxed{5}", "\\boxed{7}", "\\boxed{5}", "\\boxed{5}"]


# -- G-subset scaling and estimators ---------------------------------------------------------------


async def test_scaling_uses_the_first_g_of_the_same_rollouts():
    policy = ScriptedPolicy({"v0": {"What is 2 + 3?": ROLLOUTS}}, "What is 2 + 3?")
    models = EvalModels(policy, FakeTokenizer(), FakeChat("Unified response: \\boxed{6}"),
                        FakeChat("Response 2"))
    config = config_with_g(8)
    records = await evaluate_version([problem()], models, config, ["synthesis", "majority", "self_bon", "min_ppl"],
                                     scaling_sizes(8))
    rows = summarize(records, ["synthesis", "majority", "self_bon", "min_ppl"])
    assert [r["g"] for r in rows] == [1, 2, 4, 8]
    by_g = {r["g"]: r for r in rows}
    # single sample does not depend on g: 5 of 8 right
    assert all(r["single"]["value"] == pytest.approx(5 / 8) for r in rows)
    # majority: g=1 -> 5 (right); g=2 -> tie 5 vs 6, first wins -> 5; g=4 -> 5,6,6,5 tie -> 5; g=8 -> 5
    assert [by_g[g]["estimators"]["majority"]["accuracy"]["value"] for g in (1, 2, 4, 8)] == [1, 1, 1, 1]
    # the anchor always says 6: wrong everywhere, present everywhere, disagreeing with the vote
    synthesis = by_g[8]["estimators"]["synthesis"]
    assert synthesis["accuracy"]["value"] == 0 and synthesis["present"]["value"] == 1
    assert synthesis["agree_majority"]["value"] == 0
    assert synthesis["reward_mean"] == pytest.approx(2 / 8)  # two rollouts said 6
    # self_bon names response 2 (a 6) at every g >= 2; at g=1 "2" is out of range -> rollout 1
    assert by_g[1]["estimators"]["self_bon"]["accuracy"]["value"] == 1
    assert by_g[8]["estimators"]["self_bon"]["accuracy"]["value"] == 0
    # min_ppl: rollout 1 has the highest log-probs
    assert by_g[8]["estimators"]["min_ppl"]["accuracy"]["value"] == 1
    # pass@g from all 8: 3 wrong, so any 4 contain a right one
    assert by_g[4]["pass_at_g"]["value"] == 1.0
    assert by_g[1]["pass_at_g"]["value"] == pytest.approx(5 / 8)
    # g=1 groups carry no signal (one reward); g=8 majority does
    assert by_g[1]["estimators"]["majority"]["signal"]["value"] == 0
    assert by_g[8]["estimators"]["majority"]["signal"]["value"] == 1


async def test_every_estimator_is_reported_in_the_tables():
    policy = ScriptedPolicy({"v0": {"What is 2 + 3?": ROLLOUTS[:4]}}, "What is 2 + 3?")
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"), FakeChat("1"))
    names = ["synthesis", "majority", "self_bon", "min_ppl"]
    versions = await evaluate_versions([problem()], models, config_with_g(4), names,
                                       [PolicyVersion("v0", None, 0, 0)])
    assert list(versions[0]["by_g"][-1]["estimators"]) == names
    text = render({"meta": {"data": "x", "prompts": 1, "group_size": 4, "policy": "p", "anchor": "a",
                            "wall_time_s": 1.0}, "versions": versions, "differences": []})
    for name in [*names, "single sample", "pass@4"]:
        assert name in text


async def test_no_label_reaches_an_estimator():
    label = "8675309"
    question = "What is 8675308 + 1?"
    seen = []

    async def guarded_estimate(group, estimator, **models):
        from catq.teacher.estimators import estimate_reference

        seen.append(repr(group))
        assert label not in repr(group), "the known answer reached an estimator"
        return await estimate_reference(group, estimator, **models)

    policy = ScriptedPolicy({"v0": {question: ["\\boxed{12}", "\\boxed{13}"]}}, question)
    anchor = FakeChat("\\boxed{12}")
    models = EvalModels(policy, FakeTokenizer(), anchor, FakeChat("1"))
    records = await evaluate_version([problem(question, label)], models, config_with_g(2),
                                     ["synthesis", "majority", "self_bon", "min_ppl"], [1, 2],
                                     estimate=guarded_estimate)
    assert len(seen) == 8
    assert label not in repr(anchor.messages)
    assert records[0].known == label  # compared only afterwards


# -- versions ------------------------------------------------------------------------------------


async def test_versions_are_compared_on_the_same_prompts(tmp_path):
    question = "What is 2 + 3?"
    scripts = {"v0": {question: ["\\boxed{4}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"]},
               "v3": {question: ["\\boxed{5}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}"]}}
    policy = ScriptedPolicy(scripts, question)
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"))
    versions = [PolicyVersion("v0", None, 0, 0), PolicyVersion("v3", tmp_path / "v3", 3, 6)]
    results = await evaluate_versions([problem()], models, config_with_g(4), ["majority"], versions)
    assert policy.loaded == [str(tmp_path / "v3")]
    assert [v["label"] for v in results] == ["v0", "v3"]
    assert results[0]["by_g"][-1]["single"]["value"] == pytest.approx(0.25)
    assert results[1]["by_g"][-1]["single"]["value"] == pytest.approx(0.75)
    assert results[1]["step"] == 6
    (diff,) = differences(results)
    assert (diff["from"], diff["to"]) == ("v0", "v3")
    assert diff["difference"]["value"] == pytest.approx(0.5)


async def test_later_versions_can_be_measured_with_fewer_estimators(tmp_path):
    question = "What is 2 + 3?"
    scripts = {"v0": {question: ["\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}"]},
               "v3": {question: ["\\boxed{5}"] * 4}}
    anchor = FakeChat("\\boxed{5}")
    models = EvalModels(ScriptedPolicy(scripts, question), FakeTokenizer(), anchor)
    versions = [PolicyVersion("v0", None, 0, 0), PolicyVersion("v3", tmp_path / "v3", 3, 6)]
    results = await evaluate_versions([problem()], models, config_with_g(4), ["synthesis", "majority"],
                                      versions, scaling=False, later_estimators=["majority"])
    assert list(results[0]["by_g"][-1]["estimators"]) == ["synthesis", "majority"]
    assert list(results[1]["by_g"][-1]["estimators"]) == ["majority"]
    assert len(anchor.messages) == 1  # the anchor synthesized for v0's group only


async def test_the_initial_policy_cannot_follow_a_loaded_version(tmp_path):
    policy = ScriptedPolicy({"v1": {"What is 2 + 3?": ["\\boxed{5}"]}}, "What is 2 + 3?")
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"))
    versions = [PolicyVersion("v1", tmp_path, 1), PolicyVersion("v0", None, 0)]
    with pytest.raises(EvalError, match="initial policy"):
        await evaluate_versions([problem()], models, config_with_g(1), ["majority"], versions)


def test_versions_resolve_from_the_run_directory(tmp_path):
    config = load_config(None, run="r")
    config.run_dir = str(tmp_path / "{run}")
    for n in (2, 5):
        (config.weights_dir / f"v{n}").mkdir(parents=True)
    (config.run_path / "metrics.jsonl").write_text(
        '{"step": 9, "policy_version": 4}\n{"step": 10, "policy_version": 5}\n{"step": 11, "policy_version": 5}\n')
    versions = resolve_versions("latest,0,2,latest", config)
    assert [(v.label, v.policy_version, v.step) for v in versions] == [("v0", 0, 0), ("v5", 5, 10), ("v2", 2, None)]
    with pytest.raises(EvalError, match="does not exist"):
        resolve_versions("3", config)
    with pytest.raises(EvalError, match="neither"):
        resolve_versions("newest", config)


def test_unknown_estimators_are_refused():
    assert parse_estimators("majority, synthesis") == ["majority", "synthesis"]
    with pytest.raises(EvalError, match="known"):
        parse_estimators("majority,vote")


def test_version_result_keeps_every_prompt_record():
    from catq.evaluation.records import PromptRecord, judge_outcome

    record = PromptRecord("q", "5", ["\\boxed{5}"], ["5"], [True],
                          {1: {"majority": judge_outcome("5", "5", "5", [1.0])}})
    result = version_result(PolicyVersion("v0", None, 0, 0), [record], ["majority"])
    assert result["prompts"][0]["references"]["1"]["majority"]["correct"] is True
    assert result["by_g"][0]["estimators"]["majority"]["accuracy"]["n"] == 1


async def test_a_prompt_whose_engine_fails_is_left_out_with_its_reason():
    from catq.engines.client import EngineError

    class FlakyPolicy(ScriptedPolicy):
        async def generate(self, prompt_ids, *, n, **sampling):
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 1:
                raise EngineError("POST /generate failed after retries: TimeoutError")
            return await super().generate(prompt_ids, n=n, **sampling)

    policy = FlakyPolicy({"v0": {"What is 2 + 3?": ["\\boxed{5}", "\\boxed{4}"]}}, "What is 2 + 3?")
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"))
    results = await evaluate_versions([problem(), problem()], models, config_with_g(2), ["majority"],
                                      [PolicyVersion("v0", None, 0, 0)], concurrency=1)
    (version,) = results
    assert len(version["prompts"]) == 1
    assert version["failed"] == [{"question": "What is 2 + 3?", "error": "POST /generate failed after retries: TimeoutError"}]
    assert version["by_g"][-1]["single"]["n"] == 1


async def test_plot_without_data_needs_a_run_with_steps(tmp_path):
    from types import SimpleNamespace

    from catq.evaluation.command import run_eval

    config = load_config(None, run="r")
    config.run_dir = str(tmp_path / "{run}")
    args = SimpleNamespace(data=None, plot=True, out=str(tmp_path / "out"))
    with pytest.raises(EvalError, match="no learner steps"):
        await run_eval(args, config, None)
    config.run_path.mkdir(parents=True)
    (config.run_path / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.5, "kl": 0.0}\n')
    import io

    out = io.StringIO()
    assert await run_eval(args, config, out) == 0
    assert (tmp_path / "out" / "training.png").exists() and "training.png" in out.getvalue()


# -- LoRA versions -------------------------------------------------------------------------------


def write_adapter_config(directory, rank=8, targets=("q_proj", "v_proj")):
    """What makes a directory a LoRA adapter (a PEFT adapter_config.json; no tensors needed here)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                               "target_modules": list(targets)}))
    return directory


def write_full_weights(directory):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


def test_which_lora_path_serves_a_version(tmp_path):
    from catq.engines.adapters import lora_path_for

    adapter, full = write_adapter_config(tmp_path / "a" / "v3"), write_full_weights(tmp_path / "f" / "v3")
    assert lora_path_for(adapter, 3, "v3") == "v3"  # the syncer's name for version 3
    assert lora_path_for(adapter, None, "cat-final") == "cat-final"  # a directory outside a run
    assert lora_path_for(full, 3, "v3") is None
    assert lora_path_for(None, 0, "v0") is None  # the base model
    assert lora_path_for(tmp_path / "a" / "v3", 0, "v0") is None  # version 0 is the base, whatever its directory
    assert PolicyVersion("v3", adapter, 3).lora_path == "v3"
    assert PolicyVersion("v3", full, 3).lora_path is None
    assert PolicyVersion("v0", None, 0, 0).lora_path is None


def test_run_versions_resolve_to_their_adapters(tmp_path):
    from catq.evaluation.runner import served_version

    config = load_config(None, run="r")
    config.run_dir = str(tmp_path / "{run}")
    write_full_weights(config.weights_dir / "v2")
    write_adapter_config(config.weights_dir / "v5")
    assert [(v.label, v.lora_path) for v in resolve_versions("0,2,5", config)] == \
        [("v0", None), ("v2", None), ("v5", "v5")]
    assert (served_version(config, 5).lora_path, served_version(config, 5).path) == ("v5", config.weights_dir / "v5")
    assert (served_version(config, 2).lora_path, served_version(config, 2).path) == (None, None)  # as before


class LoraPolicy(ScriptedPolicy):
    """An engine with LoRA on: rollouts follow the adapter each request names (the base without)."""

    def __init__(self, scripts, question, already_loaded=()):
        super().__init__(scripts, question)
        self.adapters = dict.fromkeys(already_loaded, "loaded at start")
        self.load_requests = []
        self.lora_paths = []

    async def load_lora_adapter(self, name, path, pinned=False):
        from catq.engines.client import EngineError

        self.load_requests.append((name, path))
        if name in self.adapters:
            raise EngineError(f"Failed to load LoRA adapter {name} because it is already loaded", 400)
        self.adapters[name] = path
        return {"success": True}

    async def generate(self, prompt_ids, *, n, lora_path=None, **sampling):
        assert lora_path is None or lora_path in self.adapters, "named an adapter the engine does not have"
        self.lora_paths.append(lora_path)
        self.version = lora_path or "v0"
        return await super().generate(prompt_ids, n=n, **sampling)


LORA_SCRIPTS = {"v0": {"What is 2 + 3?": ["\\boxed{4}", "\\boxed{4}"]},
                "v3": {"What is 2 + 3?": ["\\boxed{5}", "\\boxed{5}"]}}


async def test_an_adapter_version_is_measured_on_its_adapter(tmp_path):
    policy = LoraPolicy(LORA_SCRIPTS, "What is 2 + 3?")
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"))
    adapter = write_adapter_config(tmp_path / "weights" / "v3")
    versions = [PolicyVersion("v0", None, 0, 0), PolicyVersion("v3", adapter, 3, 6)]
    results = await evaluate_versions([problem()], models, config_with_g(2), ["majority"], versions)
    assert policy.load_requests == [("v3", str(adapter))]
    assert policy.loaded == []  # never /update_weights_from_disk with an adapter directory
    assert policy.lora_paths == [None, "v3"]  # v0 on the base, v3 on its adapter
    assert [v["by_g"][-1]["single"]["value"] for v in results] == [0.0, 1.0]


async def test_an_adapter_the_engine_already_serves_is_used_without_reloading_or_moving(tmp_path):
    """The demo's and --use-stack's case: the stack's syncer loaded v3; the measurement does not
    move the engine (load=False) but still names the adapter."""
    policy = LoraPolicy(LORA_SCRIPTS, "What is 2 + 3?", already_loaded=["v3"])
    models = EvalModels(policy, FakeTokenizer(), FakeChat("\\boxed{5}"))
    version = PolicyVersion("v3", write_adapter_config(tmp_path / "weights" / "v3"), 3)
    [result] = await evaluate_versions([problem()], models, config_with_g(2), ["majority"], [version], load=False)
    assert policy.adapters["v3"] == "loaded at start" and policy.lora_paths == ["v3"]
    assert result["by_g"][-1]["single"]["value"] == 1.0


async def test_the_policy_as_selector_answers_on_the_adapter():
    from catq.config import SamplingConfig
    from catq.teacher.chat import EngineChat

    class Client:
        def __init__(self):
            self.requests = []

        async def generate(self, ids, **kwargs):
            self.requests.append(kwargs.get("lora_path"))
            return [Completion("1", [5], None, "stop", 3, 1, None)]

    client = Client()
    chat = EngineChat(client, FakeTokenizer(), SamplingConfig())
    models = EvalModels(None, FakeTokenizer(), None, chat)
    assert models.on_adapter(None) is models
    await chat([{"role": "user", "content": "which?"}])
    await models.on_adapter("v3").selector([{"role": "user", "content": "which?"}])
    assert client.requests == [None, "v3"]


def test_eval_starts_its_policy_engine_able_to_load_every_adapter(tmp_path):
    from catq.evaluation.command import lora_flags

    small = write_adapter_config(tmp_path / "v1", rank=4, targets=("q_proj",))
    large = write_adapter_config(tmp_path / "v2", rank=8, targets=("v_proj", "o_proj"))
    flags = lora_flags([PolicyVersion("v0", None, 0), PolicyVersion("v1", small, 1), PolicyVersion("v2", large, 2)])
    assert flags[:2] == ["--enable-lora", "--max-lora-rank"] and flags[2] == "8"
    assert flags[flags.index("--lora-target-modules") + 1:][:3] == ["o_proj", "q_proj", "v_proj"]
    assert lora_flags([PolicyVersion("v0", None, 0), PolicyVersion("v2", write_full_weights(tmp_path / "f"), 2)]) == []
