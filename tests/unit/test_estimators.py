"""Reference estimators on hand-made groups (catq.teacher.estimators)."""

import math

import pytest

from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup
from catq.teacher.estimators import (
    estimate_reference,
    majority_reference,
    majority_vote,
    mean_nll,
    min_ppl_index,
    parse_selection,
    parse_unified_response,
    synthesis_reference,
)


def make_group(texts, task="math", logprobs=None, question="What is 1/2 + 1/2?"):
    logprobs = logprobs or [[-1.0] * 3 for _ in texts]
    rollouts = [Rollout(t, [1] * len(lp), lp, "stop") for t, lp in zip(texts, logprobs)]
    prompt = Prompt("p1", task, [ChatMessage("user", question)])
    return RolloutGroup(prompt, [1, 2, 3], rollouts, policy_version=0)


class FakeChat:
    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    async def __call__(self, messages, *, temperature=None, prefix=""):
        self.calls.append(messages)
        return self.reply


# -- synthesis ---------------------------------------------------------------------------------


def test_synthesis_with_the_format():
    output = "Summary: two say 1, one says 2.\nUnified response: 1/2 + 1/2 = 1, so \\boxed{1}."
    ref = synthesis_reference(output, "math")
    assert ref.reference == "1/2 + 1/2 = 1, so \\boxed{1}."
    assert not ref.format_fallback and ref.reference_answer == "1"
    assert ref.anchor_output == output and ref.estimator == "synthesis"


@pytest.mark.parametrize(
    "heading",
    ["Unified response:", "**Unified Response:**", "## Unified response", "5. Unified response:", "<unified_response>"],
)
def test_synthesis_heading_variants(heading):
    reference, fallback = parse_unified_response(f"Summary:\nthey agree\n{heading}\nThe answer is 4.")
    assert reference == "The answer is 4." and not fallback


def test_synthesis_takes_the_last_heading_and_closing_tag():
    output = "Summary: I will write a unified response: below.\n<unified_response>final</unified_response> x"
    assert parse_unified_response(output) == ("final", False)


def test_synthesis_without_the_format_falls_back_to_whole_output():
    output = "All of them say the result is \\boxed{7}."
    ref = synthesis_reference(output, "math")
    assert ref.format_fallback and ref.reference == output and ref.reference_answer == "7"


def test_echoed_instructions_are_not_the_format():
    # Measured on SmolLM2-135M: it repeats the prompt's steps instead of following them.
    output = 'Summary: 4. Under the heading "Summary:", write a summary.\n5. Under the heading "Unified response:", write one'
    assert parse_unified_response(output) == (output, True)


def test_copied_template_falls_back():
    assert parse_unified_response("Summary: ...\nUnified response: ...") == ("Summary: ...\nUnified response: ...", True)


def test_unformatted_output_without_a_box_has_no_reference_answer():
    ref = synthesis_reference("Summary:\n1. Find the common ground.\n2. Reconcile.\n3. Keep", "math")
    assert ref.format_fallback and ref.reference_answer is None


@pytest.mark.parametrize("output, answer", [
    ("Summary: The answer is 5.", "5"),
    ("Summary: They all compute it.\n3 + 2 = 5", "5"),
])
def test_unformatted_output_with_a_stated_answer_has_that_reference_answer(output, answer):
    ref = synthesis_reference(output, "math")
    assert ref.format_fallback and ref.reference_answer == answer


def test_synthesis_with_empty_unified_section_falls_back():
    assert parse_unified_response("Summary: ok\nUnified response:   ") == ("Summary: ok\nUnified response:", True)


def test_synthesis_answer_boxed_only_in_summary():
    ref = synthesis_reference("Summary: the answer is \\boxed{3}.\nUnified response: It is three.", "math")
    assert ref.reference_answer == "3" and not ref.format_fallback


def test_open_synthesis_has_no_answer():
    ref = synthesis_reference("Summary: x\nUnified response: Drink water.", "open")
    assert ref.reference == "Drink water." and ref.reference_answer is None


async def test_estimate_reference_synthesis_hides_the_question():
    group = make_group(["\\boxed{1}", "\\boxed{1}", "\\boxed{2}"])
    anchor = FakeChat("Summary: s\nUnified response: \\boxed{1}")
    ref = await estimate_reference(group, "synthesis", anchor=anchor)
    prompt_text = " ".join(m["content"] for m in anchor.calls[0])
    assert "1/2 + 1/2" not in prompt_text and "\\boxed{2}" in prompt_text
    assert ref.reference_answer == "1" and ref.majority_answer == "1"
    await estimate_reference(group, "synthesis", anchor=anchor, include_question=True)
    assert "1/2 + 1/2" in " ".join(m["content"] for m in anchor.calls[1])


# -- majority ----------------------------------------------------------------------------------


def test_majority_groups_equivalent_answers():
    assert majority_vote(["0.5", "3", "\\frac{1}{2}", "1/2", "3"]) == [0, 2, 3]


def test_majority_tie_goes_to_the_first_seen_answer():
    assert majority_vote(["3", "4", "4", "3"]) == [0, 3]
    assert majority_vote(["4", "3", "3", "4"]) == [0, 3]
    assert majority_vote([None, "5", "6"]) == [1]


def test_majority_with_no_answers():
    assert majority_vote([None, None]) == []
    ref = majority_reference(make_group(["no idea", "none"]))
    assert ref.reference_answer is None and ref.format_fallback


def test_majority_reference_is_the_first_rollout_with_the_winning_answer():
    group = make_group(["so \\boxed{2}", "it is \\boxed{1}", "\\boxed{1.0} clearly"])
    ref = majority_reference(group)
    assert ref.reference == "it is \\boxed{1}" and ref.reference_answer == "1" == ref.majority_answer


async def test_majority_on_open_prompts_uses_synthesis():
    group = make_group(["a", "b"], task="open")
    ref = await estimate_reference(group, "majority", anchor=FakeChat("Unified response: c"))
    assert ref.estimator == "synthesis" and ref.reference == "c" and ref.majority_answer is None


# -- min_ppl and self_bon ----------------------------------------------------------------------


def test_min_ppl_picks_lowest_mean_nll_not_lowest_total():
    logprobs = [[-0.5, -0.5], [-0.1] * 10 + [-2.0], [-0.2, -0.2, -0.2], []]
    assert mean_nll(Rollout("", [], [], "stop")) == math.inf
    # means: 0.5, ~0.27, 0.2, inf -> rollout 2 (its total, 0.6, is not the lowest)
    assert min_ppl_index(make_group(["a", "b", "c", "d"], logprobs=logprobs).rollouts) == 2


def test_min_ppl_ties_go_to_lowest_index():
    assert min_ppl_index(make_group(["a", "b"], logprobs=[[-1.0], [-1.0]]).rollouts) == 0


async def test_min_ppl_reference():
    group = make_group(["\\boxed{5}", "\\boxed{6}"], logprobs=[[-2.0], [-0.1]])
    ref = await estimate_reference(group, "min_ppl", anchor=FakeChat("unused"))
    assert ref.reference == "\\boxed{6}" and ref.reference_answer == "6" and ref.estimator == "min_ppl"


@pytest.mark.parametrize("reply,expected", [("2", 1), ("Response 3 is best.", 2), ("9 then 1", 0), ("none", None)])
def test_parse_selection(reply, expected):
    assert parse_selection(reply, 3) == expected


async def test_self_bon_asks_the_policy_with_the_question():
    group = make_group(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"])
    policy = FakeChat("The best is response 2")
    ref = await estimate_reference(group, "self_bon", anchor=FakeChat("unused"), policy=policy)
    assert ref.reference == "\\boxed{2}" and not ref.format_fallback
    assert "1/2 + 1/2" in policy.calls[0][-1]["content"]
    ref = await estimate_reference(group, "self_bon", anchor=FakeChat(""), policy=FakeChat("hmm"))
    assert ref.reference == "\\boxed{1}" and ref.format_fallback


async def test_unknown_estimator():
    with pytest.raises(ValueError, match="unknown estimator"):
        await estimate_reference(make_group(["x"]), "oracle", anchor=FakeChat(""))


# -- the registry ------------------------------------------------------------------------------


def test_every_registered_estimator_loads_and_the_config_reads_the_registry():
    from catq.config import AnchorConfig
    from catq.teacher.registry import ESTIMATORS

    for name, spec in ESTIMATORS.items():
        assert callable(spec.load()), name
        assert AnchorConfig(estimator=name).estimator == name
    with pytest.raises(ValueError, match="unknown estimator 'vote'; known: synthesis, majority"):
        AnchorConfig(estimator="vote")
    assert [n for n, s in ESTIMATORS.items() if s.needs_policy] == ["self_bon"]


async def test_an_estimator_added_to_the_registry_is_dispatched(monkeypatch):
    from catq.teacher import registry

    monkeypatch.setitem(registry.ESTIMATORS, "last", registry.Estimator("last", f"{__name__}:last_rollout"))
    ref = await estimate_reference(make_group(["\\boxed{1}", "\\boxed{2}"]), "last", anchor=FakeChat(""))
    assert ref.reference == "\\boxed{2}" and ref.estimator == "last" and ref.majority_answer == "1"


async def last_rollout(group, **_):
    from catq.teacher.estimators import Reference

    return Reference(group.rollouts[-1].text, "last", "")


@pytest.mark.parametrize("unified, answer", [
    ("The farmer has 40 animals.", "40"),
    ("The total is \\(12 + 19 = 31\\).", "31"),     # the unmatched closing \) is not part of it
    ("So 72 - 29 = 43", "43"),
])
def test_a_formatted_synthesis_without_a_box_answers_with_its_stated_or_last_number(unified, answer):
    ref = synthesis_reference(f"Summary: they differ.\nUnified response: {unified}", "math")
    assert not ref.format_fallback and ref.reference_answer == answer
