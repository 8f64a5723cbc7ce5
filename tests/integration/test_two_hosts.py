"""Past one machine, on one machine: Redis and the engines on host A, every role on host B (two
network namespaces joined by a veth pair, tests/helpers/netns.py), and a client on A that
submits through ingest on B. The roles' config names only A's address (and B's for ingest), and
Redis and the engines listen only on A's, so any place where catq still assumes localhost (a
hard-coded 127.0.0.1, a server bound to loopback) makes this test fail.

Needs root (CAP_NET_ADMIN) for ``ip netns``; skipped otherwise. Math prompts, the anchor votes
("majority"); the tiny random model favours digit tokens (:func:`digit_model_dir`) so that
rollouts state different numbers, groups have signal and the learner steps and publishes.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest

from catq.engines.models import tiny_model_dir
from tests.helpers.netns import TwoHosts, namespaces

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REDIS_PORT, POLICY_PORT, ANCHOR_PORT = 6379, 30000, 30001
INGEST_PORT = 8000
ROLES = ("ingest", "rollout", "anchor", "judge", "learner", "syncer")
PROMPTS = ["What is 2 + 3?", "What is 4 * 2?"]
"""Submitted on host B with `catq submit`; one more comes over HTTP from host A to ingest on B."""
TOKEN = "two-hosts-token"
BUDGET_S = 480
"""Every wait is bounded by what is left of this (pytest-timeout's 600 s is the backstop); the
namespaces are removed on the way out whatever happened."""
GROUP_SIZE = 4


def digit_model_dir(tmp_path: Path, scale: float = 5.0) -> Path:
    """The tiny random Llama with the embeddings (tied to the output layer) of "0".."9" scaled
    up: its samples are mostly runs of digits, so a group's final answers differ."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = tmp_path / "digits-llama"
    base = tiny_model_dir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = LlamaForCausalLM.from_pretrained(str(base))
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    with torch.no_grad():
        model.model.embed_tokens.weight[digits] *= scale
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def write_config(tmp_path: Path, run: str, a: str, b: str, model: Path) -> Path:
    path = tmp_path / "two-hosts.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "redis://{a}:{REDIS_PORT}"
run_dir = "{tmp_path}/runs/{{run}}"

[model]
policy = "{model}"
anchor = "{model}"

[engines]
policy_urls = ["http://{a}:{POLICY_PORT}"]
anchor_url = "http://{a}:{ANCHOR_PORT}"
judge_url = "http://{a}:{ANCHOR_PORT}"

[ingest]
host = "{b}"
port = {INGEST_PORT}

[bus]
block_ms = 200
claim_idle_ms = 3000

[worker]
heartbeat_s = 1
grace_period_s = 10

[rollout]
group_size = {GROUP_SIZE}

[rollout.math]
temperature = 1.0
max_new_tokens = 16

[anchor]
estimator = "majority"

[learner]
lr = 1e-3
batch_groups = 1
batch_timeout_s = 5
micro_batch_rollouts = 4
""")
    return path


WAIT_UP = """
import sys, time, urllib.request, redis
a, redis_port, ports, deadline = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), time.monotonic() + 240
client = redis.Redis(host=a, port=redis_port, socket_connect_timeout=2)
todo = ["redis"] + ports
while todo and time.monotonic() < deadline:
    for what in list(todo):
        try:
            if what == "redis":
                client.ping()
            else:
                urllib.request.urlopen(f"http://{a}:{what}/health", timeout=2).close()
            todo.remove(what)
        except Exception:
            pass
    time.sleep(0.5)
sys.exit(f"not up after 240 s: {todo}" if todo else 0)
"""

HTTP_CLIENT = """
import json, sys, time, urllib.error, urllib.request
base, token, action, arg = sys.argv[1:5]
headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
deadline = time.monotonic() + float(sys.argv[5])
while time.monotonic() < deadline:
    try:
        if action == "post":
            request = urllib.request.Request(base + "/v1/prompts", data=arg.encode(), headers=headers)
            with urllib.request.urlopen(request, timeout=10) as reply:
                print(json.loads(reply.read())["ids"][0])
                sys.exit(0)
        request = urllib.request.Request(f"{base}/v1/prompts/{arg}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as reply:
            result = json.loads(reply.read())
        if result.get("status") in ("scored", "trained", "set_aside", "dead"):
            print(json.dumps(result))
            sys.exit(0)
    except (OSError, urllib.error.HTTPError):
        pass
    time.sleep(1)
sys.exit(f"{action} {arg}: no answer from {base} in time")
"""

WAIT_VERSION = """
import json, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + 240
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url + "/model_info", timeout=5) as reply:
            version = json.loads(reply.read()).get("weight_version")
        if version not in (None, "default", "0"):
            print(version)
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit("the policy engine serves no published version after 240 s")
"""


def is_loopback(addr: str) -> bool:
    return addr.startswith("127.")


def test_roles_on_one_host_reach_redis_and_engines_on_another_only_by_address(tmp_path):
    deadline = time.monotonic() + BUDGET_S

    def left(at_most: float) -> float:
        """A wait's bound: ``at_most``, or less so that the whole test stays within BUDGET_S."""
        remaining = deadline - time.monotonic()
        assert remaining > 1, f"over the test's {BUDGET_S} s budget"
        return min(at_most, remaining)

    run = f"test-{uuid.uuid4().hex[:12]}"
    model = digit_model_dir(tmp_path)
    weights = tmp_path / "runs" / run / "weights"
    weights.mkdir(parents=True)
    logs = {name: tmp_path / f"{name}.log" for name in ("redis", "policy", "anchor-engine", *ROLES)}

    def tails() -> str:
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-2500:]}"
                         for name, path in logs.items() if path.exists())

    with TwoHosts() as hosts:
        a, b = hosts.a_addr, hosts.b_addr

        def on(host: str, code: str, *args: str, what: str) -> str:
            try:
                return hosts.python(host, code, *args, timeout_s=left(270), what=what)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{tails()}") from None

        config = write_config(tmp_path, run, a, b, model)
        hosts.start("a", ["redis-server", "--bind", a, "--port", str(REDIS_PORT), "--save", "",
                          "--appendonly", "no", "--protected-mode", "no"], logs["redis"])
        engine = ["engine", "--model", str(model), "--host", a, "--device", "cpu", "--max-batch", "16"]
        hosts.catq("a", [*engine, "--port", str(POLICY_PORT), "--weights-dir", str(weights)], logs["policy"])
        hosts.catq("a", [*engine, "--port", str(ANCHOR_PORT)], logs["anchor-engine"])
        on("b", WAIT_UP, a, str(REDIS_PORT), f"{POLICY_PORT},{ANCHOR_PORT}", what="Redis and engines on A")

        roles = {role: hosts.catq("b", ["worker", role, "--config", str(config)], logs[role],
                                  CATQ_INGEST_TOKEN=TOKEN) for role in ROLES}
        # A client on A posts to ingest on B (retrying until ingest is up, bounded).
        ingest = f"http://{b}:{INGEST_PORT}"
        posted = json.dumps({"text": "What is 6 + 1?", "task": "math"})
        http_id = on("a", HTTP_CLIENT, ingest, TOKEN, "post", posted, "120", what="POST to ingest").strip()
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"text": text, "task": "math"}) + "\n" for text in PROMPTS))
        submitted = hosts.run("b", [sys.executable, "-m", "catq", "submit", "--file", str(prompts), "--wait",
                                    "--until", "scored", "--timeout", "240", "--config", str(config)], left(270))
        assert submitted.returncode == 0, f"{submitted.stdout}\n{submitted.stderr}\n{tails()}"
        lines = submitted.stdout.splitlines()
        ids, results = lines[:len(PROMPTS)], [json.loads(line) for line in lines[len(PROMPTS):]]
        assert sorted(r["prompt_id"] for r in results) == sorted(ids), submitted.stdout
        results.append(json.loads(on("a", HTTP_CLIENT, ingest, TOKEN, "get", http_id, "240", what="GET from ingest")))
        for result in results:  # every prompt scored (the learner may have moved it on since)
            assert result["status"] in ("scored", "trained", "set_aside"), result
            assert len(result["rewards"]) == GROUP_SIZE, result

        # The learner on B publishes on the shared filesystem; the syncer on B brings A's engine to it.
        served = int(on("b", WAIT_VERSION, f"http://{a}:{POLICY_PORT}", what="a published version served"))
        assert served >= 1 and max(int(p.name[1:]) for p in weights.glob("v*")) >= served

        # Operators' commands work from B too.
        for command in (["health", "learner"], ["health", "syncer"], ["status"]):
            done = hosts.run("b", [sys.executable, "-m", "catq", *command, "--config", str(config)], left(60))
            assert done.returncode == 0, f"catq {' '.join(command)}: {done.stdout}\n{done.stderr}"

        # Nothing of the cross-host traffic touches loopback: A listens only on its address, B
        # (every role) holds no socket on 127.x but does hold connections to A's Redis.
        a_sockets, b_sockets = hosts.sockets("a"), hosts.sockets("b")
        listening = {local for state, local, _ in a_sockets if state == "LISTEN"}
        assert {f"{a}:{p}" for p in (REDIS_PORT, POLICY_PORT, ANCHOR_PORT)} <= listening, listening
        assert not [s for s in a_sockets if is_loopback(s[1])], a_sockets
        assert not [s for s in b_sockets if is_loopback(s[1]) or is_loopback(s[2])], b_sockets
        assert any(state == "ESTABLISHED" and remote == f"{a}:{REDIS_PORT}" for state, _, remote in b_sockets)

        for role, proc in roles.items():
            assert proc.poll() is None, f"{role} exited with {proc.returncode}\n{tails()}"
            proc.terminate()
        for role, proc in roles.items():
            assert proc.wait(timeout=60) == 0, f"{role} did not stop cleanly\n{tails()}"
    assert not set(hosts.ns.values()) & set(namespaces()), "namespaces left behind"
