"""Evaluation sets (catq.evaluation.datasets): generation, bundled files, loading and its errors."""

import json
import re
from importlib import resources

import pytest

from catq.evaluation import datasets
from catq.evaluation.datasets import (
    BUNDLED,
    KINDS,
    SUFFIX,
    WORD_TEMPLATES,
    DatasetError,
    bundled_names,
    generate,
    load_problems,
    split,
)
from catq.messages import ChatMessage

ARITHMETIC = re.compile(r"What is (\d+) ([+*]) (\d+)\? " + re.escape(SUFFIX))
OPERANDS = {"single_digit": (1, 9, "+*"), "two_digit_add": (10, 99, "+"), "two_digit_mul": (10, 99, "*")}


def template_pattern(template) -> re.Pattern:
    """A regex matching the template's text (plus the suffix) that captures each field."""
    pattern, seen = re.escape(template.text + " " + SUFFIX), set()

    def field(match):
        name = match.group(1)
        if name in seen:
            return f"(?P={name})"
        seen.add(name)
        return f"(?P<{name}>[A-Z][a-z]+)" if name == "name" else f"(?P<{name}>\\d+)"

    return re.compile(re.sub(r"\\\{(\w+)\\\}", field, pattern))


def match_template(text: str):
    """(template, fields) for the one template that produced ``text``."""
    found = [(t, m) for t in WORD_TEMPLATES if (m := template_pattern(t).fullmatch(text))]
    assert len(found) == 1, text
    template, match = found[0]
    return template, {k: v if k == "name" else int(v) for k, v in match.groupdict().items()}


def write_lines(tmp_path, *lines: str):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- generation -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_generate_is_deterministic_distinct_and_shaped(kind):
    problems = generate(kind, 60, seed=11)
    assert problems == generate(kind, 60, seed=11)
    assert problems != generate(kind, 60, seed=12)
    assert len({p["text"] for p in problems}) == 60
    for problem in problems:
        assert set(problem) == {"text", "task", "answer", "kind"}
        assert problem["task"] == "math" and problem["kind"] == kind
        assert problem["text"].endswith(" " + SUFFIX)
        assert problem["answer"].isdigit() and int(problem["answer"]) > 0
        assert not re.search(r"\\boxed\{[^}]", problem["text"])  # no worked answer to copy


@pytest.mark.parametrize("kind", sorted(OPERANDS))
def test_arithmetic_answers_are_correct(kind):
    low, high, ops = OPERANDS[kind]
    used_ops = set()
    for problem in generate(kind, 150, seed=5):
        match = ARITHMETIC.fullmatch(problem["text"])
        assert match, problem["text"]
        a, op, b = int(match[1]), match[2], int(match[3])
        assert low <= a <= high and low <= b <= high and op in ops
        assert int(problem["answer"]) == (a + b if op == "+" else a * b)
        used_ops.add(op)
    assert used_ops == set(ops)


def test_single_digit_matches_demo_prompt_style():
    demo_text = json.loads(resources.files("catq.data").joinpath("demo_prompts.jsonl").read_text()
                           .splitlines()[0])["text"]
    assert ARITHMETIC.fullmatch(demo_text)


def test_word_answers_are_correct_and_every_template_appears():
    problems = generate("word", 400, seed=3)
    used = set()
    for problem in problems:
        template, fields = match_template(problem["text"])
        assert int(problem["answer"]) == template.solve(fields) > 0
        used.add(template.text)
    assert len(WORD_TEMPLATES) >= 6
    assert used == {t.text for t in WORD_TEMPLATES}


def test_generate_rejects_impossible_requests():
    with pytest.raises(ValueError, match="only 162 distinct"):
        generate("single_digit", 163, seed=0)
    with pytest.raises(ValueError, match="unknown kind"):
        generate("calculus", 1, seed=0)


def test_split_is_deterministic_and_disjoint():
    problems = list(range(30))
    train, held = split(problems, 8, seed=1)
    assert (train, held) == split(problems, 8, seed=1)
    assert len(held) == 8 and sorted(train + held) == problems
    assert not set(train) & set(held)
    assert split(problems, 8, seed=2) != (train, held)
    with pytest.raises(ValueError):
        split(problems, 31, seed=1)


# -- bundled files --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_file_is_exactly_what_the_generator_writes(name):
    stored = resources.files("catq.data").joinpath(f"eval_{name}.jsonl").read_text()
    assert stored == datasets.to_jsonl(generate(*BUNDLED[name]))


def test_bundled_sizes():
    assert {name: n for name, (_, n, _) in BUNDLED.items()} == {
        "single_digit": 100, "two_digit_add": 40, "two_digit_mul": 40, "word": 40}
    assert bundled_names() == [*BUNDLED, "demo"]


def test_write_bundled_writes_every_set(tmp_path):
    paths = datasets.write_bundled(tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"eval_{name}.jsonl" for name in BUNDLED)


def test_cli_prints_jsonl(capsys):
    assert datasets.main(["--kind", "word", "--n", "3", "--seed", "7"]) == 0
    assert capsys.readouterr().out == datasets.to_jsonl(generate("word", 3, 7))


# -- loading --------------------------------------------------------------------------------------

def test_load_bundled_name():
    problems = load_problems("two_digit_mul")
    assert len(problems) == 40
    first = generate(*BUNDLED["two_digit_mul"])[0]
    assert problems[0].text == first["text"] and problems[0].answer == first["answer"]
    assert problems[0].messages == [ChatMessage("user", first["text"])] and problems[0].task == "math"


def test_load_limit():
    assert len(load_problems("single_digit", limit=7)) == 7
    assert load_problems("single_digit", limit=7) == load_problems("single_digit")[:7]


def test_load_demo_gives_only_math_with_answers():
    problems = load_problems("demo")
    assert len(problems) >= 20
    assert all(p.task == "math" and p.answer.isdigit() for p in problems)


def test_load_file_with_text_messages_numbers_and_blank_lines(tmp_path):
    path = write_lines(tmp_path,
                       '{"text": "What is 2 + 2?", "answer": 4}',
                       "",
                       '{"messages": [{"role": "system", "content": "Be brief."}, '
                       '{"role": "user", "content": "What is 3 * 3?"}], "task": "math", "answer": "9"}')
    first, second = load_problems(str(path))
    assert (first.text, first.answer, first.task) == ("What is 2 + 2?", "4", "math")
    assert second.text == "What is 3 * 3?" and second.answer == "9"
    assert [m.role for m in second.messages] == ["system", "user"]


@pytest.mark.parametrize(("bad_line", "problem"), [
    ('{"text": "What is 1 + 1?", "answer": "2"', "invalid JSON"),
    ('["What is 1 + 1?"]', "must be a JSON object"),
    ('{"text": "What is 1 + 1?"}', "missing 'answer'"),
    ('{"text": "What is 1 + 1?", "answer": null}', "missing 'answer'"),
    ('{"text": "What is 1 + 1?", "answer": true}', "'answer' must be a string or number"),
    ('{"text": "What is 1 + 1?", "answer": " "}', "'answer' is empty"),
    ('{"answer": "2"}', "exactly one of 'text' or 'messages'"),
    ('{"text": "What is 1 + 1?", "task": "poetry", "answer": "2"}', "unknown task"),
    ('{"messages": [{"role": "user"}], "answer": "2"}', "'role' and 'content'"),
    ('{"text": "What is 1 + 1?", "answer": "2", "prompt_id": "a b"}', "prompt_id: must be 1-128"),
])
def test_bad_line_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_lines(tmp_path, '{"text": "What is 1 + 2?", "answer": "3"}', "", bad_line)
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(problem)):
        load_problems(str(path))


def test_unknown_source_lists_bundled_names(tmp_path):
    with pytest.raises(DatasetError) as caught:
        load_problems(str(tmp_path / "missing.jsonl"))
    assert all(name in str(caught.value) for name in bundled_names())
