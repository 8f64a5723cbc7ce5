"""The learner role's wiring: ``catq worker learner`` runs :func:`run`. It joins the torchrun
ranks when there are several, takes the learner lease, loads the trainer
(a :class:`~catq.learner.leader.Leader` on rank 0 of several) and runs the
:class:`~catq.learner.worker.LearnerLoop` until SIGTERM/SIGINT or ``learner.max_steps``.
"""

from __future__ import annotations

import asyncio
import functools

from catq.bus import LeaseLost
from catq.config import Config
from catq.learner.intake import HOLD_CLAIM_IDLE_MS
from catq.learner.lease import Lease
from catq.learner.tensorboard import TensorBoardLog
from catq.learner.worker import ROLE, LearnerLoop


async def run(config: Config) -> None:
    """Run the learner until SIGTERM/SIGINT or ``learner.max_steps``. A learner that lost its
    lease to another exits 1 with a one-line message.

    Under torchrun (WORLD_SIZE > 1: ``torchrun --nproc-per-node N -m catq worker learner
    --config FILE``) the policy is sharded over the N ranks with FSDP2
    (:mod:`catq.learner.distributed`): rank 0 is the learner of :mod:`catq.learner.worker`, with a
    :class:`~catq.learner.leader.Leader` as its trainer, and alone talks to Redis; the other
    ranks only follow its training calls, ignore SIGTERM/SIGINT (rank 0 decides when the work
    stops, and tells them) and exit when it says so."""
    from catq.learner import distributed
    from catq.runtime import run_role

    ranks = distributed.init_from_env(config.learner.device)
    if ranks.distributed and not ranks.is_main:
        _follow(config, ranks)  # blocking: this process has nothing else to do
        return
    try:
        await run_role(config, ROLE, functools.partial(serve, ranks=ranks),
                       bus_config=config.bus.model_copy(update={"claim_idle_ms": HOLD_CLAIM_IDLE_MS}))
    except LeaseLost as exc:
        raise SystemExit(f"catq learner: {exc}") from None
    finally:
        if ranks.distributed:
            from catq.learner import leader

            leader.stop_followers()


def _follow(config: Config, ranks) -> None:
    import signal

    from catq.learner import leader

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    leader.follow(config, ranks)


async def serve(ctx, ranks=None) -> None:
    """Wait for the lease, then load (the checkpoint its previous holder left) and train."""
    lease = Lease.for_learner(ctx.bus, ctx.worker_id, ctx.config.worker.heartbeat_s)
    if not await lease.acquire(ctx.stop, ctx.log, poll_s=ctx.config.worker.heartbeat_s):
        return  # stopped while waiting
    done = asyncio.Event()
    keeper = asyncio.create_task(lease.keep(ctx.config.worker.heartbeat_s, ctx.stop.set, ctx.log, done))
    try:
        await train(ctx, lease, ranks)
    finally:
        done.set()
        await asyncio.wait([keeper], timeout=5)
        await _release(lease, ctx.log)
    if lease.lost:
        raise LeaseLost(lease.lost_message())


async def train(ctx, lease: Lease, ranks=None) -> None:
    from catq.learner.leader import Leader
    from catq.learner.trainer import Trainer

    tensorboard = TensorBoardLog.open(ctx.config)  # before the model load: a missing extra fails fast
    if ranks is not None and ranks.distributed:
        trainer = await asyncio.to_thread(Leader.from_config, ctx.config, ranks)
    else:
        trainer = await asyncio.to_thread(Trainer.from_config, ctx.config)
    ctx.log.info("learner ready", step=trainer.state.step, version=trainer.state.policy_version,
                 device=str(trainer.device))
    loop = LearnerLoop(ctx.config, ctx.bus, trainer, ctx.log, tensorboard=tensorboard, results=ctx.results,
                       lease=lease, broadcaster=make_broadcaster(ctx.config, trainer, ctx.log))
    if not loop.done():  # one with no steps left exits at once: it never serves
        ctx.serving()
    await loop.run(ctx.stop)
    ctx.log.info("learner stopped", step=trainer.state.step, version=trainer.state.policy_version)


def make_broadcaster(config: Config, trainer, log):
    """The weight broadcaster ``learner.weight_sync = "distributed"`` asks for, else None."""
    learner = config.learner
    if learner.weight_sync != "distributed":
        return None
    from catq.engines.client import EngineClient
    from catq.learner.broadcast import WeightBroadcaster

    return WeightBroadcaster(
        config.engines.policy_urls, lambda url: EngineClient.from_config(config.engines, url), log,
        backend=learner.broadcast_backend, address=learner.broadcast_address, port=learner.broadcast_port,
        timeout_s=learner.broadcast_timeout_s, resolve_replicas=config.engines.resolve_replicas,
        device=str(trainer.device) if learner.broadcast_backend == "nccl" else "cpu",
    )


async def _release(lease: Lease, log) -> None:
    try:
        await asyncio.wait_for(lease.release(), 5)
    except Exception as exc:  # it expires on its own
        log.warning("could not release the learner lease", error=str(exc) or type(exc).__name__)
