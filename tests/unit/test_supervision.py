"""Supervision rules of `catq up` and the liveness/stall read-outs, as pure logic."""

from __future__ import annotations

from catq.bus import GroupStats, StreamStats
from catq.children import Child, restart_delay
from catq.config import SuperviseConfig
from catq.ops.health import RoleHealth, StallWatch, starved, waiting_work
from catq.ops.status import render_status

POLICY = SuperviseConfig(backoff_initial_s=1, backoff_factor=2, backoff_max_s=5, healthy_after_s=60,
                         start_window_s=10, crash_loop_starts=3)


def test_backoff_doubles_to_its_cap_and_restarts_a_long_runner_however_often_it_dies():
    child = Child("anchor.0", [], {})
    assert [restart_delay(child, 30, POLICY) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert restart_delay(child, 61, POLICY) == 1  # healthy long enough: backoff starts over
    for _ in range(50):
        assert restart_delay(child, 11, POLICY) is not None  # crashes after a run are no loop


def test_failed_starts_in_a_row_are_a_crash_loop_and_a_longer_run_resets_the_count():
    child = Child("ingest.0", [], {})
    assert restart_delay(child, 0.5, POLICY) is not None
    assert restart_delay(child, 0.5, POLICY) is not None
    assert restart_delay(child, 15, POLICY) is not None  # ran past the start window
    assert restart_delay(child, 0.5, POLICY) is not None
    assert restart_delay(child, 0.5, POLICY) is not None
    assert restart_delay(child, 0.5, POLICY) is None


def stats(groups_lag=0, groups_pending=0, delivered="0-0", with_group=True, prompts_len=0):
    groups = [GroupStats("anchor", pending=groups_pending, lag=groups_lag, last_delivered_id=delivered)
              ] if with_group else []
    return {"prompts": StreamStats(prompts_len), "groups": StreamStats(9, groups),
            "references": StreamStats(0), "scored": StreamStats(0), "dead": StreamStats(0)}


def health(**live):
    return [RoleHealth(role, 1, [f"{role}-w"] * live.get(role, 1), 1.0, 0)
            for role in ("ingest", "rollout", "anchor", "judge", "learner", "syncer")]


def test_waiting_work_counts_lag_and_pending_or_the_whole_stream_before_a_group_exists():
    assert waiting_work(stats(groups_lag=3, groups_pending=2))["groups"][0] == 5
    assert waiting_work(stats(with_group=False))["groups"] == (9, None)


def test_a_stage_with_work_and_no_live_consumer_is_starved_and_named():
    assert starved(stats(groups_lag=13), health(anchor=0)) == ["groups: 13 waiting, no live anchor"]
    assert starved(stats(groups_lag=13), health()) == []
    assert starved(stats(), health(anchor=0)) == []  # nothing waiting: not starved


def test_stall_watch_reports_each_stall_once_and_again_after_it_cleared():
    watch = StallWatch(stall_after_s=30)
    busy = stats(groups_lag=4, delivered="5-0")
    assert watch.check(busy, health(), now=0) == []
    assert watch.check(busy, health(), now=20) == []
    [line] = watch.check(busy, health(), now=31)
    assert line.startswith("groups: 4 waiting, no progress by anchor")
    assert watch.check(busy, health(), now=40) == []  # said once
    moved = stats(groups_lag=3, delivered="6-0")
    assert watch.check(moved, health(), now=41) == []
    assert watch.check(moved, health(anchor=0), now=42) == ["groups: 3 waiting, no live anchor"]


def test_status_shows_each_role_alive_expected_restarts_and_starved_stages():
    roles = health(anchor=0)
    roles[2].restarts = 4
    text = render_status("r", stats(groups_lag=2), roles)
    assert "anchor   0/1 alive, newest heartbeat 1.0s ago, restarts 4  DOWN" in text
    assert "STARVED groups: 2 waiting, no live anchor" in text
