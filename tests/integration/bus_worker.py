"""A real worker process for the bus/runtime tests: echoes prompts from ``prompts`` to ``echoed``.

The prompt text steers it: ``sleep:S`` sleeps S seconds first, ``fail`` raises (retried, then
dead-lettered), ``poison`` raises DeadLetterError, ``down:PATH`` fails like an unreachable engine
while PATH exists, ``fail-while:PATH`` raises while PATH exists, ``hang`` never returns; anything
else is echoed at once. Every completed prompt id is also appended to ``--done-file`` (if given), one per line.

    python tests/integration/bus_worker.py --redis-url redis://127.0.0.1:6379 --run R
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from catq.bus import Output  # noqa: E402
from catq.config import load_config  # noqa: E402
from catq.engines.client import EngineError  # noqa: E402
from catq.messages import Prompt  # noqa: E402
from catq.runtime import DeadLetterError, WorkerContext, run_worker  # noqa: E402
from catq.topology import PROMPTS  # noqa: E402


class EchoHandler:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx

    async def handle(self, message: Prompt) -> list[Output]:
        text = message.question
        if text.startswith("sleep:"):
            await asyncio.sleep(float(text.split(":", 1)[1]))
        elif text == "fail":
            raise RuntimeError("asked to fail")
        elif text == "poison":
            raise DeadLetterError("poison prompt")
        elif text.startswith("down:") and Path(text.split(":", 1)[1]).exists():
            raise EngineError("engine http://127.0.0.1:9 unreachable: connection refused")
        elif text.startswith("fail-while:") and Path(text.split(":", 1)[1]).exists():
            raise RuntimeError("asked to fail while " + text.split(":", 1)[1] + " exists")
        elif text == "hang":
            await asyncio.Event().wait()
        return [Output("echoed", message)]


async def build(ctx: WorkerContext) -> EchoHandler:
    return EchoHandler(ctx)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis-url", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--claim-idle-ms", type=int, default=500)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--heartbeat", type=float, default=0.5)
    p.add_argument("--deadline", type=float, default=0.0, help="worker.message_deadline_s (0: none)")
    args = p.parse_args()
    config = load_config(None, run=args.run, redis_url=args.redis_url)
    config.bus = config.bus.model_copy(update={"claim_idle_ms": args.claim_idle_ms, "block_ms": 200,
                                               "max_attempts": args.max_attempts})
    config.worker = config.worker.model_copy(update={"concurrency": args.concurrency,
                                                     "grace_period_s": args.grace,
                                                     "heartbeat_s": args.heartbeat,
                                                     "message_deadline_s": args.deadline,
                                                     "transient_backoff_max_s": 0.5})
    asyncio.run(run_worker(config, "echo", build, stream=PROMPTS, worker_id=args.worker_id))


if __name__ == "__main__":
    main()
