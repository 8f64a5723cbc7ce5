"""Soak: does a `catq up` stack hold under sustained overload, and stay flat while it does?

    python bench/soak.py                          # 30 minutes (issue 34's soak)
    python bench/soak.py --minutes 60 --rate 4    # longer, harder
    python bench/soak.py --smoke                  # about a minute, tiny: what the test runs

The stack: `catq up` in-process (:class:`catq.launcher.Stack`, as bench/pipeline.py) on
configs/demo.toml (the default model as policy, anchor and judge, the majority estimator, the
learner on) with short generations (``--group-size``, ``--max-new-tokens``) and admission control
on (``[ingest] max_backlog = --max-backlog``), and what bounds Redis memory scaled to a soak of
minutes (``[bus] result_ttl_s = --result-ttl-s``, 600; ``max_stream_len = --max-stream-len``, 200:
with the defaults, 7 days and 10,000, memory would still be rising when the soak ends). ``--clients`` concurrent aiohttp clients POST one
arithmetic prompt each to ingest (127.0.0.1 only) at ``--rate`` prompts/s in all, meant to be above
what the stack rolls out, for ``--minutes``: at most rate x seconds requests, never more.

Every ``--sample-s`` seconds (10) a sample records: prompts accepted (202) and refused (429, and
any other status apart), the ``prompts`` backlog (through the Bus, as ingest reads it), p50/p95/p99
submit -> referenced latency (of the prompts referenced so far; each accepted prompt's result is
polled through the Bus), each role's and engine's RSS (psutil), Redis's used memory (the whole
server: on a shared Redis other runs count too) and this run's key count, dead letters, and
error lines in the stack's log. Whether memory stayed flat is judged on the samples taken under
load (the drain's are plotted, not judged).

Then it stops submitting, waits (at most ``--drain-s``) until every accepted prompt is answered
(scored by the judge, or past it; dead letters do not count), stops the stack, prints a summary
with the issue's targets (backlog <= max_backlog, every accepted prompt answered, 0 dead letters,
0 errors, each role's RSS and Redis's memory over the last third of the run within 10% of the
middle third) and writes ``soak.json`` (samples + summary) and ``soak.png`` under ``--out``. The
exit status is 0 when the run completed, whether or not the targets held (the summary says).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.learning import write_catq_config  # noqa: E402
from bench.pipeline import arithmetic_prompts, drop_checkpoints  # noqa: E402
from catq.bus import Bus  # noqa: E402
from catq.config import Config, load_config  # noqa: E402
from catq.evaluation.command import free_port  # noqa: E402
from catq.children import Child  # noqa: E402
from catq.launcher import Stack  # noqa: E402
from catq.results import ResultStore, Status, reached  # noqa: E402
from catq.topology import DEAD, PROMPTS  # noqa: E402

HOST = "127.0.0.1"
POLL_S = 1.0
"""How often accepted prompts' results are read: the latency's resolution."""
FLAT_TOLERANCE = 0.10
ERROR_MARKS = ('"level": "error"', '"level": "critical"', "Traceback (most recent call last)")
"""What counts as an error line in the stack's log: error-level JSON lines of the workers, and a
traceback a child printed outside its logger."""


# ---- the stack ----------------------------------------------------------------------------------


def write_soak_config(out: Path, args) -> Path:
    """configs/demo.toml (bench/learning.py's writer: run dir, G, free engine ports) with short
    generations and admission control on a free ingest port."""
    out.mkdir(parents=True, exist_ok=True)
    path = write_catq_config(out, args.group_size, (free_port(), free_port()))
    text = path.read_text()
    old = "max_new_tokens = 48"
    if old not in text:
        raise SystemExit(f"configs/demo.toml changed: {old!r} not found; update bench/soak.py")
    text = text.replace(old, f"max_new_tokens = {args.max_new_tokens}", 1)
    # max_backlog must admit a full batch: the clients post one prompt at a time anyway
    text += (f"\n[ingest]\nhost = \"{HOST}\"\nport = {free_port()}\nmax_backlog = {args.max_backlog}\n"
             f"max_batch = {min(args.max_backlog, 256)}\n")
    # What bounds Redis memory (results expire, streams are trimmed), scaled so that a soak of
    # minutes reaches the steady state a run with the defaults (7 days, 10,000) reaches later.
    text += f"\n[bus]\nresult_ttl_s = {args.result_ttl_s}\nmax_stream_len = {args.max_stream_len}\n"
    path.write_text(text)
    return path


def children(stack: Stack) -> dict[str, Child]:
    """Every role and engine child of the stack, by name."""
    named = {child.name: child for children in stack.roles.values() for child in children}
    named.update({child.name: child for child in stack.engines})
    return named


def rss_bytes(pid: int) -> int | None:
    """Resident memory of ``pid`` (psutil if installed, else /proc); None once it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    gone = (OSError, ValueError, *((psutil.Error,) if psutil else ()))
    try:
        if psutil:
            return psutil.Process(pid).memory_info().rss
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except gone:  # exited between listing and reading: no sample
        return None
    return None


def role_rss(stack: Stack) -> dict[str, int]:
    out = {}
    for name, child in children(stack).items():
        if child.running:
            rss = rss_bytes(child.process.pid)
            if rss is not None:
                out[name] = rss
    return out


def error_lines(log_path: Path) -> int:
    """Error lines (:data:`ERROR_MARKS`) in the stack's log."""
    with open(log_path, errors="replace") as log:
        return sum(any(mark in line for mark in ERROR_MARKS) for line in log)


# ---- load ---------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the clients sent and what became of it."""

    accepted: dict[str, float] = field(default_factory=dict)
    """prompt id -> monotonic time of its 202."""
    refused: int = 0
    other: dict[int, int] = field(default_factory=dict)
    """Answers neither 202 nor 429, by status (0: no answer at all)."""
    referenced_s: dict[str, float] = field(default_factory=dict)
    """prompt id -> seconds from its 202 until its result said referenced (or later)."""
    answered: set[str] = field(default_factory=set)
    dead: set[str] = field(default_factory=set)
    sent: int = 0


async def client(session: aiohttp.ClientSession, url: str, traffic: Traffic, texts, per_s: float,
                 deadline: float, budget: itertools.count, limit: int) -> None:
    """One client: a POST every 1/per_s seconds until the deadline or the shared request budget is spent."""
    next_at = time.monotonic()
    while time.monotonic() < deadline and next(budget) < limit:
        traffic.sent += 1
        try:
            async with session.post(url, json={"text": next(texts), "task": "math"}) as response:
                status = response.status
                body = await response.json(content_type=None) if status == 202 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            status, body = 0, None
        if status == 202:
            traffic.accepted[body["ids"][0]] = time.monotonic()
        elif status == 429:
            traffic.refused += 1
        else:
            traffic.other[status] = traffic.other.get(status, 0) + 1
        next_at += 1.0 / per_s
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def drive(config: Config, args, traffic: Traffic, seconds: float) -> None:
    """``args.clients`` clients at ``args.rate`` prompts/s in all, for ``seconds``."""
    url = f"http://{HOST}:{config.ingest.port}/v1/prompts"
    texts = itertools.cycle(arithmetic_prompts(997))
    budget, limit = itertools.count(), int(args.rate * seconds) + args.clients
    deadline = time.monotonic() + seconds
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(session, url, traffic, texts, args.rate / args.clients, deadline, budget, limit)
                               for _ in range(args.clients)))


async def follow(store: ResultStore, traffic: Traffic) -> None:
    """Read the result of every accepted prompt not yet answered; note when each is referenced."""
    for prompt_id, submitted in list(traffic.accepted.items()):
        if prompt_id in traffic.answered or prompt_id in traffic.dead:
            continue
        status = ((await store.get(prompt_id)) or {}).get("status")
        if status == Status.DEAD:
            traffic.dead.add(prompt_id)
            continue
        if prompt_id not in traffic.referenced_s and reached(status, Status.REFERENCED):
            traffic.referenced_s[prompt_id] = time.monotonic() - submitted
        if reached(status, Status.SCORED):
            traffic.answered.add(prompt_id)


async def follow_forever(store: ResultStore, traffic: Traffic) -> None:
    while True:
        await follow(store, traffic)
        await asyncio.sleep(POLL_S)


# ---- samples ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``th percentile, in seconds to 0.1 s (the polling resolution is 1 s)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)


async def sample(bus: Bus, stack: Stack, traffic: Traffic, args, started: float, log_path: Path) -> dict:
    latencies = list(traffic.referenced_s.values())
    memory = await bus.memory()
    dead = (await bus.stream_stats((DEAD.name,)))[DEAD.name].length
    return {
        "t_s": round(time.monotonic() - started, 1),
        "sent": traffic.sent,
        "accepted": len(traffic.accepted),
        "refused_429": traffic.refused,
        "other_status": sum(traffic.other.values()),
        "backlog": await bus.backlog(PROMPTS.name, PROMPTS.consumer, cap=args.max_backlog + 1),
        "referenced": len(latencies),
        "answered": len(traffic.answered),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "rss_bytes": role_rss(stack),
        "redis_used_bytes": memory.used_bytes if memory else None,
        "redis_keys": await bus.key_count(),
        "dead_letters": dead,
        "error_lines": error_lines(log_path),
    }


async def sample_forever(bus, stack, traffic, args, started, log_path, samples: list[dict]) -> None:
    while True:
        await asyncio.sleep(args.sample_s)
        samples.append(await sample(bus, stack, traffic, args, started, log_path))
        s = samples[-1]
        print(f"[{s['t_s']:6.0f}s] accepted {s['accepted']}, refused {s['refused_429']}, backlog {s['backlog']}, "
              f"answered {s['answered']}, p99 {s['latency_p99_s']} s, redis keys {s['redis_keys']}, "
              f"dead {s['dead_letters']}, errors {s['error_lines']}", flush=True)


# ---- the run ------------------------------------------------------------------------------------


async def soak(args) -> dict:
    out = Path(args.out)
    config_path = write_soak_config(out, args)
    config = load_config(config_path, run=f"bench-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    log_path = out / "stack.log"
    traffic, samples = Traffic(), []
    print(f"soak: starting the stack (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        async with Stack(config, str(config_path), out=log) as stack:
            bus = Bus(config.redis_url, config.run, config.bus)
            store = ResultStore(bus, config.bus.result_ttl_s)
            started = time.monotonic()
            print(f"soak: stack is up; {args.clients} clients at {args.rate:g} prompts/s for "
                  f"{args.minutes:g} min, max_backlog {args.max_backlog}", flush=True)
            background = [asyncio.create_task(follow_forever(store, traffic)),
                          asyncio.create_task(sample_forever(bus, stack, traffic, args, started, log_path, samples))]
            try:
                await drive(config, args, traffic, args.minutes * 60)
                load_s = time.monotonic() - started
                print(f"soak: load stopped after {load_s:.0f}s; waiting up to {args.drain_s:.0f}s for "
                      f"{len(traffic.accepted) - len(traffic.answered)} accepted prompts", flush=True)
                drain_deadline = time.monotonic() + args.drain_s
                while (len(traffic.answered) + len(traffic.dead) < len(traffic.accepted)
                       and time.monotonic() < drain_deadline):
                    await asyncio.sleep(POLL_S)
                await follow(store, traffic)
                samples.append(await sample(bus, stack, traffic, args, started, log_path))
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                await bus.close()
    drop_checkpoints(config)
    return {"config": vars(args), "run": config.run, "load_s": load_s, "samples": samples,
            "summary": summarize(samples, traffic, args, load_s)}


def thirds(samples: list[dict], value) -> tuple[float, float] | None:
    """Mean of ``value`` over the middle and the last third of the samples (None: too few, or missing)."""
    n = len(samples) // 3
    if n == 0:
        return None
    middle = [value(s) for s in samples[n:2 * n]]
    last = [value(s) for s in samples[len(samples) - n:]]
    if None in middle or None in last:
        return None
    return statistics.fmean(middle), statistics.fmean(last)


def flat(pair: tuple[float, float] | None) -> bool | None:
    if pair is None:
        return None
    middle, last = pair
    return abs(last - middle) <= FLAT_TOLERANCE * middle


def summarize(samples: list[dict], traffic: Traffic, args, load_s: float) -> dict:
    last = samples[-1]
    latencies = list(traffic.referenced_s.values())
    roles = sorted(set().union(*(s["rss_bytes"] for s in samples)))
    # flat or not is a question about the load: the drain's samples (load stopped) are left out
    loaded = [s for s in samples if s["t_s"] <= load_s]
    rss_flat = {role: flat(thirds(loaded, lambda s, r=role: s["rss_bytes"].get(r))) for role in roles}
    redis_flat = flat(thirds(loaded, lambda s: s["redis_used_bytes"]))
    throughput = len(traffic.answered) / load_s if load_s else 0.0
    targets = {
        "backlog_within_max": max(s["backlog"] for s in samples) <= args.max_backlog,
        "every_accepted_answered": len(traffic.answered) == len(traffic.accepted),
        "no_dead_letters": last["dead_letters"] == 0,
        "no_errors": last["error_lines"] == 0,
        "rss_flat": all(rss_flat.values()) if None not in rss_flat.values() and rss_flat else None,
        "redis_memory_flat": redis_flat,
    }
    return {
        "sent": traffic.sent, "accepted": len(traffic.accepted), "refused_429": traffic.refused,
        "other_status": {str(k): v for k, v in traffic.other.items()},
        "answered": len(traffic.answered), "dead": len(traffic.dead),
        "max_backlog_seen": max(s["backlog"] for s in samples), "max_backlog": args.max_backlog,
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "latency_p99_s": percentile(latencies, 99),
        "answered_per_s": throughput,
        "latency_bound_s": args.max_backlog / throughput if throughput else None,
        "rss_flat": rss_flat, "redis_keys_last": last["redis_keys"],
        "dead_letters": last["dead_letters"], "error_lines": last["error_lines"],
        "targets": targets,
    }


def print_summary(summary: dict) -> None:
    s = summary
    print(f"sent {s['sent']}: accepted {s['accepted']}, refused 429 {s['refused_429']}, other {s['other_status']}")
    print(f"answered {s['answered']}/{s['accepted']} ({s['answered_per_s']:.3f}/s), dead {s['dead']}, "
          f"dead letters {s['dead_letters']}, error lines {s['error_lines']}")
    bound = f"{s['latency_bound_s']:.1f}" if s["latency_bound_s"] else "n/a"
    print(f"backlog max {s['max_backlog_seen']} (limit {s['max_backlog']}); submit->referenced latency "
          f"p50 {s['latency_p50_s']} p95 {s['latency_p95_s']} p99 {s['latency_p99_s']} s "
          f"(max_backlog / throughput: {bound} s)")
    for name, held in s["targets"].items():
        print(f"target {name}: {'held' if held else 'unknown (too few samples)' if held is None else 'MISSED'}")


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 2, figsize=(12, 10), sharex=True)

    def mib(value: int | None) -> float:
        return value / 2**20 if value is not None else float("nan")

    roles = sorted(set().union(*(s["rss_bytes"] for s in samples)))
    panels = [
        (axes[0][0], "prompts", {"accepted": lambda s: s["accepted"], "refused (429)": lambda s: s["refused_429"],
                                 "answered": lambda s: s["answered"]}),
        (axes[0][1], "backlog", {"backlog": lambda s: s["backlog"]}),
        (axes[1][0], "submit -> referenced (s)",
         {f"p{q}": lambda s, q=q: s[f"latency_p{q}_s"] for q in (50, 95, 99)}),
        (axes[1][1], "RSS (MiB)", {role: lambda s, r=role: mib(s["rss_bytes"].get(r)) for role in roles}),
        (axes[2][0], "redis", {"used MiB": lambda s: mib(s["redis_used_bytes"]),
                               "run keys": lambda s: s["redis_keys"]}),
        (axes[2][1], "problems", {"dead letters": lambda s: s["dead_letters"],
                                  "error lines": lambda s: s["error_lines"]}),
    ]
    for ax, title, lines in panels:
        for label, value in lines.items():
            ax.plot(t, [value(s) for s in samples], label=label)
        ax.set_title(title)
        ax.legend(fontsize=6)
    for ax in axes[-1]:
        ax.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=float, default=2.0,
                        help="prompts/s from all clients together (above what the stack rolls out)")
    parser.add_argument("--max-backlog", type=int, default=64, help="[ingest] max_backlog")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--result-ttl-s", type=int, default=600,
                        help="[bus] result_ttl_s: above the longest wait in the backlog, short enough "
                             "that results expire within the soak (the default 7 days would not)")
    parser.add_argument("--max-stream-len", type=int, default=200,
                        help="[bus] max_stream_len: reached within the soak (the default 10,000 would not)")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--drain-s", type=float, default=900.0,
                        help="after the load, wait at most this long for accepted prompts to be answered")
    parser.add_argument("--smoke", action="store_true",
                        help="--minutes 1 --clients 2 --rate 2 --max-backlog 4 --group-size 2 "
                             "--max-new-tokens 8 --sample-s 5 --drain-s 240")
    parser.add_argument("--out", default=f"/tmp/catq-bench-soak-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.clients, args.rate, args.max_backlog = 1.0, 2, 2.0, 4
        args.group_size, args.max_new_tokens, args.sample_s, args.drain_s = 2, 8, 5.0, 240.0
    if args.rate <= 0 or args.clients < 1 or args.max_backlog < 1:
        parser.error("--rate, --clients and --max-backlog must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(soak(args))
    out = Path(args.out)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    plot(result["samples"], out / "soak.png")
    print_summary(result["summary"])
    print(f"samples and summary: {out / 'soak.json'}; plot: {out / 'soak.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
