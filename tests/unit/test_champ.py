"""A real external data set: CHAMP (the `champ-dataset` package, a test dependency) read through
catq's loader, its GPT-4 Turbo solutions used as rollouts for catq's answer extraction and
majority vote (bench/champ_answers.py prints the figures on all 270 problems)."""

from __future__ import annotations

import pytest

champ_dataset = pytest.importorskip("champ_dataset", reason="champ-dataset is not installed (pip install -e .[test])")

from bench.champ_answers import champ_figures, champ_file, model_turns  # noqa: E402
from catq.evaluation.datasets import load_problems  # noqa: E402
from catq.evaluation.formats import read_data  # noqa: E402

pytestmark = pytest.mark.slow  # math-verify over a few hundred real solutions


@pytest.fixture(scope="module")
def figures() -> dict:
    return champ_figures(limit=8, kinds=("solution",))


def test_champ_reads_through_the_loader():
    items = read_data(str(champ_file()), "champ")
    assert len(items) == 270 and len({i.label for i in items}) == 270
    assert {i.groups["category"] for i in items} == {"Combinatorics", "Inequality", "Number-Theory",
                                                     "Polynomial", "Sequence"}
    first = items[0]
    assert first.label == "P_Combinatorics_1" and first.answer == "239"
    assert first.prompt.question.startswith("Let a string consist of digit 1, 2, 3.")
    assert first.metadata == {"category": "Combinatorics"}  # no solutions, hints or model answers
    assert len(load_problems(str(champ_file()), limit=5, fmt="champ")) == 5


def test_gpt4_turbo_solutions_are_the_rollouts(figures):
    import json

    raw = json.loads(champ_file().read_text(encoding="utf-8"))["problems"]
    solutions = model_turns(raw["P_Combinatorics_1"])
    assert len(solutions) >= 15 and all("239" in solution for solution, _ in solutions)
    assert all(row["rollouts"] >= 10 for row in figures["rows"])


def test_extraction_and_vote_against_champs_answers(figures):
    solution = figures["solution"]["all"]
    assert solution["problems"] == 8
    assert solution["extraction"] >= 0.95  # catq reads a final answer from nearly every solution
    rows = {row["label"]: row for row in figures["rows"]}
    # "... is T(6) = 76." / "... is 76.": most solutions state it last, so the vote gets it
    assert rows["P_Combinatorics_4"]["vote"] == "76" and rows["P_Combinatorics_4"]["vote_correct"]
    for row in figures["rows"]:  # the vote picks some rollout's answer: never right when none is
        assert not row["vote_correct"] or row["correct"] > 0
    print(figures["solution"])
