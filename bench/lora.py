"""LoRA vs full fine-tuning in catq: learner memory, step time, publish size and time, and
publish -> serving time, each as a ratio lora/full measured in one run on one machine.

    python bench/lora.py [--model default] [--steps 5] [--groups 2] [--group-size 4]
                         [--prompt-tokens 64] [--completion-tokens 128]
                         [--out bench/results/lora_default.json] [--dir DIR] [--smoke]

For each mode (``full``, then ``lora`` with ``[learner.lora]``'s defaults from catq/config.py):

1. **Learner**, in its own process (so peak memory is per mode): catq's real
   :class:`catq.learner.trainer.Trainer` built from a config as the learner role builds it
   (``Trainer.from_config``; CPU; ``anchor_logprobs = "engine"``, so each rollout carries π0
   log-probs as the anchor engine attaches them and no anchor model is loaded), one warm-up GRPO
   step, then ``--steps`` steps on the same synthetic ScoredGroups (bench/learner.py's
   ``make_groups``), each followed by a publish of the next version with the real publish path
   (``Trainer.write_weights``: save, fsync every file and the directory, rename into
   ``weights/v<N>``). Reported: the process's peak RSS (``os.wait4``'s ``ru_maxrss`` of that
   child), the median step time, the version directory's size in bytes and the median publish
   time (write + fsync + rename).
2. **Engine**: ``python -m catq engine`` on the base model (with ``--enable-lora`` and the
   learner's rank and target modules for ``lora``: catq/engines/lora.py's ``server_flags``, as
   ``catq up`` starts it), started after the learner process has exited so the two do not share
   the CPUs. Each published version (already in place) is then served as the syncer serves it
   (catq/learner/syncer.py): ``full`` = ``POST /update_weights_from_disk``; ``lora`` = ``POST
   /load_lora_adapter`` + ``POST /update_weight_version`` (catq/engines/adapters.py ``move``);
   the clock stops when a ``/generate`` (on the adapter, ``lora_path = "v<N>"``, for ``lora``)
   succeeds and its ``meta_info.weight_version`` is N. The median over the versions is the
   publish -> serving time; the engine's peak RSS is reported beside it.

The table prints each figure for both modes and the ratio lora/full; ``--out`` gets the same as
JSON with the command that produced it. The machine is whatever runs it (its CPU count, torch
threads, niceness and load average at start and end are recorded): run nothing else beside it,
or say that the machine was shared. The serving time's first ``/generate`` is CPU-bound work in
the engine and the most sensitive figure to other load; its split (load request vs first
``/generate``) is recorded per version.
``--smoke`` is a seconds-long run on a tiny random model (for tests/integration/test_bench_lora.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("full", "lora")
FIGURES = (
    # key, label, unit, format
    ("learner_peak_rss_mib", "learner peak RSS", "MiB", "{:.0f}"),
    ("step_s", "median GRPO step", "s", "{:.3f}"),
    ("publish_bytes", "publish size (weights/v<N>)", "bytes", "{:,.0f}"),
    ("publish_s", "median publish (write + fsync)", "s", "{:.3f}"),
    ("serve_s", "median publish -> serving", "s", "{:.3f}"),
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help='HF directory or "default" (the default; --smoke: a tiny random model)')
    parser.add_argument("--steps", type=int, default=5, help="timed GRPO steps (and versions published) per mode")
    parser.add_argument("--groups", type=int, default=2, help="scored groups per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny: a 2-layer random model, 2 steps, 2 groups of 2, 8+8 tokens")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # the learner process
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.groups, args.group_size = 2, 2, 2
        args.prompt_tokens, args.completion_tokens = 8, 8
    return args


# -- the learner process ------------------------------------------------------------------------


def learner_config(model_path: str, run_dir: Path, mode: str, micro_batch: int):
    from catq.config import LoraConfig, load_config

    config = load_config(None, run="bench-lora")
    config.run_dir = str(run_dir)
    config.model = config.model.model_copy(update={"policy": model_path, "anchor": model_path})
    config.learner = config.learner.model_copy(update={
        "device": "cpu", "anchor_logprobs": "engine", "micro_batch_rollouts": micro_batch,
        "lora": LoraConfig(enabled=mode == "lora"),  # learner.lora's defaults otherwise
    })
    return config


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_learner(args: argparse.Namespace) -> None:
    """(child) Build the Trainer, warm up, take ``--steps`` steps, publishing after each."""
    import resource

    import torch

    from bench.learner import make_groups
    from catq.learner.trainer import Trainer

    config = learner_config(args.model, Path(args.dir) / args.child, args.child,
                            micro_batch=args.groups * args.group_size)
    trainer = Trainer.from_config(config)
    groups_args = argparse.Namespace(groups=args.groups, group_size=args.group_size, prompt_tokens=args.prompt_tokens,
                                     completion_tokens=args.completion_tokens, anchor_logprobs="engine")
    prepared = [trainer.prepare(g) for g in make_groups(groups_args, trainer.vocab_size)]

    def step(n: int) -> None:
        trainer.train(prepared, [f"{n}-{i}" for i in range(len(prepared))])

    step(0)  # warm-up: allocator, AdamW moments
    step_s, publish_s, versions = [], [], []
    for n in range(1, args.steps + 1):
        started = time.perf_counter()
        step(n)
        step_s.append(time.perf_counter() - started)
        trainer.state.policy_version = n
        started = time.perf_counter()
        path = trainer.write_weights()
        publish_s.append(time.perf_counter() - started)
        versions.append({"version": n, "path": str(path), "bytes": dir_bytes(path),
                         "files": sorted(p.name for p in path.iterdir())})
    params = list(trainer.policy.parameters())
    result = {
        "step_s_all": step_s, "publish_s_all": publish_s, "versions": versions,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "optimizer_tensors": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
        "rollouts_per_step": sum(len(g.samples) for g in prepared),
        "torch_threads": torch.get_num_threads(),
        "self_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    Path(args.child_out).write_text(json.dumps(result))


def learner_process(args: argparse.Namespace, mode: str, model_path: str, workdir: Path) -> dict:
    """Run one mode's learner as a child; its result with the child's own peak RSS (wait4)."""
    out = workdir / f"learner-{mode}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--child-out", str(out),
            "--model", model_path, "--dir", str(workdir), "--steps", str(args.steps), "--groups", str(args.groups),
            "--group-size", str(args.group_size), "--prompt-tokens", str(args.prompt_tokens),
            "--completion-tokens", str(args.completion_tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} learner process failed (exit {proc.returncode})")
    result = json.loads(out.read_text())
    result["learner_peak_rss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["step_s"] = statistics.median(result["step_s_all"])
    result["publish_s"] = statistics.median(result["publish_s_all"])
    result["publish_bytes"] = statistics.median(v["bytes"] for v in result["versions"])
    return result


# -- the engine -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_engine(model_path: str, weights_dir: Path, extra: list[str], log_path: Path,
                 timeout_s: float = 600) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "catq", "engine", "--model", model_path, "--port", str(port), "--device", "cpu",
            "--max-batch", "8", "--weights-dir", str(weights_dir), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the engine exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    stop_engine(proc)
    raise SystemExit(f"the engine did not answer /health in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")


def stop_engine(proc: subprocess.Popen) -> float:
    """SIGTERM (then SIGKILL) this one process; its peak RSS in MiB."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss / 1024
        time.sleep(0.1)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024


async def serve_versions(url: str, mode: str, versions: list[dict], prompt_ids: list[int]) -> list[dict]:
    """Move the engine to each published version as the syncer does; time until a /generate on
    it reports that version."""
    import structlog

    from catq.engines.client import EngineClient
    from catq.engines import adapters

    timings = []
    async with EngineClient(url, timeout_s=600, max_attempts=1) as client:
        for entry in versions:
            version, path = entry["version"], entry["path"]
            started = time.perf_counter()
            if mode == "lora":
                await adapters.move(client, version, path)
            else:
                await client.update_weights_from_disk(path, weight_version=str(version))
            moved = time.perf_counter()
            [completion] = await client.generate(prompt_ids, max_new_tokens=4, temperature=0.0,
                                                 lora_path=adapters.adapter_name(version) if mode == "lora" else None)
            served = time.perf_counter()
            if completion.weight_version != str(version):
                raise SystemExit(f"{mode}: /generate reports weight_version {completion.weight_version!r}, "
                                 f"expected {version}")
            timings.append({"version": version, "load_s": moved - started, "generate_s": served - moved,
                            "serve_s": served - started})
            if mode == "lora":  # as the syncer does after listing the replica (not timed)
                await adapters.prune(client, version, structlog.get_logger())
    return timings


def engine_figures(mode: str, model_path: str, workdir: Path, learner: dict) -> dict:
    from catq.config import LoraConfig
    from catq.engines.lora import server_flags
    from catq.engines.models import load_tokenizer

    settings = LoraConfig(enabled=True)
    extra = server_flags(rank=settings.rank, target_modules=list(settings.target_modules)) if mode == "lora" else []
    tokenizer = load_tokenizer(model_path)
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
    weights_dir = workdir / mode / "weights"
    proc, url = start_engine(model_path, weights_dir, extra, workdir / f"engine-{mode}.log")
    try:
        timings = asyncio.run(serve_versions(url, mode, learner["versions"], list(prompt_ids)))
    finally:
        engine_rss = stop_engine(proc)
    return {"engine_flags": extra, "serve_all": timings, "engine_peak_rss_mib": engine_rss,
            "serve_s": statistics.median(t["serve_s"] for t in timings),
            "serve_load_s": statistics.median(t["load_s"] for t in timings),
            "serve_generate_s": statistics.median(t["generate_s"] for t in timings)}


# -- the table ------------------------------------------------------------------------------------


def ratio(lora: float, full: float) -> float | None:
    return lora / full if full else None


def print_table(summary: dict) -> None:
    full, lora = summary["modes"]["full"], summary["modes"]["lora"]
    s = summary["settings"]
    print(f"model={summary['model']} steps={s['steps']} (median, after 1 warm-up) batch={s['groups']} groups x "
          f"{s['group_size']} rollouts x ({s['prompt_tokens']} prompt + {s['completion_tokens']} completion) tokens; "
          f"cpus={summary['machine']['cpu_count']} torch threads={summary['machine']['torch_threads']}; "
          f"lora rank={summary['lora']['rank']} alpha={summary['lora']['alpha']} "
          f"targets={','.join(summary['lora']['target_modules'])}")
    print(f"  {'figure':34s} {'full':>16s} {'lora':>16s} {'lora/full':>10s}")
    for key, label, unit, fmt in FIGURES:
        r = summary["ratios_lora_over_full"][key]
        r_text = f"{r:10.4f}" if r is not None else f"{'n/a':>10s}"
        print(f"  {label + ' (' + unit + ')':34s} {fmt.format(full[key]):>16s} {fmt.format(lora[key]):>16s} {r_text}")
    print(f"  trainable params: full {full['trainable_params']:,} lora {lora['trainable_params']:,} "
          f"(ratio {lora['trainable_params'] / full['trainable_params']:.4f}); engine peak RSS (MiB): "
          f"full {full['engine_peak_rss_mib']:.0f} lora {lora['engine_peak_rss_mib']:.0f}; "
          f"serving split (load + first /generate, s): full {full['serve_load_s']:.3f} + "
          f"{full['serve_generate_s']:.3f}, lora {lora['serve_load_s']:.3f} + {lora['serve_generate_s']:.3f}")


def main() -> None:
    args = parse_args()
    if args.child:
        run_learner(args)
        return
    import torch

    from catq.config import LoraConfig
    from catq.engines.models import resolve_model_path, tiny_model_dir

    command = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    load_at_start = os.getloadavg()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="catq-bench-lora-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model or ("tiny" if args.smoke else "default")
        model_path = str(tiny_model_dir(workdir) if model == "tiny" else resolve_model_path(model))
        modes = {}
        for mode in MODES:
            print(f"[{mode}] learner: warm-up + {args.steps} steps, publishing after each", flush=True)
            learner = learner_process(args, mode, model_path, workdir)
            print(f"[{mode}] engine: serving {len(learner['versions'])} versions", flush=True)
            learner.update(engine_figures(mode, model_path, workdir, learner))
            shutil.rmtree(workdir / mode / "weights", ignore_errors=True)  # a full run's versions are large
            modes[mode] = learner
        settings = LoraConfig(enabled=True)
        summary = {
            "command": command,
            "model": model,
            "model_path": model_path,
            "settings": {"steps": args.steps, "groups": args.groups, "group_size": args.group_size,
                         "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
                         "device": "cpu", "anchor_logprobs": "engine", "smoke": args.smoke},
            "lora": {"rank": settings.rank, "alpha": settings.alpha, "dropout": settings.dropout,
                     "target_modules": list(settings.target_modules)},
            "machine": {"cpu_count": os.cpu_count(), "torch_threads": modes["full"]["torch_threads"],
                        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "niceness": os.nice(0), "load_average_1_5_15_at_start": load_at_start,
                        "load_average_1_5_15_at_end": os.getloadavg()},
            "modes": modes,
            "ratios_lora_over_full": {key: ratio(modes["lora"][key], modes["full"][key]) for key, *_ in FIGURES},
        }
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(summary)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
