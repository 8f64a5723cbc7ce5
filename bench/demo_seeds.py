"""How far a newcomer can trust `catq demo`: its configuration run with N seeds.

    python bench/demo_seeds.py                      # 5 seeds of configs/demo.toml (~12 min each on 2 cores)
    python bench/demo_seeds.py --seeds 3 --out /tmp/seeds.json
    python bench/demo_seeds.py --smoke --out /tmp/smoke.json   # 2 seeds, shortened (a test runs this)

Each seed is one whole `catq demo` (a process of its own, on free ports, its run under
``--work-dir``) with ``--seed S``: the order its training questions are submitted in and the
learner's seed. The script prints each seed's held-out single-sample gain (final policy minus v0,
paired over the held-out problems) with its 95% interval, then the median and the minimum, and
writes ``{"seeds": [{"seed", "gain", "gain_ci", "steps", "wall_s", ...}], ...}`` to ``--out``
after every seed. It resumes: a seed already in ``--out`` is not run again (``--fresh`` to start
over). ``wall_s`` is the demo's own wall time with its set-up (model, engines) excluded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from catq.evaluation.command import free_port  # noqa: E402

SMOKE_FLAGS = ["--steps", "1", "--held-out", "4", "--train-questions", "8", "--open", "0",
               "--estimators", "majority", "--train-minutes", "8"]
"""A shortened demo: 1 learner step on 8 questions at G=4, 4 held-out problems, no open question."""


def seed_config(base: Path, work: Path, seed: int, *, smoke: bool) -> Path:
    """``base`` on free ports, its run directory in ``work``, the learner seeded with ``seed``."""
    text = base.read_text()
    text = text.replace("30000", str(free_port())).replace("30001", str(free_port()))
    text = text.replace('run_dir = "runs/{run}"', f'run_dir = "{work / "run"}"')
    text = text.replace("[learner]\n", f"[learner]\nseed = {seed}\n", 1)
    text += f"\n[ingest]\nport = {free_port()}\n"  # another stack may hold the default 8000
    if smoke:
        text = text.replace("group_size = 8", "group_size = 4")
    path = work / "demo.toml"
    path.write_text(text)
    return path


def run_seed(base: Path, work_dir: Path, seed: int, flags: list[str], *, smoke: bool) -> dict:
    """One demo run; its figures from ``<run_dir>/demo.json``."""
    work = work_dir / f"seed-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    config = seed_config(base, work, seed, smoke=smoke)
    run = f"demoseeds-{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    with open(work / "demo.log", "w") as log:
        code = subprocess.run([sys.executable, "-m", "catq", "demo", "--config", str(config), "--run", run,
                               "--seed", str(seed), *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    record_path = work / "run" / "demo.json"
    if code != 0 or not record_path.exists():
        raise SystemExit(f"seed {seed}: catq demo exited {code}; see {work / 'demo.log'}")
    record = json.loads(record_path.read_text())
    return {"seed": seed, "gain": record["gain"], "gain_ci": record["gain_ci"], "steps": record["steps"],
            "wall_s": round(record["wall_s"] - record["setup_s"], 1),
            "single_before": record["single_before"], "single_after": record["single_after"],
            "training_s": round(record["training_s"], 1), "measuring_s": round(record["measuring_s"], 1),
            "resubmissions": record["resubmissions"], "retired": record["retired"],
            "stop_reason": record["stop_reason"], "run": run}


def seed_line(entry: dict) -> str:
    low, high = entry["gain_ci"]
    return (f"seed {entry['seed']}: gain {entry['gain']:+.2f} [{low:+.2f}, {high:+.2f}]  "
            f"({entry['single_before']:.2f} -> {entry['single_after']:.2f}), {entry['steps']} steps, "
            f"{entry['wall_s']:.0f} s")


def overall(seeds: list[dict]) -> dict:
    gains = [s["gain"] for s in seeds]
    return {"seeds_done": len(seeds), "median_gain": statistics.median(gains), "min_gain": min(gains)}


def load_done(out: Path, fresh: bool) -> list[dict]:
    if fresh or not out.exists():
        return []
    return json.loads(out.read_text()).get("seeds", [])


def write(out: Path, seeds: list[dict], args, flags: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"seeds": seeds, **(overall(seeds) if seeds else {}), "seeds_asked": args.seeds,
            "config": str(args.config), "demo_flags": flags, "smoke": args.smoke,
            "note": "wall_s excludes set-up; measured on a shared 2-core machine"}
    out.write_text(json.dumps(body, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, help="how many seeds, 0..N-1 (default 5; 2 with --smoke)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.toml")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_seeds.json")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "demo_seeds")
    parser.add_argument("--smoke", action="store_true", help="2 seeds of a shortened demo")
    parser.add_argument("--fresh", action="store_true", help="run every seed again, ignoring --out")
    parser.add_argument("--train-minutes", type=float,
                        help="the demo's training cap (default the demo's; raise it on a busy machine)")
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (2 if args.smoke else 5)
    flags = SMOKE_FLAGS if args.smoke else []
    if args.train_minutes:
        flags = [*flags, "--train-minutes", str(args.train_minutes)]
    seeds = load_done(args.out, args.fresh)
    for entry in seeds:
        print(seed_line(entry) + "  (from an earlier run)", flush=True)
    for seed in range(args.seeds):
        if any(s["seed"] == seed for s in seeds):
            continue
        entry = run_seed(args.config, args.work_dir, seed, flags, smoke=args.smoke)
        seeds.append(entry)
        write(args.out, seeds, args, flags)
        print(seed_line(entry), flush=True)
    summary = overall(seeds)
    print(f"{summary['seeds_done']} seeds: median gain {summary['median_gain']:+.2f}, "
          f"minimum {summary['min_gain']:+.2f}")
    write(args.out, seeds, args, flags)
    return 0


if __name__ == "__main__":
    sys.exit(main())
