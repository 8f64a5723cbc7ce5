"""The learner on many GPUs: data-parallel GRPO with the policy sharded by FSDP2.

    torchrun --nproc-per-node 2 -m catq worker learner --config FILE

Under ``torchrun`` each process reads RANK, WORLD_SIZE and LOCAL_RANK; :func:`init_from_env`
joins the process group (nccl on CUDA, gloo on CPU) and :func:`shard` applies FSDP2
(``torch.distributed.fsdp.fully_shard``) to each decoder layer and then to the root, the usual
recipe for HF Llama-style models (``model.model.layers``). Without torchrun (WORLD_SIZE unset or
1) there is no process group and everything is exactly the single-process learner.

One step (:func:`train_step`) gives the single-process gradient: the batch's samples are cut
into one contiguous share per rank (every rank gets one when there are at least as many samples
as ranks), each rank's loss is its own token sum divided by the token count of the WHOLE batch,
and FSDP2's reduce-scatter sums gradients over ranks (:func:`shard` sets its divide factor to
1 with a plain SUM reduction, instead of averaging). Every rank runs the same number of
micro-batches; a rank whose share runs out runs a forward and backward that contribute nothing, because its sharded
layers must take part in its peers' all-gathers and reduce-scatters. The metric sums are
all-reduced, the gradient norm for clipping is the global one (``clip_grad_norm_`` over DTensor
gradients), so every rank refuses a non-finite step or steps alike; a stop request is agreed on
(any rank asked) before each micro-batch.

Checkpoints and published weights are those of one process: :func:`full_model_state_dict` and
:func:`full_optimizer_state_dict` gather full, CPU tensors on rank 0 (collectives: every rank
calls them), the optimizer's in ``torch.optim.Optimizer.state_dict()``'s own format (integer
parameter ids in ``model.parameters()`` order), so a 1-process learner resumes from a checkpoint
written by N ranks and the other way round (:func:`load_full_optimizer_state_dict`).

The learner worker (``catq worker learner`` under torchrun, :func:`catq.learner.worker.run`):
rank 0 alone talks to Redis. It runs the usual LearnerLoop (lease, intake, steps, commits,
publishing) with a :class:`catq.learner.leader.Leader` as its trainer, which sends each Trainer
call that is a collective (load, train with the prepared groups, checkpoint, publish) to the
other ranks on a gloo group of its own (made here, by :func:`init_from_env`) before making it;
they run :func:`catq.learner.leader.follow` and make the same calls, until rank 0 says stop.
Every rank reads the checkpoint itself when loading (one machine, or a shared file system); only
rank 0 writes files. This module imports no Trainer: the Trainer uses it, and the Leader (which
uses both) lives in :mod:`catq.learner.leader`.

Tested on CPU only (gloo, 2 ranks, tests/unit/test_fsdp_learner.py): not yet run with nccl on
GPUs. Limits: an anchor held by the learner (``learner.anchor_logprobs = "learner"``) is a full,
unsharded copy on every rank; bf16 autocast is the single-process one (no FSDP2 mixed-precision
policy); a rank 0 that dies leaves the others to torchrun, which stops them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from catq.learner import grpo


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def init_from_env(device: str | None = None) -> Ranks:
    """The ranks torchrun started, with the process group joined; :data:`SINGLE` (no group at
    all) without torchrun. ``device``: "cpu" or "cuda" (default: CUDA when present); each rank
    takes the GPU of its LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    global _commands
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)
    if _commands is None:  # every rank makes it, in the same order: a collective
        _commands = dist.new_group(backend="gloo", timeout=COMMAND_TIMEOUT)
    return Ranks(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


COMMAND_TIMEOUT = timedelta(days=365)
"""The other ranks wait for rank 0's next command as long as it takes (rank 0 may wait hours for
scored groups); a dead rank 0 ends them through torchrun, not through this timeout."""
_commands = None
"""The gloo group rank 0's commands travel on (CPU objects, whatever the training backend)."""


def shard(policy: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """FSDP2 on each decoder layer, then the root; gradients summed over ranks, not averaged.
    Unchanged when there is one rank. Make the optimizer after this (the parameters become
    DTensors)."""
    if not ranks.distributed:
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,))
    for layer in decoder_layers(policy):
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # A plain SUM: factor 1 otherwise becomes PREMUL_SUM(1.0), which gloo refuses
            # ("Cannot use ReduceOp.PREMUL_SUM with Gloo"); a sum costs nccl nothing either.
            module.set_force_sum_reduction_for_comms(True)
    return policy


def decoder_layers(policy) -> list[torch.nn.Module]:
    base = getattr(policy, policy.base_model_prefix, policy) if hasattr(policy, "base_model_prefix") else policy
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(policy).__name__}: no decoder layers at model.layers to shard")
    return list(layers)


def split(samples: list, ranks: Ranks) -> list:
    """This rank's contiguous share of ``samples``: sizes differ by at most one, the larger
    shares first, so every rank has one when there are at least world_size samples."""
    base, extra = divmod(len(samples), ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return samples[start : start + base + (ranks.rank < extra)]


def _all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def train_step(policy, optimizer, batch: grpo.PreparedBatch, cfg: grpo.StepConfig, ranks: Ranks,
               anchor=None, should_stop=None) -> dict:
    """:func:`catq.learner.grpo.train_step` on this rank's share of ``batch`` (every rank calls
    it with the same batch); the update and the metrics are those of one process on the whole
    batch. With one rank it is exactly ``grpo.train_step``."""
    if not ranks.distributed:
        return grpo.train_step(policy, optimizer, batch, cfg, anchor=anchor, should_stop=should_stop)
    mine = split(batch.samples, ranks)
    tokens = sum(len(s.completion_ids) for s in batch.samples)
    size = cfg.micro_batch_rollouts
    shares = [len(split(batch.samples, Ranks(r, ranks.world_size))) for r in range(ranks.world_size)]
    n_micro = max(1, -(-max(shares) // size))
    chunks = [mine[i * size : (i + 1) * size] for i in range(n_micro)]
    keys = ("pg", "kl", "clipped", "capped", "ratio", "entropy", "kl_tokens")

    def reduce_sums(sums: dict) -> dict:
        total = _all_reduce([float(sums[k]) for k in keys])
        return {k: (round(v) if k in ("clipped", "capped", "kl_tokens") else v) for k, v in zip(keys, total)}

    def agreed_stop() -> bool:
        asked = bool(should_stop is not None and should_stop())
        return _all_reduce([float(asked)], dist.ReduceOp.MAX)[0] > 0

    local = grpo.PreparedBatch(samples=mine, rewards=batch.rewards, groups_used=batch.groups_used,
                               groups_skipped=batch.groups_skipped)
    metrics = grpo.train_step(policy, optimizer, local, cfg, anchor=anchor, should_stop=agreed_stop,
                              total_tokens=tokens, micro_batches=chunks, reduce_sums=reduce_sums)
    metrics.update({k: v for k, v in grpo._reward_metrics(batch).items()})
    if metrics.get("updated"):
        metrics["rollouts"] = len(batch.samples)
    return metrics


# ---------------------------------------------------------------------------------------------
# Full state dicts: checkpoints and published weights as from one process


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def full_model_state_dict(policy, ranks: Ranks) -> dict:
    """The policy's full state dict, CPU tensors, on rank 0 (empty elsewhere); a collective."""
    if not ranks.distributed:
        return policy.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(policy, options=_options(full_state_dict=True, cpu_offload=True))


def tied_names(policy) -> set[str]:
    """Names of parameters that are another parameter under a second name (tied embeddings'
    ``lm_head.weight``): ``save_pretrained`` leaves them out of a model's own weights, so they
    are left out of a gathered state dict written for publishing too."""
    kept = {name for name, _ in policy.named_parameters()}
    return {name for name, _ in policy.named_parameters(remove_duplicate=False)} - kept


def _param_names(policy, optimizer) -> list[str]:
    """The name of each optimizer parameter in ``optimizer.state_dict()``'s numbering."""
    names = {id(p): n for n, p in policy.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(policy, optimizer, ranks: Ranks) -> dict:
    """The optimizer's full state on rank 0 (empty elsewhere), in ``optimizer.state_dict()``'s
    format (integer ids), so one process can load it; a collective."""
    if not ranks.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(policy, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    if not ranks.is_main:
        return {}
    index = {name: i for i, name in enumerate(_param_names(policy, optimizer))}
    groups, start = [], 0
    for group, mine in zip(osd["param_groups"], optimizer.param_groups):
        n = len(mine["params"])
        # A tuple hyperparameter (AdamW's betas) comes back as a list from a loaded sharded
        # state: written as one process writes it.
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items() if k != "params"}
        groups.append({**hyper, "params": list(range(start, start + n))})
        start += n
    return {"state": {index[name]: state for name, state in osd["state"].items()}, "param_groups": groups}


def load_full_model_state_dict(policy, state: dict, ranks: Ranks) -> None:
    if not ranks.distributed:
        policy.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(policy, state, options=_options(full_state_dict=True))


def load_full_optimizer_state_dict(policy, optimizer, state: dict, ranks: Ranks) -> None:
    """Load an ``optimizer.state_dict()``-format state (every rank holds it) into a sharded
    optimizer."""
    if not ranks.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(policy, optimizer)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state["param_groups"]]
    osd = {"state": {names[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(policy, optimizer, osd, options=_options(full_state_dict=True))
