"""`catq submit/tail/status/health/worker` against a real Redis."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from catq.bus import run_key
import redis as sync_redis

from catq.cli import main
from catq.messages import ChatMessage, Prompt, Rollout, RolloutGroup, decode, encode
from catq.ops.tail import json_line
from catq.ops.readable import entry_block

from .procs import ROOT, free_port, start_bus_worker, stop_process


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def prompts_in(redis_url: str, run: str) -> list[Prompt]:
    client = sync_redis.Redis.from_url(redis_url)
    return [decode(f[b"message"]) for _, f in client.xrange(run_key(run, "prompts"))]


def test_submit_tail_status(capsys, redis_url, run_name):
    common = ["--run", run_name, "--redis-url", redis_url]
    code, out, _ = cli(capsys, "submit", "What is 6*7?", *common)
    assert code == 0
    (pid,) = out.split()
    assert [p.prompt_id for p in prompts_in(redis_url, run_name)] == [pid]
    code, out, _ = cli(capsys, "tail", "prompts", "--json", *common)
    line = json.loads(out.strip())
    assert code == 0 and line["type"] == "Prompt" and line["prompt_id"] == pid
    code, out, _ = cli(capsys, "status", *common)
    assert code == 0 and "prompts     length 1" in out and "dead letters: 0" in out
    assert "  redis memory: " in out.splitlines()[-1]  # used against maxmemory (this Redis's own)


def test_submit_file_and_bad_input_enqueue_nothing(capsys, redis_url, run_name, tmp_path):
    common = ["--run", run_name, "--redis-url", redis_url]
    assert cli(capsys, "submit", "q", "--task", "poetry", *common)[0] == 2
    code, _, err = cli(capsys, "submit", "   ", *common)
    assert code == 2 and "is empty" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "task": "math"}\n{"text": "", "task": "open"}\n')
    code, _, err = cli(capsys, "submit", "--file", str(bad), *common)
    assert code == 2 and "bad.jsonl:2: text: is empty" in err
    bad.write_text('{"text": "fine"}\n{nope\n')
    code, _, err = cli(capsys, "submit", "--file", str(bad), *common)
    assert code == 2 and "bad.jsonl:2: invalid JSON" in err
    assert prompts_in(redis_url, run_name) == []
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a", "task": "open"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n')
    code, out, _ = cli(capsys, "submit", "--file", str(good), *common)
    assert code == 0 and len(out.split()) == 2
    assert [p.task for p in prompts_in(redis_url, run_name)] == ["open", "math"]


def test_submit_file_keeps_extra_fields_and_sends_no_answers(capsys, redis_url, run_name, tmp_path):
    """A user's own lines (an id, any fields) and a MATH-500 file go in as they are: labels and
    metadata land in the result, the answer and the worked solution go nowhere."""
    from catq.ops.trace import build_trace

    common = ["--run", run_name, "--redis-url", redis_url]
    own = tmp_path / "own.jsonl"
    own.write_text('{"id": "q-1", "text": "What is 2+2?", "source": "mine", "answer": "4"}\n')
    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "Find x if 2x = 6.", "solution": "x = 6/2 = SECRET",
                                   "answer": "3", "subject": "Algebra", "level": 1,
                                   "unique_id": "test/algebra/1.json"}) + "\n")
    code, out, err = cli(capsys, "submit", "--file", str(own), *common)
    assert code == 0, err
    code, out2, err = cli(capsys, "submit", "--file", str(math500), "--format", "math500", *common)
    assert code == 0, err
    ids = out.split() + out2.split()
    prompts = prompts_in(redis_url, run_name)
    assert [p.prompt_id for p in prompts] == ids
    assert prompts[1].question.startswith("Find x if 2x = 6.")
    raw = sync_redis.Redis.from_url(redis_url).xrange(run_key(run_name, "prompts"))
    assert not any(b"SECRET" in f[b"message"] or b"Algebra" in f[b"message"] for _, f in raw)
    client = sync_redis.Redis.from_url(redis_url, decode_responses=True)
    results = [{k: json.loads(v) for k, v in client.hgetall(run_key(run_name, f"result:{i}")).items()} for i in ids]
    assert results[0]["label"] == "q-1" and results[0]["metadata"] == {"id": "q-1", "source": "mine"}
    assert results[1]["label"] == "test/algebra/1.json"
    assert results[1]["metadata"] == {"subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}
    assert build_trace(ids[1], [], {"prompt_id": ids[1], **results[1]})["label"] == "test/algebra/1.json"


def test_submit_wait_prints_scored_result(capsys, redis_url, run_name):
    def score_soon() -> None:
        client = sync_redis.Redis.from_url(redis_url)
        for _ in range(100):
            entries = client.xrange(run_key(run_name, "prompts"))
            if entries:
                pid = decode(entries[0][1][b"message"]).prompt_id
                client.hset(run_key(run_name, f"result:{pid}"), mapping={"status": '"scored"', "cat_answer": '"42"'})
                return
            time.sleep(0.05)

    thread = threading.Thread(target=score_soon)
    thread.start()
    code, out, _ = cli(capsys, "submit", "6*7?", "--wait", "--timeout", "10",
                       "--run", run_name, "--redis-url", redis_url)
    thread.join()
    pid, result = out.strip().split("\n")
    assert code == 0 and json.loads(result) == {**json.loads(result), "prompt_id": pid, "status": "scored",
                                                "cat_answer": "42"}


def test_submit_wait_until_trained_waits_past_scored_for_the_learner(capsys, redis_url, run_name):
    def score_then_train() -> None:
        client = sync_redis.Redis.from_url(redis_url)
        for _ in range(100):
            entries = client.xrange(run_key(run_name, "prompts"))
            if entries:
                key = run_key(run_name, f"result:{decode(entries[0][1][b'message']).prompt_id}")
                client.hset(key, mapping={"status": '"scored"'})
                time.sleep(1.0)  # --wait --until trained must not stop at "scored"
                client.hset(key, mapping={"status": '"trained"', "trained_in_version": "3"})
                return
            time.sleep(0.05)

    thread = threading.Thread(target=score_then_train)
    thread.start()
    code, out, _ = cli(capsys, "submit", "6*7?", "--wait", "--until", "trained", "--timeout", "10",
                       "--run", run_name, "--redis-url", redis_url)
    thread.join()
    result = json.loads(out.strip().split("\n")[1])
    assert code == 0 and (result["status"], result["trained_in_version"]) == ("trained", 3)


def test_submit_wait_times_out_nonzero(capsys, redis_url, run_name):
    code, out, err = cli(capsys, "submit", "q", "--wait", "--timeout", "0.5", "--run", run_name,
                         "--redis-url", redis_url)
    assert code == 1 and "timed out" in err and '"status": "queued"' in out


def test_tail_summarises_token_lists_and_survives_garbage():
    group = RolloutGroup(prompt=Prompt("p", "math", [ChatMessage("user", "q")]), prompt_token_ids=list(range(50)),
                         rollouts=[Rollout("t", list(range(1000)), [-0.123456] * 1000, "stop")], policy_version=1)
    title, rows = entry_block("groups", "1-0", encode(group))
    assert "RolloutGroup" in title and "prompt p" in title
    assert ("answer 0", "[1000 tok, stop] t") in rows and sum(len(v) for _, v in rows) < 500
    line = json.loads(json_line("1-0", encode(group)))
    assert line["rollouts"][0]["token_ids"] == list(range(1000))
    assert json.loads(json_line("2-0", b"junk"))["type"] == "<undecodable>"
    assert entry_block("dead", "2-0", b"junk")[1][0][0] == "error"


def test_unknown_stream_and_unreachable_redis(capsys):
    assert cli(capsys, "tail", "nope")[0] == 2
    code, _, err = cli(capsys, "health", "rollout", "--redis-url", f"redis://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach Redis" in err


def test_health_follows_worker_heartbeat(redis_url, run_name, tmp_path):
    def health() -> int:
        return subprocess.run([sys.executable, "-m", "catq", "health", "echo", "--run", run_name,
                               "--redis-url", redis_url], cwd=ROOT, capture_output=True).returncode

    assert health() == 1
    worker = start_bus_worker(redis_url, run_name, tmp_path / "w.log", "--heartbeat", "0.5")
    try:
        deadline = time.monotonic() + 15
        while health() != 0:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.2)
    finally:
        assert stop_process(worker) == 0
    assert health() == 1  # the heartbeat key is removed on a clean stop (and expires otherwise)


@pytest.mark.slow
def test_worker_ingest_serves_and_stops_on_sigterm(redis_url, run_name, tmp_path):
    port = free_port()
    config = tmp_path / "ingest.toml"
    config.write_text(f"[ingest]\nport = {port}\n")
    proc = subprocess.Popen([sys.executable, "-m", "workers.ingest", "--config", str(config), "--run", run_name,
                             "--redis-url", redis_url], cwd=ROOT, stdout=subprocess.DEVNULL,
                            env={**__import__("os").environ, "CATQ_INGEST_TOKEN": ""})
    try:
        body = None
        deadline = time.monotonic() + 20
        while body is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/prompts", method="POST",
                                                 data=json.dumps({"text": "hi", "task": "open"}).encode())
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 202
                    body = json.loads(response.read())
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, "ingest did not come up"
                time.sleep(0.2)
        assert [p.prompt_id for p in prompts_in(redis_url, run_name)] == body["ids"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        stop_process(proc)
