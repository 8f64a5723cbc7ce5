"""Rewards from a reference (DESIGN §1.3).

- math: reward_i = 1 when rollout i's final answer matches the reference's, else 0; no answer
  on either side -> 0. ``reward.math_match`` says what matches: "equivalent" answers
  (math-verify), or "boxed_exact", the paper's string match of the last boxes, where the
  reference's box is the last one the anchor wrote in s (or in its output), never catq's primed
  final-answer line (:func:`math_reference_answer`).
- open: one judge call per (rollout, criterion); reward_i = fraction of criteria satisfied, or
  with ``judge.soft`` the mean of P(yes) / (P(yes) + P(no)) over criteria.
  Verdicts (``judge.verdict``): "logprob" — when the judge has ``yes_no`` (engine judges; OpenAI
  endpoints that return log-probs) one prefill gives P(yes) and P(no) of the first reply token
  and the likelier wins, so every call yields a verdict (its ``raw`` reads "p_yes=… p_no=…");
  a judge without probabilities falls back to text. "text" — replies are parsed strictly
  (:func:`parse_yes_no`); an unusable reply is retried with a reminder, and after ``attempts``
  tries counts as "no" with ``parsed=False`` in its Verdict.
  Calls of one group run concurrently, at most ``concurrency`` at a time.
- Optional length penalty (both tasks): reward -1 for a rollout longer than
  ``length_penalty_tokens`` tokens (paper: 750 for health); 0 turns it off.
"""

from __future__ import annotations

import asyncio
import re
from typing import Literal

from catq.config import JudgeConfig
from catq.messages import ReferencedGroup, Rollout, ScoredGroup, Verdict
from catq.teacher import prompts
from catq.teacher.answers import (
    answers_match,
    boxed_exact_form,
    last_boxed,
    response_answer,
)
from catq.teacher.estimators import ChatFn
from catq.teacher.verify_pool import off_loop

_YES_NO = re.compile(r"(yes|no)(?![a-z])", re.IGNORECASE)


def parse_yes_no(reply: str) -> bool | None:
    """True for "yes", False for "no", None for anything else. Strict: the reply must *start*
    with the word (after whitespace, quotes, markdown emphasis), and must not contain the other
    one ("Yes." and "No, it does not" pass; "I think yes", "yes/no", "Yesterday" do not)."""
    text = reply.strip().lstrip("\"'*_`([ ").lower()
    match = _YES_NO.match(text)
    if not match:
        return None
    other = "no" if match.group(1) == "yes" else "yes"
    if re.search(rf"(?<![a-z]){other}(?![a-z])", text):
        return None
    return match.group(1) == "yes"


def score_math(rollouts: list[Rollout], reference_answer: str | None,
               match: str = "equivalent") -> tuple[list[float], list[str | None]]:
    """(rewards, each rollout's final answer as ``match`` reads it)."""
    answers = [response_answer(r.text, match, r.finish_reason) for r in rollouts]
    rewards = [1.0 if answers_match(reference_answer, a, match) else 0.0 for a in answers]
    return rewards, answers


def math_reference_answer(reference: str, anchor_output: str, reference_answer: str | None,
                          match: str = "equivalent") -> str | None:
    """The reference's side of the math reward: the estimator's answer for "equivalent"; for
    "boxed_exact" the last box of s, else of the anchor's whole output (None without one)."""
    if match != "boxed_exact":
        return reference_answer
    return boxed_exact_form(last_boxed(reference) or last_boxed(anchor_output or ""))


async def judge_criterion(
    judge: ChatFn, question: str, response: str, criterion: str, *,
    rollout_index: int, criterion_index: int, attempts: int,
) -> Verdict:
    """One (rollout, criterion) verdict, retried on unusable replies, then counted as "no"."""
    reply = ""
    for attempt in range(attempts):
        messages = (
            prompts.judge_messages(question, response, criterion)
            if attempt == 0
            else prompts.judge_retry_messages(question, response, criterion, reply)
        )
        reply = await judge(messages)
        satisfied = parse_yes_no(reply)
        if satisfied is not None:
            return Verdict(rollout_index, criterion_index, satisfied, reply)
    return Verdict(rollout_index, criterion_index, False, reply, parsed=False)


async def judge_criterion_logprob(
    judge: ChatFn, question: str, response: str, criterion: str, *,
    rollout_index: int, criterion_index: int,
) -> tuple[Verdict, float] | None:
    """(verdict, P(yes) / (P(yes) + P(no))) from the judge's ``yes_no``; None when the judge
    gives no probabilities (no ``yes_no``, it returned None, or both are 0)."""
    yes_no = getattr(judge, "yes_no", None)
    probs = await yes_no(prompts.judge_messages(question, response, criterion)) if yes_no else None
    if probs is None or sum(probs) <= 0:
        return None
    p_yes, p_no = probs
    raw = f"p_yes={p_yes:.4g} p_no={p_no:.4g}"
    return Verdict(rollout_index, criterion_index, p_yes > p_no, raw), p_yes / (p_yes + p_no)


async def score_open(
    judge: ChatFn, question: str, rollouts: list[Rollout], rubric: list[str], *,
    attempts: int, concurrency: int, verdict: Literal["logprob", "text"] = "logprob", soft: bool = False,
) -> tuple[list[float], list[Verdict]]:
    """(rewards, verdicts in (rollout, criterion) order), judge calls bounded by a semaphore."""
    if not rubric:
        raise ValueError("an open prompt needs a non-empty rubric to be judged")
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int, j: int) -> tuple[Verdict, float]:
        """The verdict and its weight in the reward (normalised P(yes) when soft, else 1 or 0)."""
        async with limit:
            if verdict == "logprob":
                judged = await judge_criterion_logprob(judge, question, rollouts[i].text, rubric[j],
                                                       rollout_index=i, criterion_index=j)
                if judged is not None:
                    return judged[0], (judged[1] if soft else float(judged[0].satisfied))
            text = await judge_criterion(judge, question, rollouts[i].text, rubric[j],
                                         rollout_index=i, criterion_index=j, attempts=attempts)
            return text, float(text.satisfied)

    judged = await asyncio.gather(*(one(i, j) for i in range(len(rollouts)) for j in range(len(rubric))))
    rewards = [sum(w for v, w in judged if v.rollout_index == i) / len(rubric) for i in range(len(rollouts))]
    return rewards, [v for v, _ in judged]


def apply_length_penalty(rewards: list[float], rollouts: list[Rollout], limit_tokens: int) -> list[float]:
    """-1 for every rollout over ``limit_tokens`` tokens; unchanged when the limit is 0 (off)."""
    if limit_tokens <= 0:
        return rewards
    return [-1.0 if len(r.token_ids) > limit_tokens else reward for reward, r in zip(rewards, rollouts)]


async def score_group(referenced: ReferencedGroup, judge: ChatFn | None, config: JudgeConfig,
                      math_match: str = "equivalent") -> ScoredGroup:
    """The ScoredGroup of a referenced group; ``judge`` is only called for open prompts."""
    group = referenced.group
    if group.prompt.task == "math":
        reference = math_reference_answer(referenced.reference, referenced.anchor_output,
                                          referenced.reference_answer, math_match)
        rewards, answers = await off_loop(score_math, group.rollouts, reference, math_match)
        verdicts: list[Verdict] = []
    else:
        if judge is None:
            raise ValueError("open prompts need a judge model")
        rewards, verdicts = await score_open(judge, group.prompt.question, group.rollouts, referenced.rubric,
                                             attempts=config.attempts, concurrency=config.concurrency,
                                             verdict=config.verdict, soft=config.soft)
        answers = []
    rewards = apply_length_penalty(rewards, group.rollouts, config.length_penalty_tokens)
    return ScoredGroup(referenced, rewards, rollout_answers=answers, verdicts=verdicts)
