"""Rubric drafts merged into one rubric, and what the anchor does with a short or empty one
(catq.teacher.rubric.merge_drafts / draft_rubric, catq.teacher.anchor)."""

import pytest

from catq.config import AnchorConfig
from catq.runtime import DeadLetterError
from catq.teacher.anchor import AnchorHandler
from catq.teacher.prompts import RUBRIC_PREFIX
from catq.teacher.rollout import RolloutHandler
from catq.teacher.rubric import (
    RubricParseError,
    draft_rubric,
    merge_drafts,
    normalise_criterion,
)
from tests.unit.test_teacher_roles import (
    FakeChat,
    FakeEngine,
    FakeTokenizer,
    make_ctx,
    prompt,
)


def xml(*criteria):
    return "<rubric>" + "".join(f"<criterion>{c}</criterion>" for c in criteria) + "</rubric>"


def merge(*texts, min_criteria=3, max_criteria=8, drop_self_referential=False):
    return merge_drafts(list(texts), min_criteria=min_criteria, max_criteria=max_criteria,
                        drop_self_referential=drop_self_referential)


class RecordingAnchor:
    """A fake anchor ChatFn: replies in turn (the last repeats), records each call's temperature
    and prefix."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    async def __call__(self, messages, *, temperature=None, prefix="", max_new_tokens=None):
        self.calls.append((temperature, prefix))
        return self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]


async def draft(replies, **options):
    anchor = RecordingAnchor(replies)
    settings = {"min_criteria": 3, "max_criteria": 8, "drafts": 4, "attempts": 3, "temperature": 0.8} | options
    criteria, info = await draft_rubric(anchor, "Sleep eight hours.", **settings)
    return criteria, info, anchor.calls


def test_normalisation():
    assert normalise_criterion("  The response   mentions SLEEP.  ") == "the response mentions sleep"
    assert normalise_criterion("Avoids caffeine!?") == "avoids caffeine"
    assert normalise_criterion("Says 5 g.") != normalise_criterion("Says 5 kg.")


def test_distinct_criteria_merged_in_order_first_wording_kept():
    criteria, info = merge(xml("Mentions sleep.", "Avoids caffeine"),
                           xml("mentions   SLEEP", "Suggests a routine.", "avoids caffeine!"))
    assert criteria == ["Mentions sleep.", "Avoids caffeine", "Suggests a routine."]
    assert info.drafts == 2 and info.criteria_per_draft == [2, 3] and not info.short and not info.reasons


def test_duplicates_within_a_draft_count_once():
    criteria, info = merge(xml("Mentions sleep.", "mentions sleep", "Mentions sleep!"))
    assert criteria == ["Mentions sleep."] and info.short


def test_merged_rubric_is_capped_at_max_criteria():
    criteria, _ = merge(xml(*(f"Point {i}." for i in range(5))), xml(*(f"Point {i}." for i in range(5, 10))),
                        max_criteria=6)
    assert criteria == [f"Point {i}." for i in range(6)]


def test_echoed_format_example_is_dropped():
    criteria, info = merge(RUBRIC_PREFIX + "The response ...</criterion>\n<criterion>The response ...</criterion>",
                           xml("...", "Mentions sleep."))
    assert criteria == ["Mentions sleep."] and info.criteria_per_draft == [0, 1]
    assert info.reasons == ["draft 1: no usable <criterion> elements"]


def test_unsafe_draft_is_refused_but_the_others_count():
    bomb = '<!DOCTYPE r [<!ENTITY x "x">]>' + xml("&x;")
    criteria, info = merge(bomb, xml("Mentions sleep."))
    assert criteria == ["Mentions sleep."] and info.criteria_per_draft == [0, 1]
    assert "DOCTYPE/ENTITY" in info.reasons[0]


def test_short_flag_and_nothing_usable():
    assert merge(xml("a", "b"))[1].short and not merge(xml("a", "b", "c"))[1].short
    criteria, info = merge("no xml at all", "")
    assert criteria == [] and info.short and len(info.reasons) == 2


async def test_first_draft_greedy_then_sampled_until_min_reached():
    criteria, info, calls = await draft([xml("A."), xml("a", "B."), xml("C.", "D."), xml("E.")])
    assert criteria == ["A.", "B.", "C.", "D."] and info.drafts == 3 and not info.short
    assert calls == [(None, RUBRIC_PREFIX), (0.8, RUBRIC_PREFIX), (0.8, RUBRIC_PREFIX)]


async def test_a_full_first_draft_is_the_only_call():
    criteria, info, calls = await draft([xml("A.", "B.", "C.", "D.", "E.")], min_criteria=5)
    assert len(criteria) == 5 and info.drafts == 1 and len(calls) == 1


async def test_short_rubric_after_all_drafts_is_used_and_flagged():
    criteria, info, calls = await draft([xml("A."), "oops", xml("a.")], drafts=4)
    assert criteria == ["A."] and info.short and info.drafts == 4
    assert info.criteria_per_draft == [1, 0, 1, 1] and len(calls) == 4


async def test_no_usable_criterion_raises_after_attempts():
    with pytest.raises(RubricParseError, match="no valid rubric after 3 attempts: draft 1: no usable"):
        await draft(["plain prose", RUBRIC_PREFIX + "The response ..."], drafts=4, attempts=3)
    # attempts beyond drafts keep trying while nothing is usable, and stop once something is
    criteria, info, _ = await draft(["x", "y", "z", xml("A.")], drafts=2, attempts=6)
    assert criteria == ["A."] and info.drafts == 4 and info.short


def test_config_bounds():
    assert AnchorConfig().rubric_max_criteria >= AnchorConfig().rubric_min_criteria
    with pytest.raises(ValueError, match="rubric_max_criteria"):
        AnchorConfig(rubric_min_criteria=5, rubric_max_criteria=4)
    with pytest.raises(ValueError):
        AnchorConfig(rubric_drafts=0)


async def open_group(ctx):
    return await RolloutHandler(ctx, [FakeEngine(["a"] * 8)], FakeTokenizer()).roll_out(prompt("open"))


async def test_anchor_uses_a_one_criterion_rubric_and_flags_it():
    ctx = make_ctx(anchor={"rubric_min_criteria": 3, "rubric_drafts": 2})
    anchor = FakeChat(["Unified response: sleep well", xml("Mentions a regular bedtime."), "no xml"])
    (out,) = await AnchorHandler(ctx, anchor).handle(await open_group(ctx))
    assert out.message.rubric == ["Mentions a regular bedtime."]
    assert [t for _, t in anchor.calls] == [None, None, 0.8]  # synthesis, greedy draft, sampled draft
    fields = ctx.results.fields["p1"]
    assert fields["status"] == "referenced" and fields["rubric_short"] is True and fields["rubric_drafts"] == 2


async def test_anchor_result_says_a_full_rubric_is_not_short():
    ctx = make_ctx(anchor={"rubric_min_criteria": 2})
    anchor = FakeChat(["Unified response: sleep well", xml("A.", "B.")])
    await AnchorHandler(ctx, anchor).handle(await open_group(ctx))
    assert ctx.results.fields["p1"]["rubric_short"] is False and ctx.results.fields["p1"]["rubric_drafts"] == 1


async def test_anchor_dead_letters_a_group_with_no_criterion():
    ctx = make_ctx(anchor={"rubric_attempts": 2})
    anchor = FakeChat(["Unified response: x", "nope"])
    with pytest.raises(DeadLetterError, match="no valid rubric after 2 attempts"):
        await AnchorHandler(ctx, anchor).handle(await open_group(ctx))
    assert len(anchor.calls) == 3 and ctx.results.fields["p1"] == {"cat_answer": "x"}


ECHOES = ("The response must meet all criteria specified in the reference.",
          "Each criterion is binary: clearly met or not met.")


def test_a_draft_of_only_self_referential_criteria_says_so():
    rubric, info = merge(xml(*ECHOES), drop_self_referential=True)
    assert rubric == [] and info.criteria_per_draft == [0] and info.reasons == [
        "draft 1: no usable <criterion> elements (2 about the rubric or its instructions)"]


def test_self_referential_criteria_do_not_count_towards_a_merged_rubric():
    first = xml("It is one short sentence.", "The response references a doctor's advice.")
    second = xml("Matches the reference response.", "The response cites the CDC guideline.")
    rubric, info = merge(first, second, min_criteria=2, drop_self_referential=True)
    assert rubric == ["The response references a doctor's advice.", "The response cites the CDC guideline."]
    assert info.criteria_per_draft == [1, 1] and not info.short and info.reasons == []


def test_self_referential_criteria_are_kept_unless_asked():
    assert merge(xml(*ECHOES))[0] == list(ECHOES) and AnchorConfig().rubric_drop_self_referential is False


async def test_anchor_dead_letters_a_group_whose_criteria_are_all_about_the_rubric():
    ctx = make_ctx(anchor={"rubric_attempts": 2, "rubric_drop_self_referential": True})
    anchor = FakeChat(["Unified response: x", xml(*ECHOES)])
    with pytest.raises(DeadLetterError, match=r"no valid rubric after 2 attempts: draft 1: .*\(2 about the rubric"):
        await AnchorHandler(ctx, anchor).handle(await open_group(ctx))
    assert ctx.results.fields["p1"] == {"cat_answer": "x"}
