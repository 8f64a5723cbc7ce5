"""(tests) One learner step on N ranks with FSDP2 over gloo, on CPU.

    python -m tests.helpers.fsdp_learner --world 2 --port 29555 --model DIR --batch FILE --run DIR

Spawns ``--world`` processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); as in the learner worker, rank 0 leads
(:class:`catq.learner.distributed.Leader`) and the other ranks follow its calls. Rank 0 makes a
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

    from catq.learner import distributed
    from catq.learner.trainer import Trainer

    torch.set_num_threads(1)
    ranks = distributed.init_from_env("cpu")
    config = make_config(args.model, args.run, args.micro)
    if ranks.distributed and not ranks.is_main:  # as in the learner worker: follow rank 0
        distributed.follow(config, ranks)
        torch.distributed.destroy_process_group()
        return

    def load():
        return distributed.Leader.from_config(config, ranks) if ranks.distributed else Trainer.from_config(config)

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
        distributed.stop_followers()
        torch.distributed.destroy_process_group()


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
    args = parser.parse_args()
    if args.world == 1:
        os.environ.pop("WORLD_SIZE", None)
        run(args)
        return
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(args,), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
