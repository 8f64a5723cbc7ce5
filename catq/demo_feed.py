"""What `catq demo` submits while it trains: each training question again and again (as TTRL
trains on its test questions for several epochs), until it stops giving signal.

Pure bookkeeping, no Redis: :class:`TrainingFeed` is told each submission's final result and
answers which questions to submit next. A question whose group was trained on or set aside is
submitted again (a new prompt id, the same question) whenever fewer than ``low_water``
submissions are in flight, so the learner is never short of groups. A question retires after
``retire_after`` submissions in a row gave no signal (every answer got the same reward: the
policy agrees with itself there); when every question has retired and nothing is in flight,
nothing can give signal any more and the demo stops.
"""

from __future__ import annotations

from dataclasses import dataclass

from catq.results import Status


@dataclass
class Question:
    text: str
    submissions: int = 0
    no_signal_streak: int = 0
    """Submissions in a row whose group had no signal (reset by one that was trained on)."""
    prompt_id: str | None = None
    """The submission in flight; None when the last one has a final result."""
    finished_at: int = 0
    """Order of the last final result (lower: longer ago), for fair resubmission."""
    retired: bool = False


@dataclass
class FeedCounts:
    trained: int = 0
    no_signal: int = 0
    other: int = 0
    """Set aside for another reason (stale) or dead."""


class TrainingFeed:
    def __init__(self, texts: list[str], *, retire_after: int = 3, low_water: int = 8):
        if retire_after < 1 or low_water < 1:
            raise ValueError("retire_after and low_water must be at least 1")
        self.questions = [Question(t) for t in texts]
        self.retire_after = retire_after
        self.low_water = low_water
        self.counts = FeedCounts()
        self._finished = 0

    def in_flight(self) -> list[Question]:
        return [q for q in self.questions if q.prompt_id is not None]

    def submitted(self, question: Question, prompt_id: str) -> None:
        question.prompt_id = prompt_id
        question.submissions += 1

    def observe(self, question: Question, result: dict) -> None:
        """Record a submission's result (its result hash); only a final one changes anything."""
        status = result.get("status")
        if question.prompt_id is None or status not in (Status.TRAINED, Status.SET_ASIDE, Status.DEAD):
            return
        if status == Status.TRAINED:
            question.no_signal_streak = 0
            self.counts.trained += 1
        elif status == Status.SET_ASIDE and str(result.get("set_aside", "")).startswith("no signal"):
            question.no_signal_streak += 1
            self.counts.no_signal += 1
        else:  # stale, or dead: the question itself may still give signal
            self.counts.other += 1
            question.no_signal_streak += status == Status.DEAD  # a dead one must not loop forever
        question.retired = question.no_signal_streak >= self.retire_after
        question.prompt_id = None
        self._finished += 1
        question.finished_at = self._finished

    def next_batch(self) -> list[Question]:
        """Questions to submit now: every never-submitted one at first, then finished ones while
        fewer than ``low_water`` are in flight, those that gave signal most recently first."""
        fresh = [q for q in self.questions if q.submissions == 0]
        if fresh:
            return fresh
        room = self.low_water - len(self.in_flight())
        if room <= 0:
            return []
        ready = [q for q in self.questions if q.prompt_id is None and not q.retired]
        ready.sort(key=lambda q: (q.no_signal_streak, q.finished_at))
        return ready[:room]

    @property
    def resubmissions(self) -> int:
        return sum(max(q.submissions - 1, 0) for q in self.questions)

    @property
    def retired(self) -> int:
        return sum(q.retired for q in self.questions)

    @property
    def exhausted(self) -> bool:
        """No question can give signal any more: every one retired, nothing in flight."""
        return all(q.retired and q.prompt_id is None for q in self.questions)

    def exhausted_message(self) -> str:
        return (f"nothing can give signal any more: each of the {len(self.questions)} training questions "
                f"got the same reward for every answer in its last {self.retire_after} groups "
                "(the policy agrees with itself everywhere); stopping")
