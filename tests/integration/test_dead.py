"""`catq dead`: dead letters are kept, listed with their reasons, replayed after a fix (processed
once, result reset), and dropped."""

from __future__ import annotations

import subprocess
import sys

import pytest
from structlog.testing import capture_logs

from catq.bus import Bus
from catq.config import BusConfig
from catq.messages import ChatMessage, DeadLetter, Prompt, decode
from catq.results import ResultStore

from .procs import wait_for
from .test_runtime import echoed, workers  # noqa: F401  (workers: a fixture)


def catq(redis_url: str, run: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catq", "dead", *args, "--run", run, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)


def prompt(text: str, pid: str) -> Prompt:
    return Prompt(prompt_id=pid, task="math", messages=[ChatMessage("user", text)])


@pytest.mark.slow  # starts processes
async def test_a_dead_letter_is_listed_replayed_after_the_fix_and_processed_once(
        bus, run_name, redis_url, workers, tmp_path):  # noqa: F811
    broken = tmp_path / "broken"
    broken.touch()
    entry = await bus.publish("prompts", prompt(f"fail-while:{broken}", "p-1"))
    workers(redis_url, run_name, "--claim-idle-ms", "300", "--max-attempts", "1")
    (dead_id, _), = await wait_for(lambda: bus.dead_letters(), timeout=15, what="the dead letter")

    listed = catq(redis_url, run_name, "list")
    assert listed.returncode == 0, listed.stderr
    assert dead_id in listed.stdout and "prompt p-1" in listed.stdout and f"entry {entry}" in listed.stdout
    assert "reason: failed 1 times; last: asked to fail while" in listed.stdout

    broken.unlink()  # the fix
    replayed = catq(redis_url, run_name, "replay", dead_id)
    assert replayed.returncode == 0 and f"{dead_id}: replayed onto prompts" in replayed.stdout
    await wait_for(lambda: echoed(bus), timeout=15, what="the replayed prompt processed")
    assert [text for _, text in await echoed(bus)] == [f"fail-while:{broken}"]
    assert await bus.dead_letters() == []
    result = await ResultStore(bus, 60).get("p-1")
    assert result["status"] == "queued" and result["replayed_from"] == dead_id
    assert result["replayed_error"].startswith("failed 1 times")

    again = catq(redis_url, run_name, "replay", dead_id)
    assert again.returncode == 1 and "no such dead letter" in again.stdout


async def test_dead_is_never_trimmed_and_drop_removes_letters(run_name, redis_url):
    small = Bus(redis_url, run_name, BusConfig(max_stream_len=10), trim_interval_s=0)
    try:
        for i in range(25):
            await small.publish("dead", DeadLetter(stream="prompts", entry_id=f"{i}-0", payload=b"x",
                                                   error="boom", attempts=1))
        assert await small.trim("dead") == 0 and len(await small.dead_letters()) == 25  # not max_stream_len
        first, second = [dead_id for dead_id, _ in (await small.dead_letters())[:2]]
        dropped = catq(redis_url, run_name, "drop", first, second)
        assert dropped.returncode == 0 and "2 dropped" in dropped.stdout
        assert len(await small.dead_letters()) == 23
        assert catq(redis_url, run_name, "drop", "--all").stdout.strip() == "23 dropped"
        assert "undecodable" not in catq(redis_url, run_name, "list").stdout
    finally:
        await small.close()


async def test_dead_letters_past_their_limit_are_dropped_oldest_first_and_loudly(run_name, redis_url, tmp_path):
    bounded = Bus(redis_url, run_name, BusConfig(max_dead_letters=5), trim_interval_s=0)
    try:
        with capture_logs() as logs:
            for i in range(8):
                await bounded.publish("dead", DeadLetter(stream="prompts", entry_id=f"{i}-0", payload=b"x",
                                                         error="boom", attempts=1))
        letters = [decode(raw, expected=DeadLetter) for _, raw in await bounded.dead_letters()]
        assert [letter.entry_id for letter in letters] == ["3-0", "4-0", "5-0", "6-0", "7-0"]
        errors = [e for e in logs if e["log_level"] == "error"]
        assert [e["dropped"] for e in errors] == [1, 1, 1] and errors[0]["limit"] == 5
        assert await bounded.dead_letters_dropped() == 3
        config = tmp_path / "c.toml"
        config.write_text("")
        status = subprocess.run([sys.executable, "-m", "catq", "status", "--config", str(config), "--run", run_name,
                                 "--redis-url", redis_url], capture_output=True, text=True, timeout=60)
        assert "dead letters: 5  (catq tail dead); 3 dropped over [bus] max_dead_letters" in status.stdout
    finally:
        await bounded.close()


def test_replay_without_ids_or_all_is_a_usage_error(redis_url, run_name):
    result = catq(redis_url, run_name, "replay")
    assert result.returncode == 2 and "name dead-letter ids" in result.stderr
