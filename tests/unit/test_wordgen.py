"""The two-step word-problem generator: answers recomputed from the question text, a disjoint
train/held-out split, and the same questions for the same seed."""

import re

import pytest

from catq.evaluation.datasets import load_problems, to_jsonl
from catq.evaluation.wordgen import TWO_STEP_TEMPLATES, instances, word_split

# Each template's answer from the numbers in its question, in order of appearance: written here
# again, independently of the generator's lambdas.
SOLUTIONS = [
    lambda a, b, c: a + b * c,
    lambda a, b, c: a - b - c,
    lambda a, b, c: c - a * b,
    lambda a, b, c: a * b - c,
    lambda a, b, c: a * b - c,
    lambda a, b, c: (a + b) / c,
    lambda a, b, c: a * b - c,
    lambda a: a + 2 * a,
    lambda a, b, c: a * b + c,
    lambda a, b, c: a - b * c,
    lambda a, b, c: a + b + c,
    lambda a, b, c, d: a * c + b * d,
    lambda a, b, c: a * b + c,
    lambda a, b, c: a - b * c,
    lambda a, b, c: a / b - c,
    lambda a, b: a + (a + b),
]


def test_more_templates_than_the_bundled_word_set():
    assert len(TWO_STEP_TEMPLATES) == len(SOLUTIONS) > 8


def test_answers_match_a_recomputation_from_the_question_text():
    pool = instances(400, seed=3)
    assert {i.template for i in pool} == set(range(len(TWO_STEP_TEMPLATES)))
    for instance in pool:
        numbers = [int(n) for n in re.findall(r"\d+", instance.text)]
        expected = SOLUTIONS[instance.template](*numbers)
        assert expected == instance.answer and expected > 0 and float(expected).is_integer(), instance.text
        assert instance.record()["answer"] == str(instance.answer)


def test_split_shares_no_question_and_no_instance():
    train, held_out = word_split(300, 60, seed=0)
    assert (len(train), len(held_out)) == (300, 60)
    assert not {i.text for i in train} & {i.text for i in held_out}
    assert not {(i.template, i.fields) for i in train} & {(i.template, i.fields) for i in held_out}
    assert len({i.text for i in train}) == 300


def test_same_seed_same_questions_other_seed_other_questions():
    assert word_split(50, 10, seed=7) == word_split(50, 10, seed=7)
    assert word_split(50, 10, seed=7)[1] != word_split(50, 10, seed=8)[1]


def test_records_load_as_an_eval_set(tmp_path):
    _, held_out = word_split(10, 5, seed=0)
    path = tmp_path / "held_out.jsonl"
    path.write_text(to_jsonl([i.record() for i in held_out]))
    problems = load_problems(str(path))
    assert [p.answer for p in problems] == [str(i.answer) for i in held_out]


def test_asking_for_more_than_exist_is_a_clear_error(monkeypatch):
    from catq.evaluation import wordgen
    from catq.evaluation.datasets import WordTemplate

    tiny = WordTemplate("{name} has {a} pens.", {"a": (1, 2)}, lambda f: f["a"])
    monkeypatch.setattr(wordgen, "TWO_STEP_TEMPLATES", (tiny,))
    monkeypatch.setattr(wordgen, "MAX_MISSES", 200)
    with pytest.raises(ValueError, match="only 2 distinct"):
        instances(5, seed=0)
