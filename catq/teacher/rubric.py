"""Parsing the anchor's self-proposed rubric: ``<rubric><criterion>...</criterion>...</rubric>``.

The text comes from a model, so it is untrusted and often broken. We never hand it to an XML
parser: a linear scan pairs ``<criterion>`` tags with their closing tags, inner tags are
stripped, and only the five predefined XML entities and numeric character references are
decoded. DOCTYPE/ENTITY declarations are refused outright (no entity, internal or external, is
ever expanded), and input size, criterion length and criterion count are bounded.

With ``drop_self_referential`` (``anchor.rubric_drop_self_referential``), a criterion about the
rubric or the reference itself, or an echo of the rubric prompt's format instructions, is dropped
too (:func:`is_self_referential`): the judge reads a response alone, so it cannot check it, and a
small judge says yes to it every time. It is off by default: the 135M default anchor writes
almost nothing else, so with it most open prompts get no rubric (bench/rubric_drafts.py).

Partial output (cut off by the token limit, or without the ``<rubric>`` wrapper) keeps its
complete criteria; :class:`RubricParseError` says why a text holds too few.

A small anchor (SmolLM2-135M) rarely writes more than two criteria per rubric, so
:func:`draft_rubric` asks for several drafts, the first greedy and the rest sampled, and merges
their distinct criteria (:func:`merge_drafts`) until the rubric is long enough. A rubric that stays
short but has a criterion is used and flagged; only one with none dead-letters the group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MAX_INPUT_CHARS = 100_000
MAX_CRITERION_CHARS = 500
MAX_CRITERIA = 20

_TAG = re.compile(r"<(/?)criterion\b[^<>]{0,200}>", re.IGNORECASE)
_DECLARATION = re.compile(r"<!\s*(?:DOCTYPE|ENTITY)", re.IGNORECASE)
_INNER_TAG = re.compile(r"<[^<>]{0,200}>")
_ENTITY = re.compile(r"&(#x[0-9a-fA-F]{1,6}|#[0-9]{1,7}|lt|gt|amp|quot|apos);")
_PLACEHOLDER = re.compile(r"(?:the response)?\s*(?:\.\.\.|…)?", re.IGNORECASE)
"""An echo of the prompt's format example ("The response ...") is not a criterion."""
_SELF_REFERENCE = re.compile(
    r"\b(?:rubrics?|(?<!diagnostic )(?<!clinical )criteri(?:on|a)\d*"
    r"|(?:the|this|that|its) reference(?! (?:to|ranges?|values?)\b)|reference (?:response|answer|text)s?"
    r"|(?:is|be|are) binary|checkable|clearly met|met or not met"
    r"|one (?:short )?sentence|single sentence|short sentence)\b",
    re.IGNORECASE)
"""A criterion about the rubric or the reference ("The response must meet all criteria specified in
the reference", "Matches the reference response") or an echo of the format instructions of
catq.teacher.prompts.rubric_messages ("Each criterion is binary: clearly met or not met", "It is
one short sentence", "formatted as a single sentence"). Not matched: "references" as a verb
("references a doctor's advice"), "a reference to ...", "the reference range", "diagnostic
criteria", "a single dose"."""
_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


class RubricParseError(ValueError):
    """The anchor's output holds no usable rubric; the message says why."""


def parse_rubric(text: str, min_criteria: int = 5, *, drop_self_referential: bool = False) -> list[str]:
    """The rubric's criteria, in order, deduplicated; RubricParseError when fewer than
    ``min_criteria`` usable ones are found or the input is unsafe. ``drop_self_referential``:
    criteria about the rubric, the reference or the instructions are not usable either."""
    if len(text) > MAX_INPUT_CHARS:
        raise RubricParseError(f"rubric output too large ({len(text)} chars > {MAX_INPUT_CHARS})")
    if _DECLARATION.search(text):
        raise RubricParseError("rubric output contains a DOCTYPE/ENTITY declaration")
    text = text.replace("<![CDATA[", "").replace("]]>", "")
    criteria: list[str] = []
    for raw in _criterion_bodies(text):
        criterion = _clean(raw)
        if _echo_or_too_long(criterion) or (drop_self_referential and is_self_referential(criterion)):
            continue
        if criterion not in criteria:
            criteria.append(criterion)
    if len(criteria) < min_criteria:
        found = f"{len(criteria)} usable criteria" if criteria else "no usable <criterion> elements"
        raise RubricParseError(f"rubric has {found}, need at least {min_criteria}")
    return criteria[:MAX_CRITERIA]


def _echo_or_too_long(criterion: str) -> bool:
    return bool(_PLACEHOLDER.fullmatch(criterion)) or len(criterion) > MAX_CRITERION_CHARS


def is_usable(criterion: str) -> bool:
    """Kept with ``drop_self_referential``: not an echo of the format example, not about the
    rubric, the reference or the instructions, not too long."""
    return not (_echo_or_too_long(criterion) or is_self_referential(criterion))


def is_self_referential(criterion: str) -> bool:
    """About the rubric, the reference or the rubric prompt's instructions (see _SELF_REFERENCE)."""
    return bool(_SELF_REFERENCE.search(criterion))


def self_referential_count(text: str) -> int:
    """How many of a draft's criteria were dropped as self-referential (for the reason a draft
    gave nothing)."""
    return sum(is_self_referential(_clean(raw)) for raw in _criterion_bodies(text[:MAX_INPUT_CHARS]))


def _criterion_bodies(text: str) -> list[str]:
    """Bodies of complete <criterion>...</criterion> pairs; an opening tag followed by another
    opening tag (a missing close) is dropped. Linear in the input."""
    bodies, open_end = [], None
    for tag in _TAG.finditer(text):
        if not tag.group(1):
            open_end = tag.end()
        elif open_end is not None:
            bodies.append(text[open_end : tag.start()])
            open_end = None
    return bodies


def _clean(body: str) -> str:
    body = _INNER_TAG.sub(" ", body)
    if "<" in body or ">" in body:  # a stray bracket inside a criterion: not well-formed
        body = body.replace("<", " ").replace(">", " ")
    body = _ENTITY.sub(_decode_entity, body)
    return re.sub(r"\s+", " ", body).strip()


def _decode_entity(match: re.Match) -> str:
    name = match.group(1)
    if name.startswith("#"):
        code = int(name[2:], 16) if name[1] in "xX" else int(name[1:])
        return chr(code) if 0x20 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else " "
    return _PREDEFINED[name]


def render_rubric(criteria: list[str]) -> str:
    """Criteria back as rubric XML (escaped), e.g. for logs and the per-prompt result."""
    def esc(s: str) -> str:
        return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    return "<rubric>\n" + "".join(f"<criterion>{esc(c)}</criterion>\n" for c in criteria) + "</rubric>"


@dataclass
class RubricInfo:
    """How a merged rubric came about."""

    drafts: int
    """Drafts the anchor wrote."""
    criteria_per_draft: list[int] = field(default_factory=list)
    """Usable criteria parsed from each draft, in order (before merging)."""
    short: bool = False
    """The merged rubric has fewer than ``min_criteria`` criteria (it is used all the same)."""
    reasons: list[str] = field(default_factory=list)
    """Why drafts gave no usable criterion, one line per such draft."""


def parse_criteria(text: str, *, drop_self_referential: bool = False) -> list[str]:
    """Every usable criterion of one draft, however few (none is fine): :func:`parse_rubric`'s
    scanner and bounds, so RubricParseError only for unsafe or oversized input."""
    return parse_rubric(text, min_criteria=0, drop_self_referential=drop_self_referential)


def normalise_criterion(criterion: str) -> str:
    """The form two criteria are compared in: lowercase, whitespace collapsed, trailing
    punctuation stripped."""
    return re.sub(r"\s+", " ", criterion.lower()).strip().rstrip(".!?;:,…").rstrip()


def merge_drafts(texts: list[str], *, min_criteria: int, max_criteria: int,
                 drop_self_referential: bool = False) -> tuple[list[str], RubricInfo]:
    """(criteria, info) of rubric drafts: each parsed leniently, their criteria merged in order,
    a criterion equal to an earlier one once normalised dropped (the first wording is kept), at
    most ``max_criteria``. Echoes of the prompt's format example never count (the parser drops
    them), nor, with ``drop_self_referential``, criteria about the rubric or its instructions (a
    draft left with none says how many it had). An empty list when no draft has a usable
    criterion."""
    merged: dict[str, str] = {}
    info = RubricInfo(drafts=len(texts))
    for number, text in enumerate(texts, start=1):
        try:
            criteria = [c for c in parse_criteria(text, drop_self_referential=drop_self_referential)
                        if normalise_criterion(c)]
        except RubricParseError as exc:
            criteria = []
            info.reasons.append(f"draft {number}: {exc}")
        else:
            if not criteria:
                dropped = self_referential_count(text) if drop_self_referential else 0
                why = f" ({dropped} about the rubric or its instructions)" if dropped else ""
                info.reasons.append(f"draft {number}: no usable <criterion> elements{why}")
        info.criteria_per_draft.append(len(criteria))
        for criterion in criteria:
            merged.setdefault(normalise_criterion(criterion), criterion)
    rubric = list(merged.values())[:max_criteria]
    info.short = len(rubric) < min_criteria
    return rubric, info


async def draft_rubric(
    anchor, reference: str, *, min_criteria: int, max_criteria: int, drafts: int, attempts: int,
    temperature: float, question: str | None = None, drop_self_referential: bool = False,
) -> tuple[list[str], RubricInfo]:
    """(criteria, info) from the anchor (an async chat callable, see
    catq.teacher.estimators.ChatFn). Drafts until the merged rubric has ``min_criteria``
    criteria, or ``drafts`` drafts once it has one, or ``attempts`` drafts while it has none;
    the first draft at the anchor's own sampling, the rest at ``temperature`` (a greedy anchor
    would repeat itself). RubricParseError when no draft gave a usable criterion.
    ``drop_self_referential``: see :func:`merge_drafts`."""
    from catq.teacher.prompts import RUBRIC_PREFIX, rubric_messages

    messages = rubric_messages(reference, min_criteria, question)
    texts: list[str] = []
    while True:
        texts.append(await anchor(messages, temperature=temperature if texts else None, prefix=RUBRIC_PREFIX))
        criteria, info = merge_drafts(texts, min_criteria=min_criteria, max_criteria=max_criteria,
                                      drop_self_referential=drop_self_referential)
        if not info.short or len(texts) >= (drafts if criteria else attempts):
            break
    if not criteria:
        raise RubricParseError(f"no valid rubric after {len(texts)} attempts: {'; '.join(info.reasons)}")
    return criteria, info
