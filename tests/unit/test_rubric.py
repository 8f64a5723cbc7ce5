"""Rubric XML parsing on valid, partial and malicious input (catq.teacher.rubric)."""

import time

import pytest

from catq.teacher.rubric import (
    MAX_CRITERIA,
    RubricParseError,
    is_usable,
    parse_rubric,
    render_rubric,
)

CRITERIA = [f"The response mentions point {i}." for i in range(1, 6)]


def xml(criteria, wrapper=True):
    body = "\n".join(f"<criterion>{c}</criterion>" for c in criteria)
    return f"<rubric>\n{body}\n</rubric>" if wrapper else body


def test_valid_rubric():
    assert parse_rubric(xml(CRITERIA)) == CRITERIA


def test_rubric_with_chatter_markdown_and_attributes():
    text = "Sure! Here is the rubric:\n```xml\n" + xml(CRITERIA).replace(
        "<criterion>", '<Criterion id="x">'
    ).replace("</criterion>", "</Criterion >") + "\n```\nHope this helps."
    assert parse_rubric(text) == CRITERIA


def test_entities_are_decoded_and_inner_tags_stripped():
    items = CRITERIA[:4] + ["Says <b>salt</b> &lt; 5 g &amp; water &#x3e; 2 l"]
    assert parse_rubric(xml(items))[-1] == "Says salt < 5 g & water > 2 l"


def test_round_trip_through_render():
    items = CRITERIA[:4] + ["Uses a < b & c > d"]
    assert parse_rubric(render_rubric(items)) == items


def test_duplicates_and_empty_criteria_do_not_count():
    with pytest.raises(RubricParseError, match="4 usable criteria"):
        parse_rubric(xml(CRITERIA[:4] + [CRITERIA[0], "   "]))


def test_partial_rubric_cut_off_mid_criterion_keeps_complete_ones():
    text = xml(CRITERIA + ["The response ends with"])[: -len("</criterion>\n</rubric>")]
    assert parse_rubric(text) == CRITERIA


def test_missing_wrapper_is_accepted():
    assert parse_rubric(xml(CRITERIA, wrapper=False)) == CRITERIA


def test_unclosed_criterion_followed_by_another_is_dropped():
    text = "<rubric><criterion>broken" + xml(CRITERIA)
    assert parse_rubric(text) == CRITERIA


def test_too_few_criteria_says_why():
    with pytest.raises(RubricParseError, match="3 usable criteria, need at least 5"):
        parse_rubric(xml(CRITERIA[:3]))
    with pytest.raises(RubricParseError, match="no usable <criterion> elements"):
        parse_rubric("1. be nice\n2. be short")
    assert parse_rubric(xml(CRITERIA[:3]), min_criteria=3) == CRITERIA[:3]


def test_external_entities_are_refused():
    xxe = (
        '<?xml version="1.0"?>\n<!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
        + xml(CRITERIA[:4] + ["&xxe;"])
    )
    with pytest.raises(RubricParseError, match="DOCTYPE/ENTITY"):
        parse_rubric(xxe)


def test_billion_laughs_is_refused():
    bomb = '<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>' + xml(
        CRITERIA[:4] + ["&lol2;"]
    )
    with pytest.raises(RubricParseError):
        parse_rubric(bomb)


def test_undeclared_entity_reference_stays_literal():
    assert parse_rubric(xml(CRITERIA[:4] + ["uses &foo; here"]))[-1] == "uses &foo; here"


def test_huge_input_is_refused_quickly():
    with pytest.raises(RubricParseError, match="too large"):
        parse_rubric("<criterion>" * 1_000_000)


def test_many_unclosed_tags_parse_in_linear_time():
    start = time.perf_counter()
    with pytest.raises(RubricParseError):
        parse_rubric("<criterion>x" * 8000)
    assert time.perf_counter() - start < 1.0


def test_criteria_count_and_length_are_bounded():
    many = [f"Mentions point number {i}." for i in range(50)]
    assert len(parse_rubric(xml(many))) == MAX_CRITERIA
    long = CRITERIA + ["x" * 10_000]
    assert parse_rubric(xml(long)) == CRITERIA


def test_cdata_content_is_kept_without_stray_brackets():
    assert parse_rubric(xml(CRITERIA[:4] + ["<![CDATA[Says a < b]]>"]))[-1] == "Says a b"


def test_echoed_format_example_is_not_a_criterion():
    with pytest.raises(RubricParseError, match="4 usable"):
        parse_rubric(xml(CRITERIA[:4] + ["The response ...", "...", "The response"]))


def test_lenient_parse_takes_any_number_with_the_same_safety():
    from catq.teacher.rubric import parse_criteria

    assert parse_criteria(xml(CRITERIA[:1])) == CRITERIA[:1]
    assert parse_criteria("no rubric here") == [] and parse_criteria(xml(["The response ..."])) == []
    assert len(parse_criteria(xml([f"Mentions point number {i}." for i in range(50)]))) == MAX_CRITERIA
    with pytest.raises(RubricParseError, match="DOCTYPE/ENTITY"):
        parse_criteria('<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + xml(["&x;"]))
    with pytest.raises(RubricParseError, match="too large"):
        parse_criteria("<criterion>" * 1_000_000)


DEGENERATE = [  # written by the 135M anchor (issue 31), or echoes of rubric_messages' instructions
    "The response must meet all criteria specified in the reference.",
    "The rubric is followed.",
    "Each criterion is binary: clearly met or not met.",
    "Matches the reference response.",
    "The response is as good as the reference answer.",
    "It is one short sentence.",
    "The response must be formatted as a single sentence with no more than 3 sentences.",
    "Checkable by reading a response alone.",
    "The response must be met by [criterion1], [criterion2]",
]
LEGITIMATE = [
    "The response references a doctor's advice.",
    "The response cites the CDC guideline on sleep.",
    "The response mentions a single dose of ibuprofen.",
    "The response includes a reference to a sleep study.",
    "The response gives the reference range for blood pressure.",
    "The response names the diagnostic criteria for migraine.",
    "The response recommends drinking water.",
]


def test_criteria_about_the_rubric_the_reference_or_the_instructions_are_dropped():
    text = xml(DEGENERATE + LEGITIMATE)
    assert parse_rubric(text, min_criteria=len(LEGITIMATE), drop_self_referential=True) == LEGITIMATE
    with pytest.raises(RubricParseError, match="no usable <criterion> elements"):
        parse_rubric(xml(DEGENERATE), min_criteria=1, drop_self_referential=True)
    assert parse_rubric(text, min_criteria=1) == DEGENERATE + LEGITIMATE  # off unless asked


@pytest.mark.parametrize("criterion", DEGENERATE)
def test_each_self_referential_criterion_is_unusable(criterion):
    assert not is_usable(criterion)


@pytest.mark.parametrize("criterion", LEGITIMATE)
def test_each_legitimate_criterion_is_usable(criterion):
    assert is_usable(criterion)
