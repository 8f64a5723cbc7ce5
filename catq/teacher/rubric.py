"""Parsing the anchor's self-proposed rubric: ``<rubric><criterion>...</criterion>...</rubric>``.

The text comes from a model, so it is untrusted and often broken. We never hand it to an XML
parser: a linear scan pairs ``<criterion>`` tags with their closing tags, inner tags are
stripped, and only the five predefined XML entities and numeric character references are
decoded. DOCTYPE/ENTITY declarations are refused outright (no entity, internal or external, is
ever expanded), and input size, criterion length and criterion count are bounded.

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
_PREDEFINED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"', "apos": "'"}


class RubricParseError(ValueError):
    """The anchor's output holds no usable rubric; the message says why."""


def parse_rubric(text: str, min_criteria: int = 5) -> list[str]:
    """The rubric's criteria, in order, deduplicated; RubricParseError when fewer than
    ``min_criteria`` usable ones are found or the input is unsafe."""
    if len(text) > MAX_INPUT_CHARS:
        raise RubricParseError(f"rubric output too large ({len(text)} chars > {MAX_INPUT_CHARS})")
    if _DECLARATION.search(text):
        raise RubricParseError("rubric output contains a DOCTYPE/ENTITY declaration")
    text = text.replace("<![CDATA[", "").replace("]]>", "")
    criteria: list[str] = []
    for raw in _criterion_bodies(text):
        criterion = _clean(raw)
        if _PLACEHOLDER.fullmatch(criterion) or len(criterion) > MAX_CRITERION_CHARS:
            continue
        if criterion not in criteria:
            criteria.append(criterion)
    if len(criteria) < min_criteria:
        found = f"{len(criteria)} usable criteria" if criteria else "no usable <criterion> elements"
        raise RubricParseError(f"rubric has {found}, need at least {min_criteria}")
    return criteria[:MAX_CRITERIA]


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


def parse_criteria(text: str) -> list[str]:
    """Every usable criterion of one draft, however few (none is fine): :func:`parse_rubric`'s
    scanner and bounds, so RubricParseError only for unsafe or oversized input."""
    return parse_rubric(text, min_criteria=0)


def normalise_criterion(criterion: str) -> str:
    """The form two criteria are compared in: lowercase, whitespace collapsed, trailing
    punctuation stripped."""
    return re.sub(r"\s+", " ", criterion.lower()).strip().rstrip(".!?;:,…").rstrip()


def merge_drafts(texts: list[str], *, min_criteria: int, max_criteria: int) -> tuple[list[str], RubricInfo]:
    """(criteria, info) of rubric drafts: each parsed leniently, their criteria merged in order,
    a criterion equal to an earlier one once normalised dropped (the first wording is kept), at
    most ``max_criteria``. Echoes of the prompt's format example never count (the parser drops
    them). An empty list when no draft has a usable criterion."""
    merged: dict[str, str] = {}
    info = RubricInfo(drafts=len(texts))
    for number, text in enumerate(texts, start=1):
        try:
            criteria = [c for c in parse_criteria(text) if normalise_criterion(c)]
        except RubricParseError as exc:
            criteria = []
            info.reasons.append(f"draft {number}: {exc}")
        else:
            if not criteria:
                info.reasons.append(f"draft {number}: no usable <criterion> elements")
        info.criteria_per_draft.append(len(criteria))
        for criterion in criteria:
            merged.setdefault(normalise_criterion(criterion), criterion)
    rubric = list(merged.values())[:max_criteria]
    info.short = len(rubric) < min_criteria
    return rubric, info


async def draft_rubric(
    anchor, reference: str, *, min_criteria: int, max_criteria: int, drafts: int, attempts: int,
    temperature: float, question: str | None = None,
) -> tuple[list[str], RubricInfo]:
    """(criteria, info) from the anchor (an async chat callable, see
    catq.teacher.estimators.ChatFn). Drafts until the merged rubric has ``min_criteria``
    criteria, or ``drafts`` drafts once it has one, or ``attempts`` drafts while it has none;
    the first draft at the anchor's own sampling, the rest at ``temperature`` (a greedy anchor
    would repeat itself). RubricParseError when no draft gave a usable criterion."""
    from catq.teacher.prompts import RUBRIC_PREFIX, rubric_messages

    messages = rubric_messages(reference, min_criteria, question)
    texts: list[str] = []
    while True:
        texts.append(await anchor(messages, temperature=temperature if texts else None, prefix=RUBRIC_PREFIX))
        criteria, info = merge_drafts(texts, min_criteria=min_criteria, max_criteria=max_criteria)
        if not info.short or len(texts) >= (drafts if criteria else attempts):
            break
    if not criteria:
        raise RubricParseError(f"no valid rubric after {len(texts)} attempts: {'; '.join(info.reasons)}")
    return criteria, info
