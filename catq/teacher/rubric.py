"""Parsing the anchor's self-proposed rubric: ``<rubric><criterion>...</criterion>...</rubric>``.

The text comes from a model, so it is untrusted and often broken. We never hand it to an XML
parser: a linear scan pairs ``<criterion>`` tags with their closing tags, inner tags are
stripped, and only the five predefined XML entities and numeric character references are
decoded. DOCTYPE/ENTITY declarations are refused outright (no entity, internal or external, is
ever expanded), and input size, criterion length and criterion count are bounded.

Partial output (cut off by the token limit, or without the ``<rubric>`` wrapper) is fine as long
as it has enough complete criteria; otherwise :class:`RubricParseError` says why, and the anchor
retries or dead-letters the group with that reason.
"""

from __future__ import annotations

import re

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


async def propose_rubric(
    anchor, reference: str, *, min_criteria: int, attempts: int, question: str | None = None,
    retry_temperature: float = 0.7,
) -> tuple[list[str], str]:
    """(criteria, raw output) from the anchor (an async chat callable, see catq.teacher.chat).
    Malformed output is retried up to ``attempts`` times in all, the retries sampled at
    ``retry_temperature`` (a greedy anchor would repeat itself); then RubricParseError with the
    last reason."""
    from catq.teacher.prompts import RUBRIC_PREFIX, rubric_messages

    messages = rubric_messages(reference, min_criteria, question)
    reasons = []
    for attempt in range(attempts):
        output = await anchor(messages, temperature=None if attempt == 0 else retry_temperature,
                              prefix=RUBRIC_PREFIX)
        try:
            return parse_rubric(output, min_criteria), output
        except RubricParseError as exc:
            reasons.append(str(exc))
    raise RubricParseError(f"no valid rubric after {attempts} attempts: {'; '.join(reasons)}")
