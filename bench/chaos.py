"""Chaos: does a `catq up` stack answer every prompt exactly once while its processes keep dying?

    python bench/chaos.py                         # 100 prompts; a run without faults, then one with
    python bench/chaos.py --prompts 20 --kills-each 1 --min-gap 3 --max-gap 6     # a quick look
    python bench/chaos.py --policy-replicas 2 --replica-baselines 1    # two policy replicas; also
                                                                       # a fault-free run with one

Two runs of the same stack on this machine, one after the other: the default model as policy and
anchor on catq's engine, every role, the majority estimator, G=4, 24 new tokens, the learner
stepping every 4 groups, and a Redis of the run's own with AOF and ``appendfsync always``
(started here, so it can be killed). Each run submits the same arithmetic prompts through
`catq submit` and waits until every prompt has a result.

  baseline  no faults;
  chaos     meanwhile, every child of `catq up` (the six roles and both engines) is SIGKILLed
            ``--kills-each`` times, in a shuffled order, one kill every ``--min-gap``..``--max-gap``
            seconds; `catq up` restarts them (catq/launcher.py). Halfway through, Redis itself
            is ``kill -9``ed and restarted on the same data (``--no-redis-kill``: not).

A run ends when every prompt is final: trained on or set aside by the learner (zero-variance
groups), or dead-lettered. Printed for each run: prompts answered (scored), learned (trained or
set aside), lost (never final), scored twice
(prompt ids appearing twice on ``scored``), trained twice (prompt ids in two committed learner
steps, from the learner's "trained on" log lines), dead letters, wall time; then the wall-time
ratio chaos/baseline.

``--policy-replicas N`` runs N policy engine replicas (catq's engine; rollout spreads requests
over them, the syncer keeps each on the newest weights: catq/engines/replicas.py), each killed
``--kills-each`` times too. ``--replica-baselines 1`` adds fault-free runs with those replica
counts first, and every fault-free run prints its rollouts/s (prompts × G over wall time), so one
invocation compares 1 and N replicas on the same workload.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catq.bus import Bus  # noqa: E402
from catq.config import load_config  # noqa: E402
from catq.messages import ScoredGroup  # noqa: E402
from catq.results import ResultStore  # noqa: E402

ROLE_TARGETS = ("worker ingest", "worker rollout", "worker anchor", "worker judge", "worker learner",
                "worker syncer")
GROUP_SIZE = 4


def targets(replicas: int) -> tuple[str, ...]:
    return (*ROLE_TARGETS, *(f"engine.policy{i}" for i in range(replicas)), "engine.anchor")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    """A redis-server of the run's own, AOF with fsync on every write, restartable on its data."""

    def __init__(self, directory: Path):
        self.port, self.dir = free_port(), directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=open(self.dir / "redis.log", "a"), stderr=subprocess.STDOUT)
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise SystemExit(f"redis-server did not start: see {self.dir / 'redis.log'}")

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def write_config(directory: Path, run: str, redis_port: int, replicas: int = 1) -> Path:
    """The stack's config; its engines' ports appear as ``port =`` lines, policy replicas first."""
    policies, anchor, ingest = [free_port() for _ in range(replicas)], free_port(), free_port()
    urls = ", ".join(f'"http://127.0.0.1:{p}"' for p in policies)
    launches = "".join(f"""
[[engines.launch]]
name = "policy{i}"
port = {port}
policy = true
""" for i, port in enumerate(policies))
    path = directory / f"{run}.toml"
    path.write_text(f"""
run = "{run}"
redis_url = "redis://127.0.0.1:{redis_port}"
run_dir = "{directory}/runs/{{run}}"

[engines]
policy_urls = [{urls}]
anchor_url = "http://127.0.0.1:{anchor}"
judge_url = "http://127.0.0.1:{anchor}"
{launches}
[[engines.launch]]
name = "anchor"
port = {anchor}

[bus]
claim_idle_ms = 5000

[worker]
grace_period_s = 5
heartbeat_s = 1

[ingest]
port = {ingest}

[rollout]
group_size = {GROUP_SIZE}

[rollout.math]
temperature = 1.0
max_new_tokens = 24

[anchor]
estimator = "majority"

[learner]
lr = 1e-5
batch_groups = 4
batch_timeout_s = 10
micro_batch_rollouts = 8
checkpoint_every = 2
publish_every = 2

[supervise]
backoff_initial_s = 0.5
backoff_max_s = 8
""")
    return path


def prompts_file(directory: Path, count: int) -> Path:
    rng = random.Random(0)
    path = directory / "prompts.jsonl"
    with path.open("w") as out:
        for _ in range(count):
            a, b = rng.randrange(1, 10), rng.randrange(1, 10)
            out.write(json.dumps({"text": f"What is {a} + {b}?", "task": "math"}) + "\n")
    return path


def catq(config: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "catq", *args, "--config", str(config)],
                          capture_output=True, text=True, check=True, cwd=ROOT).stdout


def children(parent: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except (OSError, ValueError, IndexError):
                pass
    return found


def find_target(parent: int, target: str, config: Path) -> int | None:
    if target.startswith("engine."):
        ports = [line.split("=")[1].strip() for line in config.read_text().splitlines() if line.startswith("port =")]
        replicas = config.read_text().count("policy = true")
        index = replicas if target == "engine.anchor" else int(target.removeprefix("engine.policy"))
        needle = f"--port {ports[index]}"
        return next((pid for pid, cmd in children(parent).items() if "catq engine" in cmd and needle in cmd), None)
    return next((pid for pid, cmd in children(parent).items() if target in cmd), None)


def run_once(directory: Path, run: str, prompts: Path, count: int, chaos: dict | None, replicas: int = 1) -> dict:
    redis = Redis(directory / f"{run}-redis")
    redis.start()
    config = write_config(directory, run, redis.port, replicas)
    log = directory / f"{run}.log"
    up = subprocess.Popen([sys.executable, "-m", "catq", "up", "--config", str(config)], cwd=ROOT,
                          stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        while "is up" not in log.read_text():
            if up.poll() is not None:
                raise SystemExit(f"catq up exited: {log.read_text()[-2000:]}")
            time.sleep(1)
        started = time.monotonic()
        ids = catq(config, "submit", "--file", str(prompts)).split()
        kills = collections.Counter()
        plan = [t for t in targets(replicas) for _ in range(chaos["kills_each"])] if chaos else []
        random.Random(1).shuffle(plan)
        if chaos and chaos["kill_redis"]:
            plan.insert(len(plan) // 2, "redis")
        next_kill = time.monotonic() + (chaos["rng"].uniform(chaos["min_gap"], chaos["max_gap"]) if chaos else 0)
        while True:
            if up.poll() is not None:
                raise SystemExit(f"catq up exited during the run: {log.read_text()[-3000:]}")
            answered, learned, dead = results(config, ids)
            if learned + dead >= len(ids) and not plan:
                break
            if plan and time.monotonic() >= next_kill:
                if kill(plan[0], up.pid, config, redis):
                    kills[plan.pop(0)] += 1
                next_kill = time.monotonic() + chaos["rng"].uniform(chaos["min_gap"], chaos["max_gap"])
            time.sleep(1)
        wall = time.monotonic() - started
        scored = scored_ids(config)
        twice = sum(n > 1 for n in collections.Counter(scored).values())
        return {"answered": answered, "learned": learned, "dead": dead, "lost": len(ids) - learned - dead,
                "twice": twice,
                "trained_twice": trained_twice(log), "wall_s": wall, "kills": dict(kills),
                "restarts": log.read_text().count(" restarted (restart ")}
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=300)
        redis.stop()


def kill(target: str, parent: int, config: Path, redis: Redis) -> bool:
    """SIGKILL one target; Redis is restarted on its data after a moment of absence."""
    if target == "redis":
        redis.kill9()
        time.sleep(2.0)
        redis.start()
        return True
    pid = find_target(parent, target, config)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def trained_twice(log: Path) -> int:
    """Prompt ids that appear in two committed learner steps ("trained on" log lines)."""
    seen = collections.Counter()
    for line in log.read_text().splitlines():
        if '"trained on"' in line:
            try:
                seen.update(json.loads(line.split("] ", 1)[1])["prompt_ids"])
            except (IndexError, ValueError, KeyError):
                continue
    return sum(n > 1 for n in seen.values())


def results(config: Path, ids: list[str]) -> tuple[int, int, int]:
    """(answered, learned, dead-lettered) among ``ids``, from the run's result store."""
    async def read() -> list:
        settings = load_config(config)
        bus = Bus(settings.redis_url, settings.run, settings.bus)
        try:
            store = ResultStore(bus, settings.bus.result_ttl_s)
            return [((await store.get(i)) or {}).get("status") for i in ids]
        finally:
            await bus.close()

    statuses = asyncio.run(read())
    learned = sum(s in ("trained", "set_aside") for s in statuses)
    return learned + sum(s == "scored" for s in statuses), learned, sum(s == "dead" for s in statuses)


def scored_ids(config: Path) -> list[str]:
    """The prompt id of every entry on ``scored`` (a prompt scored twice appears twice)."""
    async def read() -> list[str]:
        settings = load_config(config)
        bus = Bus(settings.redis_url, settings.run, settings.bus)
        try:
            entries = await bus.read_all("scored", ScoredGroup, count=100_000)
        finally:
            await bus.close()
        return [message.group.prompt.prompt_id for _, message in entries]

    return asyncio.run(read())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--kills-each", type=int, default=4)
    parser.add_argument("--min-gap", type=float, default=4.0)
    parser.add_argument("--max-gap", type=float, default=12.0)
    parser.add_argument("--no-redis-kill", dest="kill_redis", action="store_false",
                        help="do not kill -9 Redis halfway through the chaos run")
    parser.add_argument("--out", help="keep logs and run dirs here (default: a temp dir)")
    parser.add_argument("--policy-replicas", type=int, default=1, help="policy engine replicas")
    parser.add_argument("--replica-baselines", type=int, nargs="*", default=[],
                        help="also run fault-free with these replica counts first")
    parser.add_argument("--no-chaos", dest="chaos", action="store_false", help="only the fault-free run(s)")
    args = parser.parse_args()
    directory = Path(args.out or tempfile.mkdtemp(prefix="catq-chaos-"))
    directory.mkdir(parents=True, exist_ok=True)
    prompts = prompts_file(directory, args.prompts)
    stamp = int(time.time())
    chaos = {"kills_each": args.kills_each, "min_gap": args.min_gap, "max_gap": args.max_gap,
             "rng": random.Random(2), "kill_redis": args.kill_redis}
    runs = [(f"baseline x{n}", None, n) for n in args.replica_baselines if n != args.policy_replicas]
    runs.append((f"baseline x{args.policy_replicas}", None, args.policy_replicas))
    if args.chaos:
        runs.append((f"chaos x{args.policy_replicas}", chaos, args.policy_replicas))
    figures = {}
    for name, faults, replicas in runs:
        run = f"chaos-{name.replace(' ', '-')}-{stamp}"
        figures[name] = f = run_once(directory, run, prompts, args.prompts, faults, replicas)
        rate = "" if faults else f", {args.prompts * GROUP_SIZE / f['wall_s']:.2f} rollouts/s"
        print(f"{name:12s} answered {f['answered']}/{args.prompts}, learned {f['learned']}, lost {f['lost']}, "
              f"scored twice {f['twice']}, trained twice {f['trained_twice']}, dead {f['dead']}, "
              f"wall {f['wall_s']:.0f}s{rate}, kills {sum(f['kills'].values())} {f['kills']}, "
              f"restarts {f['restarts']}", flush=True)
    base = figures[f"baseline x{args.policy_replicas}"]["wall_s"]
    if args.chaos:
        print(f"wall-time ratio chaos/baseline: {figures[f'chaos x{args.policy_replicas}']['wall_s'] / base:.2f}")
    if len(figures) > 1 and "baseline x1" in figures and args.policy_replicas != 1:
        print(f"ratio rollouts/s x{args.policy_replicas}/x1: {figures['baseline x1']['wall_s'] / base:.2f}")
    print(f"logs in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
