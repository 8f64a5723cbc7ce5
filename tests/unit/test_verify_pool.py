"""Answer checking runs in a helper process: a call that overruns is killed, the next works."""

import asyncio
import os
import time

import pytest

from catq.runtime import is_transient
from catq.teacher.estimators import majority_vote
from catq.teacher.verify_pool import VerifyTimeout, off_loop


async def test_checks_run_in_another_process_and_give_the_same_answer():
    assert await off_loop(os.getpid) != os.getpid()
    assert await off_loop(majority_vote, ["0.5", "3", "\\frac{1}{2}"]) == majority_vote(["0.5", "3", "\\frac{1}{2}"])


async def test_an_overrunning_check_is_killed_counted_as_a_failure_and_the_next_one_works():
    started = time.monotonic()
    with pytest.raises(VerifyTimeout, match="ran past 0.5 s") as caught:
        await off_loop(time.sleep, 30, timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert not is_transient(caught.value)  # the message's fault: counted toward max_attempts
    assert await off_loop(pow, 2, 10) == 1024


async def test_the_event_loop_keeps_running_during_a_long_check():
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await off_loop(time.sleep, 0.5)
    ticker.cancel()
    assert ticks >= 5
