"""Data files as users have them (catq.evaluation.formats) and HealthBench scoring
(catq.evaluation.healthbench): lines parse, extra fields are kept, a bad line names its line and
field, the score arithmetic, and rubric-scored evaluation without engines."""

import json
import re

import pytest

from catq.config import load_config
from catq.engines.client import Completion
from catq.evaluation.command import evaluate_versions, parse_estimators
from catq.evaluation.datasets import load_problems
from catq.evaluation.formats import MATH_SUFFIX, DatasetError, RubricItem, detect_format, read_data
from catq.evaluation.healthbench import RubricGrader, conversation_text, healthbench_score
from catq.evaluation.records import PromptRecord, summarize_groups
from catq.evaluation.report import render
from catq.evaluation.runner import EvalModels, PolicyVersion
from catq.messages import ChatMessage

MATH500 = {"problem": "What is $1+1$?", "solution": "Clearly $1+1=\\boxed{2}$.", "answer": "2",
           "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}
HEALTHBENCH = {
    "prompt": [{"role": "user", "content": "I cut my finger. What should I do?"},
               {"role": "assistant", "content": "How deep is the cut?"},
               {"role": "user", "content": "Not deep, but it bleeds."}],
    "rubrics": [{"criterion": "Advises pressing on the wound", "points": 5, "tags": ["axis:accuracy"]},
                {"criterion": "Says when to seek care", "points": 3, "tags": []},
                {"criterion": "Recommends a tourniquet", "points": -4, "tags": ["axis:safety"]}],
    "example_tags": ["theme:emergency_referrals", "physician_agreed_category:x"],
    "prompt_id": "hb-1", "ideal_completions_data": {"ideal_completion": "Press on it."},
}


def write(tmp_path, *records, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


# -- formats ---------------------------------------------------------------------------------------

def test_math500_line_parses_with_its_fields_kept(tmp_path):
    (item,) = read_data(write(tmp_path, MATH500), "math500")
    assert item.prompt.task == "math" and item.prompt.question == f"What is $1+1$?\n\n{MATH_SUFFIX}"
    assert item.answer == "2" and item.label == "test/prealgebra/1.json"
    assert item.metadata == {"subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}
    assert item.groups == {"subject": "Prealgebra", "level": "1"}


def test_healthbench_line_parses_with_its_rubric(tmp_path):
    (item,) = read_data(write(tmp_path, HEALTHBENCH), "healthbench")
    assert item.prompt.task == "open" and [m.role for m in item.prompt.messages] == ["user", "assistant", "user"]
    assert item.rubric == [RubricItem("Advises pressing on the wound", 5.0, ["axis:accuracy"]),
                           RubricItem("Says when to seek care", 3.0, []),
                           RubricItem("Recommends a tourniquet", -4.0, ["axis:safety"])]
    assert item.label == "hb-1" and item.groups == {"theme": "emergency_referrals"}
    assert item.metadata == {"example_tags": HEALTHBENCH["example_tags"], "prompt_id": "hb-1"}


def test_catq_lines_keep_extra_fields_and_id_is_the_label(tmp_path):
    first, second = read_data(write(tmp_path, {"id": "q1", "text": "2+2?", "answer": 4, "source": "book"},
                                    {"id": 7, "messages": [{"role": "user", "content": "hi"}], "task": "open",
                                     "tags": ["a"]}))
    assert (first.label, first.answer, first.metadata) == ("q1", "4", {"id": "q1", "source": "book"})
    assert (second.label, second.answer, second.metadata) == ("7", None, {"id": 7, "tags": ["a"]})
    problems = load_problems(write(tmp_path, {"id": "q1", "text": "2+2?", "answer": 4, "kind": "x"}))
    assert problems[0].label == "q1" and problems[0].metadata == {"id": "q1", "kind": "x"}


@pytest.mark.parametrize(("record", "fmt"), [
    ({"text": "x"}, "catq"), ({"messages": []}, "catq"), (MATH500, "math500"), (HEALTHBENCH, "healthbench"),
])
def test_auto_tells_formats_apart_by_the_first_line(record, fmt):
    assert detect_format(record, "f:1") == fmt


@pytest.mark.parametrize(("record", "problem"), [
    ({"question": "x", "answer": "1"}, "cannot tell the format"),
    ({"text": "x", "problem": "y"}, "fit catq and math500"),
])
def test_auto_refuses_unknown_or_ambiguous_lines(tmp_path, record, problem):
    with pytest.raises(DatasetError, match=re.escape(problem) + ".*--format"):
        read_data(write(tmp_path, record))


@pytest.mark.parametrize(("fmt", "bad", "problem"), [
    ("catq", '["a list"]', "must be a JSON object, got list"),
    ("catq", '{"id": "x", "source": "y"}', "exactly one of 'text' or 'messages'"),
    ("catq", '{"text": "x", "answer": []}', "'answer' must be a string or number"),
    ("math500", {"answer": "2"}, "missing 'problem'"),
    ("math500", {"problem": 5, "answer": "2"}, "'problem' must be a non-empty string"),
    ("math500", {"problem": "What?"}, "missing 'answer'"),
    ("healthbench", {"prompt": "hi", "rubrics": HEALTHBENCH["rubrics"]}, "'prompt' must be a non-empty list"),
    ("healthbench", {"prompt": [{"role": "user"}], "rubrics": HEALTHBENCH["rubrics"]}, "prompt[0]: must be an object"),
    ("healthbench", {"prompt": [{"role": "doctor", "content": "x"}], "rubrics": HEALTHBENCH["rubrics"]},
     "messages[0].role"),
    ("healthbench", {"prompt": HEALTHBENCH["prompt"], "rubrics": []}, "'rubrics' must be a non-empty list"),
    ("healthbench", {"prompt": HEALTHBENCH["prompt"], "rubrics": [{"points": 1}]}, "rubrics[0]: missing 'criterion'"),
    ("healthbench", {"prompt": HEALTHBENCH["prompt"], "rubrics": [{"criterion": "c", "points": "5"}]},
     "rubrics[0].points: must be a number"),
    ("healthbench", {"prompt": HEALTHBENCH["prompt"], "rubrics": [{"criterion": "c", "points": -1}]},
     "no criterion with positive points"),
])
def test_a_malformed_line_names_its_line_and_field(tmp_path, fmt, bad, problem):
    good = {"catq": {"text": "fine"}, "math500": MATH500, "healthbench": HEALTHBENCH}[fmt]
    path = write(tmp_path, good, "", bad)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        read_data(path, fmt)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        read_data(path)  # auto reads the format off line 1, then the same checks


def test_eval_refuses_an_open_line_without_a_rubric_and_repeated_prompt_ids(tmp_path):
    with pytest.raises(DatasetError, match=":1: an open prompt is scored only against a physician rubric"):
        load_problems(write(tmp_path, {"text": "Tell me about sleep.", "task": "open"}))
    with pytest.raises(DatasetError, match=":2: prompt_id 'p1' repeats line 1"):
        read_data(write(tmp_path, {"text": "a", "prompt_id": "p1"}, {"text": "b", "prompt_id": "p1"}))


def test_champ_json_file_reads_as_problems(tmp_path):
    path = tmp_path / "v0.json"
    path.write_text(json.dumps({"problems": {"P_Sequence_1": {
        "identifier": "P_Sequence_1", "_text": "Find a_5.", "category": "Sequence", "_answer": "32",
        "solution": {"steps": []}, "conversations": {}}}, "concepts": {}, "hints": {}}, indent=2))
    (item,) = read_data(str(path), "champ")
    assert (item.label, item.answer, item.groups) == ("P_Sequence_1", "32", {"category": "Sequence"})
    assert item.prompt.question == f"Find a_5.\n\n{MATH_SUFFIX}" and "solution" not in item.metadata
    with pytest.raises(DatasetError, match="--format champ"):
        read_data(str(path))


# -- HealthBench scores ----------------------------------------------------------------------------

RUBRIC = [RubricItem("a", 7), RubricItem("b", 5), RubricItem("c", 10), RubricItem("d", -6)]


@pytest.mark.parametrize(("met", "score"), [
    ([True, False, True, True], (7 + 10 - 6) / 22),   # a penalty met subtracts
    ([True, True, True, False], 1.0),
    ([False, False, False, False], 0.0),
    ([False, True, False, True], 0.0),                # 5 - 6 < 0: clipped to 0
    ([False, False, False, True], 0.0),
])
def test_healthbench_score_arithmetic(met, score):
    assert healthbench_score(RUBRIC, met) == pytest.approx(score)


def test_healthbench_score_needs_positive_points_and_one_verdict_per_criterion():
    with pytest.raises(ValueError):
        healthbench_score([RubricItem("bad", -1)], [True])
    with pytest.raises(ValueError):
        healthbench_score(RUBRIC, [True])


class KeywordJudge:
    """Says yes when the response contains the criterion's first word (lower case)."""

    def __init__(self):
        self.calls = 0

    async def __call__(self, messages, **_):
        self.calls += 1
        content = messages[-1]["content"]
        response = content.split("<response>")[1].split("</response>")[0].lower()
        criterion = content.split("<criterion>")[1].split("</criterion>")[0].strip()
        return "yes" if criterion.split()[0].lower() in response else "no"

    async def close(self):
        pass


async def test_rubric_grader_scores_each_text_once():
    judge = KeywordJudge()
    rubric = [RubricItem("press firmly", 5), RubricItem("seek care", 3), RubricItem("tourniquet now", -4)]
    grader = RubricGrader(judge, load_config(None).judge, [ChatMessage("user", "cut")], rubric)
    first, second, again = await grader.grade(["Press and seek help.", "Use a tourniquet.", "Press and seek help."])
    assert (first.score, first.criteria_met) == (1.0, [True, True, False])
    assert (second.score, second.criteria_met) == (0.0, [False, False, True])
    assert again is first and judge.calls == 6
    await grader.grade(["Press and seek help."])
    assert judge.calls == 6


def test_conversation_text_shows_roles_only_for_several_turns():
    assert conversation_text([ChatMessage("user", "hi")]) == "hi"
    assert conversation_text([ChatMessage("user", "a"), ChatMessage("assistant", "b")]) == "user: a\n\nassistant: b"


# -- rubric-scored evaluation and breakdowns ---------------------------------------------------------

class ScriptedPolicy:
    def __init__(self, texts):
        self.texts = texts

    async def generate(self, prompt_ids, *, n, **sampling):
        return [Completion(t, [5, 6], [-0.5 - 0.1 * i, -0.5], "stop", 3, 2, "0") for i, t in enumerate(self.texts[:n])]

    async def close(self):
        pass


class Tokenizer:
    def encode_chat(self, messages):
        return [1, 2, 3]

    def encode(self, text):
        return [4]


class Anchor:
    def __init__(self):
        self.messages = []

    async def __call__(self, messages, **_):
        self.messages.append(messages)
        return "Summary: both agree.\nUnified response: Press firmly and seek care."

    async def close(self):
        pass


async def test_healthbench_eval_scores_rollouts_and_references_by_the_rubric(tmp_path):
    (problem,) = load_problems(write(tmp_path, HEALTHBENCH))
    judge = KeywordJudge()
    anchor = Anchor()
    policy = ScriptedPolicy(["Press on it; a nurse advises rest.",
                             "He recommends a tourniquet, says call 911 and advises pressure."])
    config = load_config(None)
    config.rollout.group_size = 2
    names = parse_estimators("synthesis,majority,min_ppl", rubric=True)
    assert names == ["synthesis", "min_ppl"]
    (version,) = await evaluate_versions([problem], EvalModels(policy, Tokenizer(), anchor, judge=judge), config,
                                         names, [PolicyVersion("v0", None, 0, 0)], scaling=False)
    (prompt,) = version["prompts"]
    # the judge says yes when the response holds the criterion's first word: advises (+5), says (+3),
    # recommends (-4)
    assert prompt["rollout_criteria_met"] == [[True, False, False], [True, True, True]]
    assert prompt["rollout_scores"] == [5 / 8, 4 / 8] and prompt["label"] == "hb-1"
    assert "Advises pressing" not in json.dumps(anchor.messages)  # the rubric never reaches the anchor
    refs = prompt["references"]["2"]
    assert refs["synthesis"]["score"] == 0.0 and refs["min_ppl"]["score"] == 5 / 8  # rollout 1: lowest NLL
    full = version["by_g"][-1]
    assert set(full["estimators"]) == {"synthesis", "min_ppl"} and full["pass_at_g"]["n"] == 0
    assert version["by_group"]["theme"][0]["value"] == "emergency_referrals"
    text = render({"meta": {"data": "hb", "prompts": 1, "group_size": 2, "policy": "p", "anchor": "a",
                            "wall_time_s": 1.0, "scoring": "rubric"}, "versions": [version], "differences": []})
    assert "HealthBench score" in text and "by theme" in text and "emergency_referrals" in text


def test_breakdown_rows_per_value_in_natural_order():
    from catq.evaluation.records import judge_outcome

    def record(level, right):
        return PromptRecord("q", "5", ["x"], ["5" if right else "4"], [right],
                            {1: {"majority": judge_outcome("5" if right else "4", "5", "5", [1.0])}},
                            groups={"level": level, "subject": "Algebra"})

    records = [record("10", True), record("2", False), record("2", True)]
    groups = summarize_groups(records, ["majority"])
    assert [row["value"] for row in groups["level"]] == ["2", "10"]
    assert [row["n"] for row in groups["level"]] == [2, 1]
    assert groups["level"][0]["single"]["value"] == pytest.approx(0.5)
    assert groups["subject"][0]["estimators"]["majority"]["value"] == pytest.approx(2 / 3)


async def test_a_judge_eval_cannot_serve_is_refused_before_any_engine_starts(tmp_path):
    import argparse

    from catq.evaluation.command import evaluate
    from catq.evaluation.runner import EvalError

    config = load_config(None)
    config.engines.judge_model = "/models/some-other-judge"
    args = argparse.Namespace(data=write(tmp_path, HEALTHBENCH), format="auto", limit=None, group_size=2,
                              estimators="synthesis", use_stack=False, versions=None)
    with pytest.raises(EvalError, match="not the anchor's"):
        await evaluate(args, config, tmp_path / "out")
