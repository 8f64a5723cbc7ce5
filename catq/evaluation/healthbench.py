"""HealthBench scores: responses graded per physician criterion by catq's judge.

Each (response, criterion) pair is one judge call through :func:`catq.teacher.judging.score_open`,
the code the judge role rewards open prompts with (``judge.verdict``, ``judge.attempts``,
``judge.concurrency`` apply; ``judge.soft`` does not: a HealthBench criterion is met or not).
A response scores the points of the criteria it meets over the positive points available,
clipped to [0, 1]; a met criterion with negative points subtracts. (OpenAI's simple-evals
clips the mean over examples instead of each response; the two differ only where a response's
penalties outweigh what it earned.)
"""

from __future__ import annotations

from dataclasses import dataclass

from catq.config import JudgeConfig
from catq.evaluation.formats import RubricItem
from catq.messages import ChatMessage, Rollout


def healthbench_score(rubric: list[RubricItem], met: list[bool]) -> float:
    """Points of the met criteria over the positive points available, clipped to [0, 1]."""
    if len(met) != len(rubric):
        raise ValueError(f"{len(met)} verdicts for {len(rubric)} criteria")
    possible = sum(item.points for item in rubric if item.points > 0)
    if possible <= 0:
        raise ValueError("a rubric needs a criterion with positive points")
    achieved = sum(item.points for item, satisfied in zip(rubric, met) if satisfied)
    return min(1.0, max(0.0, achieved / possible))


def conversation_text(messages: list[ChatMessage]) -> str:
    """The conversation as the judge's request: the one user turn as it is, or every turn
    prefixed with its role (HealthBench conversations can be several turns long)."""
    if len(messages) == 1:
        return messages[0].content
    return "\n\n".join(f"{m.role}: {m.content}" for m in messages)


@dataclass
class Graded:
    score: float
    criteria_met: list[bool]


class RubricGrader:
    """Grades responses to one conversation against its rubric; a text graded once is not
    graded again (estimators that pick a rollout return its text unchanged)."""

    def __init__(self, judge, config: JudgeConfig, messages: list[ChatMessage], rubric: list[RubricItem]):
        self.judge = judge
        self.config = config
        self.question = conversation_text(messages)
        self.rubric = rubric
        self.graded: dict[str, Graded] = {}

    async def grade(self, texts: list[str]) -> list[Graded]:
        from catq.teacher.judging import score_open

        new = list(dict.fromkeys(t for t in texts if t not in self.graded))
        if new:
            rollouts = [Rollout(text, [], [], "stop") for text in new]
            _, verdicts = await score_open(self.judge, self.question, rollouts,
                                           [item.criterion for item in self.rubric],
                                           attempts=self.config.attempts, concurrency=self.config.concurrency,
                                           verdict=self.config.verdict)
            for i, text in enumerate(new):
                met = [v.satisfied for v in sorted(verdicts, key=lambda v: v.criterion_index) if v.rollout_index == i]
                self.graded[text] = Graded(healthbench_score(self.rubric, met), met)
        return [self.graded[t] for t in texts]
