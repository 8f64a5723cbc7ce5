"""Synthesis beyond the paper, for small anchors: the primed final-answer continuation, k-sample
self-consistency and the short prompt (catq.teacher.estimators)."""

import pytest

from catq.config import AnchorConfig
from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup
from catq.teacher import prompts
from catq.teacher.estimators import estimate_reference, read_primed_answer


def make_group(texts, task="math"):
    rollouts = [Rollout(t, [1], [-1.0], "stop") for t in texts]
    return RolloutGroup(Prompt("p1", task, [ChatMessage("user", "What is 3 + 4?")]), [1], rollouts, 0)


class EngineLikeAnchor:
    """Replies in order; like EngineChat, the returned text starts with the prefix."""

    supports_prefix = True

    def __init__(self, *replies):
        self.replies = list(replies)
        self.calls = []

    async def __call__(self, messages, *, temperature=None, prefix="", max_new_tokens=None):
        self.calls.append({"messages": messages, "prefix": prefix, "temperature": temperature,
                           "max_new_tokens": max_new_tokens})
        return prefix + self.replies.pop(0)


class ChatApiAnchor(EngineLikeAnchor):
    supports_prefix = False

    async def __call__(self, messages, *, temperature=None, prefix="", max_new_tokens=None):
        assert not prefix
        return await super().__call__(messages, temperature=temperature, max_new_tokens=max_new_tokens)


GROUP = make_group(["3 + 4 = 7", "\\boxed{7}", "\\boxed{8}"])


async def test_a_synthesis_without_an_answer_is_continued_with_a_primed_final_answer():
    anchor = EngineLikeAnchor(" The responses mostly agree on the sum.", "7}.")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor)
    assert ref.reference_answer == "7" and ref.answer_primed
    first, second = anchor.calls
    assert second["messages"] == first["messages"]  # the anchor's own context, continued
    assert second["prefix"] == (prompts.SYNTHESIS_PREFIX + " The responses mostly agree on the sum."
                                + prompts.FINAL_ANSWER_PRIME)
    assert second["temperature"] == 0.0 and second["max_new_tokens"] == 16


async def test_a_synthesis_with_an_answer_needs_no_priming():
    anchor = EngineLikeAnchor(" all agree.\nUnified response: 3 + 4 = \\boxed{7}")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor)
    assert ref.reference_answer == "7" and not ref.answer_primed
    assert len(anchor.calls) == 1


async def test_priming_can_be_turned_off():
    anchor = EngineLikeAnchor(" nothing stated")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor,
                                   options=AnchorConfig(prime_final_answer=False))
    assert ref.reference_answer is None and len(anchor.calls) == 1


async def test_chat_api_anchors_get_a_follow_up_turn_instead():
    anchor = ChatApiAnchor("Summary: they agree.", "The final answer is \\boxed{7}.")
    options = AnchorConfig(prompt="short")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor, options=options)
    assert ref.reference_answer == "7" and ref.answer_primed
    follow_up = anchor.calls[1]["messages"]
    assert follow_up[-2] == {"role": "assistant", "content": "Summary: they agree."}
    assert follow_up[-1]["content"] == prompts.FINAL_ANSWER_FOLLOW_UP


def test_the_primed_answer_is_read_up_to_its_closing_brace():
    assert read_primed_answer("7}. Because") == "7"
    assert read_primed_answer("\\frac{1}{2}} and more") == "\\frac{1}{2}"
    assert read_primed_answer(" 12\nnext line") == "12"
    assert read_primed_answer("") is None
    assert read_primed_answer("x" * 60 + "}") is None


async def test_k_syntheses_vote_and_the_first_wins_ties():
    anchor = EngineLikeAnchor("\nUnified response: \\boxed{8}", "\nUnified response: \\boxed{7}",
                              "\nUnified response: \\boxed{7}", "\nUnified response: \\boxed{8}")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor,
                                   options=AnchorConfig(synthesis_samples=4, synthesis_temperature=0.9))
    assert ref.synthesis_answers == ["8", "7", "7", "8"]
    assert ref.reference_answer == "8"  # 2 vs 2: the first draw's answer
    assert [c["temperature"] for c in anchor.calls] == [None, 0.9, 0.9, 0.9]


async def test_k_syntheses_take_the_answer_most_state():
    anchor = EngineLikeAnchor("\nUnified response: \\boxed{8}", "\nUnified response: \\boxed{7}",
                              "\nUnified response: \\boxed{7}")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor, options=AnchorConfig(synthesis_samples=3))
    assert ref.reference_answer == "7" and "\\boxed{7}" in ref.reference


async def test_the_short_prompt_asks_for_the_answer_without_the_question():
    anchor = EngineLikeAnchor("Most say 7, so the answer is \\boxed{7}.")
    ref = await estimate_reference(GROUP, "synthesis", anchor=anchor, options=AnchorConfig(prompt="short"))
    assert ref.reference_answer == "7" and not ref.format_fallback
    (call,) = anchor.calls
    assert call["prefix"] == ""
    text = call["messages"][-1]["content"]
    assert "What is 3 + 4" not in text and "\\boxed{}" in text and "<response 3>" in text


@pytest.mark.parametrize("prompt", ["paper", "short"])
async def test_open_prompts_keep_the_paper_synthesis(prompt):
    anchor = EngineLikeAnchor("\nUnified response: Sleep 8 hours.")
    ref = await estimate_reference(make_group(["a", "b"], task="open"), "synthesis", anchor=anchor,
                                   options=AnchorConfig(prompt=prompt))
    assert ref.reference == "Sleep 8 hours." and len(anchor.calls) == 1


@pytest.mark.parametrize("prompt", ["paper", "catq"])
async def test_priming_and_the_unified_parser_work_with_paper_and_catq_prompts(prompt):
    options = AnchorConfig(prompt=prompt)
    unformatted = EngineLikeAnchor(" The responses mostly agree on the sum.", "7}.")
    ref = await estimate_reference(GROUP, "synthesis", anchor=unformatted, options=options)
    assert ref.reference_answer == "7" and ref.answer_primed
    formatted = EngineLikeAnchor(" they agree.\nUnified response: 3 + 4 = 7.\nFinal answer: \\boxed{7}")
    ref = await estimate_reference(GROUP, "synthesis", anchor=formatted, options=options)
    assert ref.reference == "3 + 4 = 7.\nFinal answer: \\boxed{7}" and ref.reference_answer == "7"
    assert not ref.answer_primed and not ref.format_fallback

