"""(tests) One learner step on N ranks with FSDP2 over gloo, on CPU.

    python -m tests.helpers.fsdp_learner --world 2 --port 29555 --model DIR --batch FILE --run DIR

Spawns ``--world`` processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); as in the learner worker, rank 0 leads
(:class:`catq.learner.leader.Leader`) and the other ranks follow its calls. Rank 0 makes a
Trainer from the config (sharded when world > 1), trains
``--steps`` steps on the prepared groups pickled in ``--batch``, checkpoints and publishes
version 1 under ``--run``; with ``--resume`` a second Trainer then resumes from that checkpoint
(the sharded load path) and takes one more step, checkpointed. Rank 0 saves each step's metrics to ``<run>/metrics.pt``. With
``--world 1`` there is no process group: the single-process learner, for comparison.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path


def make_config(model: str, run_dir: str, micro: int = 2, device: str = "cpu"):
    from catq.config import load_config

    config = load_config(None, run="fsdp")
    config.run_dir = run_dir
    config.model = config.model.model_copy(update={"policy": model, "anchor": model})
    config.learner = config.learner.model_copy(update={
        "device": device, "lr": 1e-3, "micro_batch_rollouts": micro, "max_grad_norm": 1.0,
        "anchor_logprobs": "engine",
    })
    return config


def run(args) -> None:
    import torch

    from catq.learner import distributed, leader
    from catq.learner.trainer import Trainer

    torch.set_num_threads(1)
    ranks = distributed.init_from_env("cpu")
    config = make_config(args.model, args.run, args.micro)
    if args.loop:
        config.learner = config.learner.model_copy(update={
            "batch_groups": 2, "checkpoint_every": 1, "publish_every": 2, "max_staleness": 100})
    if ranks.distributed and not ranks.is_main:  # as in the learner worker: follow rank 0
        leader.follow(config, ranks)
        torch.distributed.destroy_process_group()
        return

    def load():
        return leader.Leader.from_config(config, ranks) if ranks.distributed else Trainer.from_config(config)

    if args.loop:
        import asyncio

        out = asyncio.run(learner_loop(load(), config))
        torch.save(out, Path(args.run) / "loop.pt")
        if ranks.distributed:
            leader.stop_followers()
            torch.distributed.destroy_process_group()
        return
    trainer = load()
    groups = pickle.loads(Path(args.batch).read_bytes())
    metrics = []
    for i in range(args.steps):
        metrics.append(trainer.train(groups, [f"{i}-0"]))
    trainer.save_checkpoint()
    trainer.state.policy_version = 1
    trainer.write_weights()
    if args.resume:  # a second Trainer resumes from that checkpoint and takes one more step
        trainer = load()
        metrics.append(trainer.train(groups, [f"{args.steps}-0"]))
        trainer.save_checkpoint()
    torch.save(metrics, Path(args.run) / "metrics.pt")
    if ranks.distributed:
        leader.stop_followers()
        torch.distributed.destroy_process_group()


async def learner_loop(trainer, config) -> dict:
    """The learner worker's loop on a fake bus: two steps of 2 groups (5 rollouts), checkpointed,
    the second publishing v1; then a step asked to stop before it starts, which every rank
    abandons."""
    import asyncio

    import structlog

    from catq.bus import Delivery
    from catq.learner.worker import LearnerLoop
    from tests.integration.test_learner_restart import make_scored
    from tests.unit.test_grpo_worker import FakeBus

    def deliveries(indices):
        return [Delivery("scored", f"{i}-0", make_scored(i, [1.0, 0.0, 0.5] if i % 2 else [0.0, 1.0]), 1, b"")
                for i in indices]

    bus = FakeBus()
    loop = LearnerLoop(config, bus, trainer, structlog.get_logger())
    await loop.intake(deliveries(range(1, 5)))
    await loop.step()
    await loop.step()
    await loop.settle()  # one process writes its commits in the background; two ranks wait for them
    await loop.intake(deliveries(range(5, 7)))
    stop = asyncio.Event()
    stop.set()
    await loop.step(stop)
    loop.close()
    return {"acked": bus.acked, "published": [(s, m.policy_version) for s, m in bus.published],
            "buffer": [d.entry_id for d in loop.buffer], "step": trainer.state.step,
            "version": trainer.state.policy_version}


def _rank(rank: int, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    run(args)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--port", type=int, default=29555)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--loop", action="store_true", help="drive the learner worker's loop on a fake bus")
    args = parser.parse_args()
    if args.world == 1:
        os.environ.pop("WORLD_SIZE", None)
        run(args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
