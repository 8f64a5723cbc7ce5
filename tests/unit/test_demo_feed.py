"""What `catq demo` submits while it trains (catq.demo_feed.TrainingFeed) and when it stops
(catq.demo.stop_reason): questions come back while they give signal and retire when they stop."""

import pytest

from catq.demo import DemoPlan, Progress, stop_reason
from catq.demo_feed import TrainingFeed

TRAINED = {"status": "trained"}
NO_SIGNAL = {"status": "set_aside", "set_aside": "no signal: every answer got the same reward"}
STALE = {"status": "set_aside", "set_aside": "stale: 3 versions behind the policy"}


def submit_all(feed, batch):
    for number, question in enumerate(batch):
        feed.submitted(question, f"{question.text}-{question.submissions}-{number}")
    return batch


def test_every_question_goes_out_once_then_finished_ones_come_back_while_few_are_in_flight():
    feed = TrainingFeed(["a", "b", "c", "d"], retire_after=2, low_water=3)
    first = submit_all(feed, feed.next_batch())
    assert [q.text for q in first] == ["a", "b", "c", "d"] and feed.next_batch() == []
    feed.observe(first[0], NO_SIGNAL)
    assert feed.next_batch() == []  # 3 still in flight: the learner has work
    feed.observe(first[1], TRAINED)
    again = feed.next_batch()
    assert [q.text for q in again] == ["b"]  # the one that gave signal first
    submit_all(feed, again)
    assert feed.resubmissions == 1 and feed.in_flight() == [first[1], first[2], first[3]]


def test_a_question_retires_after_groups_in_a_row_without_signal_and_training_resets_the_count():
    feed = TrainingFeed(["a"], retire_after=2, low_water=1)
    [q] = submit_all(feed, feed.next_batch())
    feed.observe(q, NO_SIGNAL)
    submit_all(feed, feed.next_batch())
    feed.observe(q, TRAINED)
    submit_all(feed, feed.next_batch())
    feed.observe(q, STALE)  # stale says nothing about the question
    submit_all(feed, feed.next_batch())
    feed.observe(q, NO_SIGNAL)
    assert not feed.exhausted
    submit_all(feed, feed.next_batch())
    feed.observe(q, NO_SIGNAL)
    assert q.retired and feed.next_batch() == [] and feed.exhausted
    assert "nothing can give signal any more" in feed.exhausted_message()
    assert (feed.counts.trained, feed.counts.no_signal, feed.counts.other) == (1, 3, 1)


def test_results_that_are_not_final_change_nothing():
    feed = TrainingFeed(["a"], retire_after=1, low_water=1)
    [q] = submit_all(feed, feed.next_batch())
    for result in ({}, {"status": "rolled_out"}, {"status": "scored"}):
        feed.observe(q, result)
    assert q.prompt_id is not None and feed.next_batch() == [] and not feed.exhausted


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        TrainingFeed(["a"], retire_after=0)


def progress(steps, elapsed_s=100.0, open_done=1, open_total=1):
    return Progress(elapsed_s, steps, 20, steps, 0.5, 0.5, open_done, open_total)


def test_training_stops_at_the_step_target_once_the_open_questions_are_answered():
    plan = DemoPlan(steps=20, train_s=600.0)
    assert stop_reason(plan, progress(19), None) is None
    assert stop_reason(plan, progress(20, open_done=0), None) is None
    assert stop_reason(plan, progress(20), None) == "reached 20 learner steps"
    assert stop_reason(plan, progress(20, elapsed_s=800.0, open_done=0), None) == "reached 20 learner steps"
    assert "time is up" in stop_reason(plan, progress(7, elapsed_s=601.0), None)


def test_training_stops_at_once_when_no_question_can_give_signal():
    feed = TrainingFeed(["a"], retire_after=1, low_water=1)
    [q] = submit_all(feed, feed.next_batch())
    feed.observe(q, NO_SIGNAL)
    assert "nothing can give signal" in stop_reason(DemoPlan(steps=20), progress(2, elapsed_s=5.0, open_done=0), feed)
