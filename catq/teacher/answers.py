"""Final answers of math responses: extraction and equivalence.

Extraction (:func:`final_answer`) takes, in order: the last ``\\boxed{...}`` (or ``\\fbox``) with
nested braces; else the last "answer is X" / "Answer: X"; else "= X" ending the text; else the
last number. The paper used string match on the last box; we compare answers for real
mathematical equivalence (:func:`answers_equivalent`) with math-verify (sympy), after a cheap
string normalisation, so ``\\frac{1}{2}``, ``0.5`` and ``1/2`` agree, as do ``2\\sqrt{2}`` and
``\\sqrt{8}``. ``reward.math_match = "boxed_exact"`` picks the paper's rule instead
(:func:`response_answer`, :func:`answers_match`): the last box only, compared as a string with
whitespace removed.

Text answers ("Paris", ``\\text{blue}``) never go to sympy: it reads "Paris" as the product of
five symbols, which would make it equal to "Sapir". They are compared as normalised strings.

math-verify bounds each parse/compare with SIGALRM, which only works in the main thread; off the
main thread we call it without a timeout and rely on :data:`MAX_ANSWER_CHARS` instead.
"""

from __future__ import annotations

import functools
import re
import threading

from math_verify import parse, verify

MAX_ANSWER_CHARS = 200
"""Answers longer than this are compared as strings only (sympy on huge input can hang)."""

SYMPY_TIMEOUT_S = 3

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox|operatorname)\s*\{([^{}]*)\}")
_MATH_WORDS = {"sqrt", "frac", "dfrac", "tfrac", "pi", "infty", "sin", "cos", "tan", "cot", "sec",
               "csc", "log", "ln", "exp", "cup", "cap", "cdot", "times", "div", "pm", "le", "ge",
               "leq", "geq", "neq", "circ", "deg", "degrees", "left", "right", "emptyset",
               "varnothing", "mathbb", "arcsin", "arccos", "arctan", "binom", "mod", "pmod"}


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}`` (nested braces allowed);
    None when there is none. A box cut off by the token limit is skipped for an earlier one.
    Linear time: braces are matched in one pass, not once per box."""
    starts = sorted(
        m.end() for cmd in _BOX_COMMANDS for m in re.finditer(re.escape(cmd) + r"(?![a-zA-Z])", text)
    )
    if not starts:
        return None
    closing = _matching_braces(text)
    for pos in reversed(starts):
        while pos < len(text) and text[pos] == " ":
            pos += 1
        if pos >= len(text):
            continue
        if text[pos] == "{":
            end = closing.get(pos)
            content = text[pos + 1 : end] if end is not None else None
        else:  # "\boxed 5"
            match = re.match(r"[^\s$]+", text[pos:])
            content = match.group(0) if match else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each '{' -> position of its '}' (unclosed ones absent); \\{ and \\} skipped."""
    closing: dict[int, int] = {}
    stack: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            closing[stack.pop()] = i
        i += 1
    return closing


def final_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer of a response, or None when it has none (see the module docstring).
    ``last_number=False`` drops the weakest fallback, for text that may echo numbered
    instructions (an unformatted anchor output)."""
    if not text or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return _without_unit(_clean(boxed))
    stated = _stated_answer(text) or _trailing_equation(text)
    if stated:
        return _without_unit(stated)
    return _last_number(text) if last_number else None


def rollout_answer(text: str, finish_reason: str = "stop") -> str | None:
    """The final answer of a sampled response, whatever its ``finish_reason``. Reading a
    cut-off response only up to its last finished line was tried and reverted: the tests'
    tiny digit models never stop, so every group lost its signal; it needs a measured
    before/after with `catq eval` before it returns."""
    return final_answer(text)


_TRAILING_UNIT = re.compile(r"^(?P<value>.*\d.*?)(?:\s|\\[,;:! ])*\\(?:text|textrm|textbf|mathrm|mbox)"
                            r"(?![a-zA-Z])\s*(?:\{[^{}\d]*\}?)?\s*$", re.DOTALL)


_NUMBER_THEN_WORDS = re.compile(r"^(?P<value>-?\d[\d,]*(?:\.\d+)?(?:/\d+)?)\s+(?P<words>[a-zA-Z][a-zA-Z' ]*)$")
_MEANINGFUL_WORDS = {"pi", "sqrt", "infty", "percent", "hundred", "hundreds", "thousand", "thousands", "million",
                     "millions", "billion", "dozen", "dozens", "half", "halves", "thirds", "quarters", "squared",
                     "cubed", "times", "over", "i"}
"""Words after a number that change its value: never dropped."""


def _without_unit(answer: str) -> str:
    """"131" from "131 \\text{ apples}", and from the cut-off "131 \\text" / "62 \\text{" a
    rollout ends with at the token limit; "81" from "81 flowers" ("The answer is: 81 flowers"):
    a trailing word unit after a number is not part of the answer, and left in, "81 flowers"
    never matched 81 and each spelling formed a vote class of its own. Worded answers
    ("\\text{blue}") have no number before the unit and stay, as do words that change the value."""
    match = _TRAILING_UNIT.match(answer)
    if match:
        return match.group("value").strip()
    match = _NUMBER_THEN_WORDS.match(answer)
    if match and not set(match.group("words").lower().split()) & _MEANINGFUL_WORDS:
        return match.group("value")
    return answer


def _stated_answer(text: str) -> str | None:
    """X from the last "answer is X" / "Answer: X", cut at the end of its line or sentence."""
    for match in reversed(list(_ANSWER_IS.finditer(text))):
        rest = text[match.end() :].split("\n", 1)[0]
        rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0]  # "3.5." -> "3.5"
        answer = _clean(rest)
        if answer and _looks_like_an_answer(answer):
            return answer
    return None


_VERDICT_WORDS = {"correct", "incorrect", "right", "wrong", "valid", "invalid"}
"""'Your answer is correct' grades an answer; it does not state one."""


def _looks_like_an_answer(answer: str) -> bool:
    """Short, and no prose: "The answer is often written as ..." states no answer, and neither
    does an empty box or a verdict ("the answer is correct"). At most three words of two or
    more letters ("no solution" passes)."""
    if len(answer) > MAX_ANSWER_CHARS or "\\boxed" in answer or "\\fbox" in answer:
        return False
    if answer.lower().strip(" ,;:!.") in _VERDICT_WORDS:
        return False
    words = re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{2,}", answer)
    return len(words) <= 3


def _trailing_equation(text: str) -> str | None:
    """X when the text ends with "... = X", cut at the end of its sentence: a rollout stopped at
    the token limit after "82 / 7 = 11. This means that" answers "11", not the whole tail."""
    last_line = text.strip().rsplit("\n", 1)[-1]
    if "=" not in last_line:
        return None
    tail = re.split(r"\.(?:\s|$)", last_line.rsplit("=", 1)[1], maxsplit=1)[0]
    answer = _clean(tail)
    return answer if answer and _looks_like_an_answer(answer) else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _clean(answer: str) -> str:
    answer = answer.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    answer = answer.rstrip(".").strip().strip("$").strip()
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):  # "\(12 + 19 = 31\)" cut at "=": "31\)"
        if answer.endswith(right) and left not in answer:
            answer = answer[: -len(right)].strip()
    return answer


def normalize_answer(answer: str) -> str:
    """A canonical string form for the string-equality fallback: no dollars, text wrappers,
    spacing commands, \\left/\\right, trailing period; \\dfrac/\\tfrac -> \\frac; lower case."""
    s = _clean(answer)
    s = _TEXT_WRAPPERS.sub(r"\1", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    return s.lower()


def is_text_answer(answer: str) -> bool:
    """True for worded answers ("Paris", \\text{blue}, "no solution"), which sympy must not see.
    Answers with digits ("5 \\text{ cm}") are numbers with units: math-verify handles those."""
    if re.search(r"\d", answer):
        return False
    if re.search(r"\\text\s*\{[^{}]*[a-zA-Z]{2,}", answer):
        return True
    words = re.findall(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}", normalize_answer(answer))
    return any(w not in _MATH_WORDS for w in words)


def answers_equivalent(a: str | None, b: str | None) -> bool:
    """Whether two final answers are the same: normalised strings match, or (for non-text
    answers) math-verify finds them equivalent in either direction. None never matches."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    if is_text_answer(a) or is_text_answer(b):
        return False
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    pa, pb = _parsed(a), _parsed(b)
    if not pa or not pb:
        return False
    timeout = _timeout()
    return bool(
        verify(list(pa), list(pb), timeout_seconds=timeout)
        or verify(list(pb), list(pa), timeout_seconds=timeout)
    )


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str) -> tuple:
    return tuple(parse(f"${_clean(answer)}$", parsing_timeout=_timeout()))


def _timeout() -> int | None:
    return SYMPY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


MATH_MATCHES = ("equivalent", "boxed_exact")
"""The values of ``reward.math_match``."""


def boxed_exact_form(answer: str | None) -> str | None:
    """What "boxed_exact" compares: the answer with every whitespace character removed (the only
    normalisation); None for no answer or an empty one."""
    if answer is None:
        return None
    squashed = re.sub(r"\s+", "", answer)
    return squashed or None


def response_answer(text: str, match: str = "equivalent", finish_reason: str = "stop") -> str | None:
    """A response's final answer as ``match`` reads it: :func:`rollout_answer` (box, stated answer,
    closing equation, last number; less for a cut-off response) for "equivalent"; the last box's
    content, whitespace removed, for "boxed_exact" (None when the response has no box)."""
    if match == "boxed_exact":
        return boxed_exact_form(last_boxed(text or ""))
    return rollout_answer(text, finish_reason)


def known_answer(known: str, match: str = "equivalent") -> str:
    """A data set's known answer in the form ``match`` compares: a boxed one is unboxed first."""
    if match == "boxed_exact":
        return last_boxed(known) or known
    return known


def answers_match(a: str | None, b: str | None, match: str = "equivalent") -> bool:
    """Whether two final answers are the same under ``match``: "equivalent" is
    :func:`answers_equivalent`; "boxed_exact" is string equality with whitespace removed."""
    if match == "boxed_exact":
        fa = boxed_exact_form(a)
        return fa is not None and fa == boxed_exact_form(b)
    if match != "equivalent":
        raise ValueError(f"unknown math_match {match!r}; known: {', '.join(MATH_MATCHES)}")
    return answers_equivalent(a, b)
