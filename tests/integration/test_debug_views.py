"""`catq trace`, `catq tail` and `catq top` against a real Redis, with messages moved through the
streams as workers move them (Bus.read + Bus.complete), no engine. The same commands on a real
run with the default model: tests/integration/test_debugging.py."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys

import pytest

from catq.bus import Output
from catq.cli import main
from catq.messages import (
    ChatMessage,
    DeadLetter,
    Prompt,
    ReferencedGroup,
    Rollout,
    RolloutGroup,
    ScoredGroup,
    Verdict,
    WeightsPublished,
    encode,
    from_json,
    new_prompt_id,
)
from catq.results import ResultStore

from .procs import ROOT

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
LONG = "Let me think step by step about this carefully. " * 20


def math_chain(prompt_id: str) -> tuple[Prompt, RolloutGroup, ReferencedGroup, ScoredGroup]:
    prompt = Prompt(prompt_id, "math", [ChatMessage("user", "What is 12 + 7? " + LONG)])
    rollouts = [Rollout(f"{LONG} so \\boxed{{{a}}}", list(range(300)), [-0.5] * 300, "stop") for a in (19, 19, 18)]
    group = RolloutGroup(prompt, list(range(40)), rollouts, policy_version=2)
    ref = ReferencedGroup(group, "The answer is \\boxed{19}", "synthesis", "raw", reference_answer="19",
                          majority_answer="19")
    scored = ScoredGroup(ref, [1.0, 1.0, 0.0], rollout_answers=["19", "19", "18"])
    return prompt, group, ref, scored


def open_scored() -> ScoredGroup:
    prompt = Prompt(new_prompt_id(), "open", [ChatMessage("user", "Two tips for sleep?")])
    group = RolloutGroup(prompt, [1, 2], [Rollout("Dim lights.", [5, 6], [-0.1, -0.2], "length")], 0)
    ref = ReferencedGroup(group, "Keep a schedule.", "synthesis", "raw", rubric=["Mentions a schedule"])
    return ScoredGroup(ref, [0.0], verdicts=[Verdict(0, 0, False, "no")])


async def move(bus, stream: str, group: str, message_type: type, outputs: list[Output]) -> None:
    """One worker step: read the entry through the group and complete it with ``outputs``."""
    (delivery,) = await bus.read(stream, group, "w1", count=1, message_type=message_type)
    await bus.complete(delivery, group, outputs)


async def run_chain(bus, prompt_id: str) -> ScoredGroup:
    prompt, group, ref, scored = math_chain(prompt_id)
    await bus.publish("prompts", prompt)
    await move(bus, "prompts", "rollout", Prompt, [Output("groups", group)])
    await move(bus, "groups", "anchor", RolloutGroup, [Output("references", ref)])
    await move(bus, "references", "judge", ReferencedGroup, [Output("scored", scored)])
    return scored


async def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`catq ARGV` in a thread (it runs its own event loop), with its captured output."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def test_trace_shows_every_stage_and_learner_verdict(bus, capsys, redis_url, run_name):
    pid = new_prompt_id()
    scored = await run_chain(bus, pid)
    await ResultStore(bus, 3600).update(pid, status="trained", trained_in_version=3, trained_step=5,
                                        task="math", question="What is 12 + 7?")
    common = ["--run", run_name, "--redis-url", redis_url]
    code, out, _ = await cli(capsys, "trace", pid, *common)
    assert code == 0
    for words in ("ingest", "rollout", "anchor", "judge", "learner", "policy", "v2", "→ 19", "→ 18",
                  "1.00 1.00 0.00", "ref answer", "synthesis", "step 5, in policy v3"):
        assert words in out, (words, out)
    code, out, _ = await cli(capsys, "trace", pid, "--json", *common)
    trace = json.loads(out)
    assert [s["stage"] for s in trace["stages"]] == ["ingest", "rollout", "anchor", "judge", "learner"]
    judge = trace["stages"][3]
    assert judge["rewards"] == scored.rewards and judge["latency_s"] >= 0
    assert [a["tokens"] for a in trace["stages"][1]["answers"]] == [300, 300, 300]
    code, out, _ = await cli(capsys, "trace", "--last", "--json", *common)
    assert json.loads(out)["prompt_id"] == pid
    assert (await cli(capsys, "trace", "nope", *common))[0] == 1


async def test_trace_of_a_dead_lettered_prompt_names_the_reason(bus, capsys, redis_url, run_name):
    pid = new_prompt_id()
    prompt, group, _, _ = math_chain(pid)
    await bus.publish("prompts", prompt)
    await move(bus, "prompts", "rollout", Prompt, [Output("groups", group)])
    (delivery,) = await bus.read("groups", "anchor", "w1", count=1, message_type=RolloutGroup)
    await bus.dead_letter(delivery, "anchor", "anchor engine refused: context too long", worker="w1")
    code, out, _ = await cli(capsys, "trace", pid, "--json", "--run", run_name, "--redis-url", redis_url)
    dead = json.loads(out)["stages"][-1]
    assert dead["stage"] == "dead" and dead["from_stream"] == "groups"
    assert dead["error"] == "anchor engine refused: context too long" and dead["attempts"] == 1


async def test_tail_json_round_trips_every_message_type(bus, capsys, redis_url, run_name):
    prompt, group, ref, scored = math_chain(new_prompt_id())
    sent = [("prompts", prompt), ("groups", group), ("references", ref), ("scored", scored),
            ("scored", open_scored()), ("weights", WeightsPublished(3, "/w/v3", 6)),
            ("dead", DeadLetter("groups", "1-0", encode(group), "boom", 3, "w9"))]
    for stream, message in sent:
        await bus.publish(stream, message)
    for stream in dict(sent):
        code, out, _ = await cli(capsys, "tail", stream, "--json", "--run", run_name, "--redis-url", redis_url)
        lines = [json.loads(line) for line in out.splitlines()]
        assert code == 0 and all(line["id"] for line in lines)
        assert [from_json(line) for line in lines] == [m for s, m in sent if s == stream]
    code, out, _ = await cli(capsys, "tail", "dead", "--run", run_name, "--redis-url", redis_url)
    assert "boom" in out and re.search(r"payload +RolloutGroup prompt", out) and "answer 2" in out


async def test_tail_filters_by_prompt_and_since(bus, capsys, redis_url, run_name):
    first, second = new_prompt_id(), new_prompt_id()
    await run_chain(bus, first)
    await run_chain(bus, second)
    common = ["--run", run_name, "--redis-url", redis_url, "--json"]
    code, out, _ = await cli(capsys, "tail", "scored", "--prompt", first, *common)
    assert [json.loads(line)["referenced"]["group"]["prompt"]["prompt_id"] for line in out.splitlines()] == [first]
    code, out, _ = await cli(capsys, "tail", "groups", "--since", "10m", *common)
    assert len(out.splitlines()) == 2
    assert (await cli(capsys, "tail", "groups", "--since", "soon", *common))[0] == 2


def tail_in_pty(width: int, *argv: str) -> str:
    """Run `catq tail` on a pseudo-terminal ``width`` columns wide; its output, escapes removed."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": str(width), "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "catq", "tail", *argv], stdout=secondary, stderr=secondary,
                            stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(primary)
    return ANSI.sub("", b"".join(chunks).decode("utf-8", errors="replace"))


async def test_tail_on_a_terminal_fits_its_width(bus, redis_url, run_name):
    await run_chain(bus, new_prompt_id())
    await bus.publish("scored", open_scored())
    width = 60
    out = tail_in_pty(width, "scored", "--run", run_name, "--redis-url", redis_url)
    lines = out.replace("\r\n", "\n").splitlines()
    assert any("rewards" in line and "1.00 1.00 0.00" in line for line in lines), out
    assert any("criterion 0" in line and "✗" in line for line in lines), out
    assert max(len(line) for line in lines) <= width, out


async def test_top_once_and_role_stats(bus, capsys, redis_url, run_name):
    await run_chain(bus, new_prompt_id())
    for seconds in (0.1, 0.2, 0.3, 0.4):
        await bus.record_handled("judge", "handled", seconds)
    await bus.record_handled("judge", "failed", 1.0)
    counts, samples = await bus.role_stats("judge")
    assert counts == {"handled": 4, "failed": 1} and len(samples) == 5
    code, out, _ = await cli(capsys, "top", "--once", "--run", run_name, "--redis-url", redis_url)
    assert code == 0
    assert "scored" in out and "judge" in out and "dead letters: 0" in out
    assert "redis memory: " in out  # Redis's used memory against maxmemory


@pytest.mark.slow  # starts processes
async def test_top_live_refreshes_and_q_quits(bus, redis_url, run_name):
    await run_chain(bus, new_prompt_id())
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "LINES": "60", "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "catq", "top", "--interval", "0.2", "--run", run_name,
                             "--redis-url", redis_url], stdin=secondary, stdout=secondary, stderr=secondary,
                            env=env, cwd=ROOT)
    os.close(secondary)
    seen = b""
    try:
        while seen.count(b"catq top") < 2:  # the first frame and at least one refresh
            seen += await asyncio.to_thread(os.read, primary, 65536)
        os.write(primary, b"q")
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(primary)
    assert b"references" in seen


@pytest.mark.slow  # starts processes
async def test_tail_follow_prints_new_entries_of_the_prompt_only(bus, redis_url, run_name):
    await run_chain(bus, new_prompt_id())  # before the follow starts: not printed with --count 0
    wanted, other = new_prompt_id(), new_prompt_id()
    proc = subprocess.Popen([sys.executable, "-m", "catq", "tail", "scored", "--follow", "--json", "--count", "0",
                             "--prompt", wanted, "--run", run_name, "--redis-url", redis_url],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        await asyncio.sleep(2.0)  # let it reach its blocking read
        await run_chain(bus, other)
        await run_chain(bus, wanted)
        line = json.loads(await asyncio.to_thread(proc.stdout.readline))
        assert line["referenced"]["group"]["prompt"]["prompt_id"] == wanted
    finally:
        proc.kill()
        proc.wait()
