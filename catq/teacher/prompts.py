"""Every prompt the teacher sends to a model, in one place (each rendered by a unit test).

- :func:`synthesis_request` — the anchor's CaT synthesis (DESIGN §1, step 2), in the wording
  ``anchor.prompt`` names. The anchor sees the G rollouts and **not the question** (the paper
  omits it on purpose; ``include_question`` exists for ablations).

  - ``"paper"`` (:func:`paper_synthesis_messages`): the paper's two synthesis templates as its
    appendix describes them — chain-of-thought for verifiable tasks, free-form for open ones:
    aggregate the responses, reconcile their differences without discarding minority insights,
    a summary section, then the unified response; for math the unified response ends with a
    fixed final-answer line, ``Final answer: \\boxed{...}``. Written from the paper's description
    of its templates (the appendix text itself was not at hand here), not copied from it.
  - ``"catq"`` (:func:`catq_synthesis_messages`): catq's own earlier wording (numbered steps,
    "the majority is not always right"), kept for comparison.
  - ``"short"`` (:func:`short_synthesis_messages`, math only): no summary, just the answer.

  "paper" and "catq" ask for the same two headings (:data:`SUMMARY_HEADING`,
  :data:`UNIFIED_HEADING`), so one parser reads both, and engine anchors get their reply started
  with :data:`SYNTHESIS_PREFIX` either way.
- :func:`rubric_messages` — the anchor turns the reference into >= N binary, checkable criteria,
  as XML (``<rubric><criterion>...</criterion>...</rubric>``).
- :func:`judge_messages` — one (rollout, criterion) pair, strict yes/no; :func:`judge_retry_messages`
  repeats it with the judge's unusable reply and a reminder (a greedy judge would otherwise
  repeat itself).
- :func:`selection_messages` — self best-of-N: the policy reads the question and the rollouts and
  names the best one by number.

Messages are plain ``{"role", "content"}`` dicts, ready for a chat template or an
OpenAI-compatible API. :data:`SYNTHESIS_PREFIX` and :data:`RUBRIC_PREFIX` start the anchor's
replies (measured on SmolLM2-135M: without them it mostly echoed the instructions or wrote
prose instead of XML).
"""

from __future__ import annotations

SUMMARY_HEADING = "Summary:"
UNIFIED_HEADING = "Unified response:"

SYNTHESIS_PREFIX = SUMMARY_HEADING
"""Engine-served anchors get their reply started with these (response priming), so even a small
model begins in the requested format; the returned text includes the prefix."""
RUBRIC_PREFIX = "<rubric>\n<criterion>"

_SYNTHESIS_SYSTEM = (
    "You are an expert at reconciling several attempts at the same task into one answer "
    "that is better than any of them."
)

_SYNTHESIS_STEPS = """Read all of them, then:
1. Find the common ground: what the responses agree on.
2. Reconcile contradictions: where they disagree, work out which is right and why. The majority is not always right; every response may contain mistakes.
3. Keep unique insights: a correct point that only one response makes belongs in the answer.
4. Under the heading "{summary}", write a short summary of this analysis.
5. Under the heading "{unified}", write one complete, self-contained response that combines the best of them. Do not mention the other responses in it."""

_MATH_FORMAT = "The unified response must end with its final answer written inside \\boxed{}."
# No concrete example such as \boxed{42}: a model that echoes the prompt would make it the
# reference answer of every problem (measured on SmolLM2-135M).


def _numbered_responses(rollouts: list[str]) -> str:
    return "\n\n".join(
        f"<response {i}>\n{text.strip()}\n</response {i}>" for i, text in enumerate(rollouts, start=1)
    )


def _question_part(question: str | None, label: str = "The original request was") -> list[str]:
    return [f"{label}:\n<request>\n{question.strip()}\n</request>"] if question is not None else []


def catq_synthesis_messages(
    rollouts: list[str], task: str, question: str | None = None
) -> list[dict[str, str]]:
    """catq's own synthesis wording (``anchor.prompt = "catq"``). ``question`` is shown only when
    given (the ``include_question`` ablation); by default the anchor reconciles the rollouts alone.
    There is deliberately no "Summary: ... Unified response: ..." template: SmolLM2-135M copied
    it verbatim, dots included."""
    kind = "solutions to the same math problem" if task == "math" else "responses to the same request"
    parts = [f"Below are {len(rollouts)} candidate {kind}.", *_question_part(question)]
    parts.append(_numbered_responses(rollouts))
    parts.append(_SYNTHESIS_STEPS.format(summary=SUMMARY_HEADING, unified=UNIFIED_HEADING))
    if task == "math":
        parts.append(_MATH_FORMAT)
    return [
        {"role": "system", "content": _SYNTHESIS_SYSTEM},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_PAPER_MATH = """Your task is to aggregate these responses into a single, better solution. Think step by step:
- Compare the responses and identify where they agree and where they differ.
- Reconcile the differences by checking the reasoning and calculations yourself. Do not discard an idea only because few responses share it: a minority response can be the correct one.

Then write two sections:
{summary} a summary of your analysis: what the responses agree on, where they differ, and how you resolved each difference.
{unified} one complete, step-by-step solution that combines the correct reasoning. End it with a line of the form "Final answer: \\boxed{{}}", with the final answer inside the braces."""

_PAPER_OPEN = """Your task is to aggregate these responses into a single response that is better than any of them:
- Identify what the responses agree on and where they differ or contradict each other.
- Reconcile the differences, keeping whatever is correct and useful. Do not discard an insight only because a single response makes it.
- Leave out what is wrong, unsupported or unsafe.

Then write two sections:
{summary} a summary of your analysis: the common ground, the differences and how you reconciled them.
{unified} the complete unified response, written directly to the person who asked, without mentioning the other responses."""


def paper_synthesis_messages(
    rollouts: list[str], task: str, question: str | None = None
) -> list[dict[str, str]]:
    """The paper's synthesis templates (``anchor.prompt = "paper"``): chain-of-thought for math,
    free-form for open tasks; the question only for the ``include_question`` ablation. The empty
    box in the final-answer line is deliberate: an anchor that echoes it states no answer (and is
    primed for one) instead of a made-up one."""
    kind = "solutions to the same problem" if task == "math" else "responses to the same request"
    instructions = _PAPER_MATH if task == "math" else _PAPER_OPEN
    parts = [f"You are given {len(rollouts)} {kind}.", *_question_part(question),
             _numbered_responses(rollouts),
             instructions.format(summary=SUMMARY_HEADING, unified=UNIFIED_HEADING)]
    return [{"role": "user", "content": "\n\n".join(parts)}]


SYNTHESIS_PROMPTS = ("paper", "catq", "short")
"""The values of ``anchor.prompt``."""


def synthesis_request(rollouts: list[str], task: str, question: str | None,
                      prompt: str = "paper") -> tuple[list[dict[str, str]], str]:
    """(messages, reply prefix) of the named synthesis prompt. "short" is for math only (open
    prompts get the paper's template); its reply has no headings, hence no prefix."""
    if prompt == "short" and task == "math":
        return short_synthesis_messages(rollouts, question), ""
    if prompt == "catq":
        return catq_synthesis_messages(rollouts, task, question), SYNTHESIS_PREFIX
    if prompt in ("paper", "short"):
        return paper_synthesis_messages(rollouts, task, question), SYNTHESIS_PREFIX
    raise ValueError(f"unknown synthesis prompt {prompt!r}; known: {', '.join(SYNTHESIS_PROMPTS)}")


_SHORT_SYNTHESIS = """Below are {n} attempts at the same math problem. Some may be wrong.

{responses}

Work out the correct result from them and finish with the final answer inside \\boxed{{}}."""


def short_synthesis_messages(rollouts: list[str], question: str | None = None) -> list[dict[str, str]]:
    """The "short" synthesis prompt (``anchor.prompt = "short"``, math only): no summary and no
    headings, just the one final answer; small anchors echo the paper prompt's numbered steps
    instead of following them. Still without the question unless the ablation asks for it."""
    content = _SHORT_SYNTHESIS.format(n=len(rollouts), responses=_numbered_responses(rollouts))
    if question is not None:
        content = _question_part(question, "The problem was")[0] + "\n\n" + content
    return [{"role": "user", "content": content}]


FINAL_ANSWER_PRIME = "\n\nFinal answer: \\boxed{"
"""Appended to a synthesis that stated no final answer; the anchor continues its own text from
here, so what it writes next is its answer (``anchor.prime_final_answer``)."""

FINAL_ANSWER_FOLLOW_UP = "State only the final answer of your response above, inside \\boxed{}."
"""The same for chat APIs that cannot continue an assistant turn: a follow-up user turn."""


_RUBRIC_INSTRUCTIONS = """Write a rubric of at least {min_criteria} criteria that a response must meet to be as good as this reference. Each criterion must:
- be a property of the reference response above (what it says, recommends, warns about or gets right),
- be binary: clearly met or not met, checkable by reading a response alone,
- be one short sentence, and different from the other criteria.

Output only XML in exactly this format:
<rubric>
<criterion>The response ...</criterion>
<criterion>The response ...</criterion>
</rubric>"""


def rubric_messages(
    reference: str, min_criteria: int, question: str | None = None
) -> list[dict[str, str]]:
    """Ask the anchor for >= ``min_criteria`` binary criteria, as XML, derived from ``reference``."""
    parts = []
    if question is not None:
        parts.append(f"The request was:\n<request>\n{question.strip()}\n</request>")
    parts.append(f"Here is a reference response:\n<reference>\n{reference.strip()}\n</reference>")
    parts.append(_RUBRIC_INSTRUCTIONS.format(min_criteria=min_criteria))
    return [
        {"role": "system", "content": "You write precise grading rubrics."},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_JUDGE_SYSTEM = "You are a strict grader. You reply with exactly one word: yes or no."


def judge_messages(question: str, response: str, criterion: str) -> list[dict[str, str]]:
    """One judge call: does ``response`` (to ``question``) satisfy ``criterion``? yes/no."""
    content = (
        f"<request>\n{question.strip()}\n</request>\n\n"
        f"<response>\n{response.strip()}\n</response>\n\n"
        f"<criterion>\n{criterion.strip()}\n</criterion>\n\n"
        "Does the response satisfy the criterion? Reply with exactly one word: yes or no."
    )
    return [{"role": "system", "content": _JUDGE_SYSTEM}, {"role": "user", "content": content}]


def judge_retry_messages(
    question: str, response: str, criterion: str, previous_reply: str
) -> list[dict[str, str]]:
    """The judge call again after an unusable reply, with that reply and a reminder."""
    return judge_messages(question, response, criterion) + [
        {"role": "assistant", "content": previous_reply.strip()[:200]},
        {"role": "user", "content": "Reply with exactly one word: yes or no."},
    ]


def selection_messages(question: str, rollouts: list[str]) -> list[dict[str, str]]:
    """Self best-of-N: the policy names the best of its own rollouts by number."""
    content = (
        f"<request>\n{question.strip()}\n</request>\n\n"
        f"Here are {len(rollouts)} candidate responses to this request.\n\n"
        f"{_numbered_responses(rollouts)}\n\n"
        f"Which response is the best: the most correct, complete and helpful? "
        f"Reply with its number only (1 to {len(rollouts)})."
    )
    return [{"role": "user", "content": content}]
