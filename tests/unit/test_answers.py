"""Final-answer extraction and equivalence (catq.teacher.answers)."""

import pytest

from catq.teacher.answers import (
    answers_equivalent,
    final_answer,
    is_text_answer,
    last_boxed,
)

EXTRACTION = [
    ("So the result is \\boxed{42}.", "42"),
    ("First \\boxed{1}, then corrected: \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
    ("set \\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("$\\boxed{x^{2}+1}$", "x^{2}+1"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5 is it", "5"),
    ("truncated \\boxed{3} then \\boxed{\\frac{1}{", "3"),
    ("The answer is 17.", "17"),
    ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("Answer: 3.5.", "3.5"),
    ("so answer is 12\nand more text", "12"),
    ("2 + 2 = 4", "4"),
    ("So, 82 / 7 = 11. This means that", "11"),           # cut off mid-sentence (cat_rl's groups)
    ("Total = 3.5. Then we", "3.5"),
    ("We get x = 2\\sqrt{2}", "2\\sqrt{2}"),
    ("I think there are 3 apples and 5 pears", "5"),
    ("It costs 1,000 dollars", "1,000"),
    ("no numbers here at all", None),
    ("The answer is often denoted by the symbol +, so 7", "7"),
    ("\\boxed{} 9 is the answer is \\boxed{} 9", "9"),
    ("The answer is no solution.", "no solution"),
    ("2 * 8 = 16\n\nYour answer is correct, but check it", "16"),
    ("so the answer is x = 3 and y = 4", "x = 3 and y = 4"),
    ("", None),
    ("\\boxed{}", None),
]


@pytest.mark.parametrize("text,expected", EXTRACTION)
def test_final_answer_extraction(text, expected):
    assert final_answer(text) == expected


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("0.5", "1/2"),
    ("\\dfrac{3}{4}", "0.75"),
    ("\\frac12", "\\frac{1}{2}"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("12", "12.0"),
    ("1,000", "1000"),
    ("10^{3}", "1000"),
    ("-3", "- 3"),
    ("x=3", "3"),
    ("50\\%", "0.5"),
    ("5 \\text{ cm}", "5"),
    ("\\$5", "5"),
    ("[1,2)", "[1, 2)"),
    ("(-\\infty, 2)", "x<2"),
    ("\\{1,2\\}", "\\{2,1\\}"),
    ("2,3", "3,2"),
    ("x^2+2x+1", "(x+1)^2"),
    ("Paris", "paris"),
    ("\\text{blue}", "blue"),
    ("\\text{No solution}", "no solution"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("3", "4"),
    ("(1,2]", "[1,2)"),
    ("(1,2)", "(2,1)"),
    ("\\pi", "3.14"),
    ("1/3", "0.333"),
    ("Paris", "Sapir"),
    ("\\text{blue}", "\\text{red}"),
    ("2", "\\text{two}"),
    ("x=3", "y=3"),
    ("\\{1,2\\}", "\\{1,3\\}"),
]


@pytest.mark.parametrize("a,b", EQUIVALENT)
def test_equivalent_answers(a, b):
    assert answers_equivalent(a, b)
    assert answers_equivalent(b, a)


@pytest.mark.parametrize("a,b", NOT_EQUIVALENT)
def test_different_answers(a, b):
    assert not answers_equivalent(a, b)
    assert not answers_equivalent(b, a)


@pytest.mark.parametrize("a,b", [(None, "1"), ("1", None), (None, None), ("", "")])
def test_missing_answers_never_match(a, b):
    assert not answers_equivalent(a, b)


def test_extracted_answers_compare_end_to_end():
    assert answers_equivalent(final_answer("... so \\boxed{\\frac{1}{2}}"), final_answer("The answer is 0.5."))
    assert not answers_equivalent(final_answer("no answer"), final_answer("\\boxed{1}"))


def test_text_answer_detection():
    assert is_text_answer("Paris")
    assert is_text_answer("\\text{yes}")
    assert not is_text_answer("\\sqrt{8}")
    assert not is_text_answer("x^2 + \\pi")


def test_huge_or_unbalanced_input_is_safe():
    assert last_boxed("\\boxed{" * 10_000) is None
    assert not answers_equivalent("1" * 1000, "2" * 1000)


UNIT_AFTER_NUMBER = [
    ("\\boxed{131 \\text{ apples}}", "131"),
    ("so there are \\boxed{138 \\text}", "138"),          # a box closed right after the cut-off unit
    ("The answer is 131 \\text", "131"),                   # cut off at the token limit
    ("The answer is 62 \\text{", "62"),
    ("The answer is 62 \\text{ dollars", "62"),
    ("Total = 40\\,\\text{km}", "40"),
    ("\\boxed{\\frac{1}{2} \\mathrm{hours}}", "\\frac{1}{2}"),
    ("\\boxed{\\text{blue}}", "\\text{blue}"),             # a worded answer keeps its wrapper
    ("The answer is: 81 flowers.", "81"),                   # seen in cat_rl's groups: never matched 81
    ("The answer is 200 candies left", "200"),
    ("The answer is 23 years old.", "23"),
    ("The answer is 121 trays of 11", "121 trays of 11"),   # a second number: not a unit
    ("The answer is 10 percent", "10 percent"),              # words that change the value stay
    ("The answer is no solution.", "no solution"),
    ("so the answer is x = 3 \\text{ and } y = 4", "x = 3 \\text{ and } y = 4"),
]


@pytest.mark.parametrize("text,expected", UNIT_AFTER_NUMBER)
def test_a_trailing_text_unit_is_not_part_of_the_answer(text, expected):
    assert final_answer(text) == expected


def test_cut_off_units_vote_with_the_bare_number():
    from catq.teacher.estimators import majority_vote

    answers = [final_answer(t) for t in ("\\boxed{131}", "The answer is 131 \\text", "The answer is 131 \\text{",
                                         "\\boxed{138 \\text}", "\\boxed{138}")]
    assert answers == ["131", "131", "131", "138", "138"]
    assert majority_vote(answers) == [0, 1, 2]


