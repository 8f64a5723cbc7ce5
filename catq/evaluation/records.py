"""Per-prompt eval records and their summary: the one place accuracy figures are computed, so
`catq eval` and `catq demo` can never disagree.

A :class:`PromptRecord` holds what one policy version did on one prompt: the G rollouts' final
answers, whether each is right, and for each subset size g (the first g rollouts) each
estimator's reference. Known answers enter only here, after every reference is built.

Scaling in G follows the CaT paper's compute-scaling figure without extra sampling: the
estimators at g see the first g of the same G rollouts. Single-sample accuracy is the mean over
all G rollouts at every g (it does not depend on g; using all G only narrows its interval), and
pass@g is the unbiased estimate from all G.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from catq.evaluation.stats import mean_interval, pass_at_k


@dataclass
class Outcome:
    """One estimator's reference for one prompt at one g, judged against the known answer."""

    answer: str | None
    """The reference's final answer (None: none could be read)."""
    correct: bool
    agrees_majority: bool
    """Its answer is equivalent to the majority answer of the same g rollouts."""
    rewards: list[float]
    """The rewards the pipeline's reward code gives the g rollouts against this reference."""
    reference: str = ""
    format_fallback: bool = False
    answer_primed: bool = False
    """synthesis: the answer came from the primed final-answer continuation."""
    score: float | None = None
    """Rubric-scored prompts (HealthBench): the reference's score; None for math."""

    @property
    def present(self) -> bool:
        return self.answer is not None if self.score is None else bool(self.reference.strip())

    @property
    def value(self) -> float:
        """What the accuracy column averages: the score, or 1/0 for a right/wrong answer."""
        return float(self.correct) if self.score is None else self.score

    @property
    def signal(self) -> bool:
        """GRPO learns only from groups whose rewards differ."""
        return len(set(self.rewards)) > 1


@dataclass
class PromptRecord:
    question: str
    known: str
    rollouts: list[str]
    rollout_answers: list[str | None]
    rollout_correct: list[bool]
    references: dict[int, dict[str, Outcome]] = field(default_factory=dict)
    """g -> estimator -> outcome."""
    label: str | None = None
    """The file's own id of the prompt."""
    metadata: dict = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    """Breakdown key -> value (MATH-500: subject, level)."""
    rollout_scores: list[float] | None = None
    """Rubric-scored prompts: each rollout's score (``rollout_correct`` is then empty)."""
    rollout_criteria_met: list[list[bool]] | None = None
    """Rubric-scored prompts: each rollout's verdict on each criterion, in rubric order."""

    @property
    def scores(self) -> list[float]:
        """Each rollout's score: its rubric score, or 1/0 for a right/wrong final answer."""
        return self.rollout_scores if self.rollout_scores is not None else [float(c) for c in self.rollout_correct]

    @property
    def single(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0

    def pass_at(self, g: int) -> float:
        return pass_at_k(len(self.rollout_correct), sum(self.rollout_correct), g)

    def as_dict(self) -> dict:
        data = asdict(self)
        data["references"] = {str(g): refs for g, refs in data["references"].items()}
        return data


def is_correct(answer: str | None, known: str, match: str = "equivalent") -> bool:
    """``answer`` matches the known answer under ``reward.math_match``."""
    from catq.teacher.answers import answers_match, known_answer

    return answer is not None and answers_match(answer, known_answer(known, match), match)


def rewards_against(answer: str | None, rollout_answers: list[str | None], match: str = "equivalent") -> list[float]:
    """The math rewards of rollouts whose final answers are given (as the judge computes them)."""
    from catq.teacher.answers import answers_match

    return [1.0 if answers_match(answer, a, match) else 0.0 for a in rollout_answers]


def judge_outcome(answer: str | None, known: str, majority: str | None, rewards: list[float],
                  reference: str = "", format_fallback: bool = False, answer_primed: bool = False,
                  match: str = "equivalent") -> Outcome:
    from catq.teacher.answers import answers_match

    agrees = answer is not None and majority is not None and answers_match(answer, majority, match)
    return Outcome(answer, is_correct(answer, known, match), agrees, rewards, reference, format_fallback,
                   answer_primed)


def summarize_g(records: list[PromptRecord], g: int, estimators: list[str]) -> dict:
    """The figures at one g: single, pass@g and, per estimator, accuracy, present rate,
    agreement with the majority and the share of groups with signal, each with its interval."""
    row = {"g": g, "single": mean_interval([r.single for r in records]),
           "pass_at_g": mean_interval([r.pass_at(g) for r in records if r.rollout_scores is None]),
           "estimators": {}}
    for name in estimators:
        outcomes = [r.references[g][name] for r in records if name in r.references.get(g, {})]
        if not outcomes:
            continue
        rewards = [sum(o.rewards) / len(o.rewards) for o in outcomes if o.rewards]
        row["estimators"][name] = {
            "accuracy": mean_interval([o.value for o in outcomes]),
            "present": mean_interval([float(o.present) for o in outcomes]),
            "agree_majority": mean_interval([float(o.agrees_majority) for o in outcomes]),
            "signal": mean_interval([float(o.signal) for o in outcomes]),
            "reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
        }
    return row


def summarize(records: list[PromptRecord], estimators: list[str]) -> list[dict]:
    """One row per g present in the records, ascending (the "by_g" list of results.json)."""
    gs = sorted({g for r in records for g in r.references})
    return [summarize_g(records, g, estimators) for g in gs]


def summarize_groups(records: list[PromptRecord], estimators: list[str]) -> dict[str, list[dict]]:
    """Per breakdown key (MATH-500: subject, level), one row per value at the full G: n, single
    and each estimator's accuracy, with intervals; values in natural order (2 before 10)."""
    g = max((g for r in records for g in r.references), default=None)
    if g is None:
        return {}
    keys = list(dict.fromkeys(key for r in records for key in r.groups))
    breakdown = {}
    for key in keys:
        values = sorted({r.groups[key] for r in records if key in r.groups}, key=_natural)
        breakdown[key] = [_group_row(value, [r for r in records if r.groups.get(key) == value], g, estimators)
                          for value in values]
    return breakdown


def _group_row(value: str, records: list[PromptRecord], g: int, estimators: list[str]) -> dict:
    row = summarize_g(records, g, estimators)
    return {"value": value, "n": len(records), "single": row["single"],
            "estimators": {name: est["accuracy"] for name, est in row["estimators"].items()}}


def _natural(value: str) -> tuple:
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def scaling_sizes(group_size: int) -> list[int]:
    """1, 2, 4, ... up to and always including G."""
    sizes, g = [], 1
    while g < group_size:
        sizes.append(g)
        g *= 2
    return sizes + [group_size]
