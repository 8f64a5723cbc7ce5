"""Every teacher prompt, rendered (catq.teacher.prompts)."""

import pytest

from catq.teacher import prompts
from catq.teacher.answers import last_boxed
from catq.teacher.estimators import parse_unified_response
from catq.teacher.rubric import RubricParseError, parse_rubric

ROLLOUTS = ["It is \\boxed{4}.", "2+2 = \\boxed{5}", "four"]


def text_of(messages):
    return "\n".join(m["content"] for m in messages)


def test_synthesis_prompt_for_math():
    messages = prompts.catq_synthesis_messages(ROLLOUTS, "math")
    assert [m["role"] for m in messages] == ["system", "user"]
    text = text_of(messages)
    for rollout in ROLLOUTS:
        assert rollout in text
    assert "<response 3>\nfour\n</response 3>" in text
    for step in ("common ground", "contradictions", "unique insights", prompts.SUMMARY_HEADING,
                 prompts.UNIFIED_HEADING, "\\boxed{}"):
        assert step in text
    assert "request was" not in text
    assert last_boxed(text.replace(ROLLOUTS[0], "").replace(ROLLOUTS[1], "")) is None  # no example answer to echo


def test_synthesis_prompt_for_open_has_no_box_and_can_include_the_question():
    text = text_of(prompts.catq_synthesis_messages(["a", "b"], "open", question="How to sleep?"))
    assert "\\boxed" not in text and "<request>\nHow to sleep?\n</request>" in text
    assert "2 candidate responses to the same request" in text


def test_synthesis_format_example_parses():
    # The format the prompt asks for is exactly what the estimator parses.
    example = f"{prompts.SUMMARY_HEADING} they agree.\n{prompts.UNIFIED_HEADING} It is \\boxed{{4}}."
    assert parse_unified_response(example) == ("It is \\boxed{4}.", False)


def test_rubric_prompt():
    text = text_of(prompts.rubric_messages("Drink water.", 5))
    assert "<reference>\nDrink water.\n</reference>" in text
    assert "at least 5 criteria" in text and "binary" in text
    assert "<rubric>" in text and "<criterion>" in text and "request was" not in text
    assert "How?" in text_of(prompts.rubric_messages("x", 5, question="How?"))


def test_rubric_prompt_example_is_not_itself_a_valid_rubric():
    # The placeholder criteria in the instructions must never pass as a rubric by echo.
    text = text_of(prompts.rubric_messages("Drink water.", 5))
    with pytest.raises(RubricParseError, match="no usable <criterion> elements"):
        parse_rubric(prompts.RUBRIC_PREFIX + text, min_criteria=1)


def test_judge_prompts():
    messages = prompts.judge_messages("Q?", "My answer", "Mentions water")
    assert messages[0]["role"] == "system" and "yes or no" in messages[0]["content"]
    user = messages[1]["content"]
    assert "<request>\nQ?\n</request>" in user and "<response>\nMy answer\n</response>" in user
    assert "<criterion>\nMentions water\n</criterion>" in user and user.endswith("yes or no.")
    retry = prompts.judge_retry_messages("Q?", "My answer", "Mentions water", "maybe")
    assert retry[:2] == messages
    assert retry[2] == {"role": "assistant", "content": "maybe"} and "yes or no" in retry[3]["content"]


def test_selection_prompt():
    (message,) = prompts.selection_messages("What is 2+2?", ROLLOUTS)
    text = message["content"]
    assert "What is 2+2?" in text and "<response 2>\n2+2 = \\boxed{5}\n</response 2>" in text
    assert "(1 to 3)" in text


@pytest.mark.parametrize("task", ["math", "open"])
@pytest.mark.parametrize("name", ["paper", "catq"])
def test_paper_and_catq_prompts_render_for_both_tasks(name, task):
    messages, prefix = prompts.synthesis_request(ROLLOUTS, task, None, name)
    text = text_of(messages)
    assert prefix == prompts.SYNTHESIS_PREFIX  # both are read by the same heading parser
    assert all(r in text for r in ROLLOUTS) and "<request>" not in text  # the question is withheld
    assert prompts.SUMMARY_HEADING in text and prompts.UNIFIED_HEADING in text
    assert ("\\boxed{}" in text) is (task == "math")
    assert last_boxed(text.replace(ROLLOUTS[0], "").replace(ROLLOUTS[1], "")) is None  # nothing to echo as an answer
    with_question = text_of(prompts.synthesis_request(ROLLOUTS, task, "What is 2+2?", name)[0])
    assert "<request>\nWhat is 2+2?\n</request>" in with_question


def test_the_paper_prompt_is_the_papers_recipe():
    math = text_of(prompts.synthesis_request(ROLLOUTS, "math", None, "paper")[0])
    assert "step by step" in math and "minority" in math and 'Final answer: \\boxed{}' in math
    assert "majority is not always right" not in math  # catq's wording stays under "catq"
    open_text = text_of(prompts.synthesis_request(ROLLOUTS, "open", None, "paper")[0])
    assert "single response" in open_text and "step by step" not in open_text  # free-form
    assert text_of(prompts.synthesis_request(ROLLOUTS, "math", None, "catq")[0]) == text_of(
        prompts.catq_synthesis_messages(ROLLOUTS, "math"))


def test_short_is_math_only_and_unknown_prompts_are_refused():
    assert prompts.synthesis_request(ROLLOUTS, "math", None, "short")[1] == ""
    assert prompts.synthesis_request(ROLLOUTS, "open", None, "short") == prompts.synthesis_request(
        ROLLOUTS, "open", None, "paper")
    with pytest.raises(ValueError, match="unknown synthesis prompt"):
        prompts.synthesis_request(ROLLOUTS, "math", None, "loose")
