"""The learner worker under torchrun: rank 0 leads, the other ranks follow its commands.

Rank 0 runs the usual LearnerLoop with a :class:`Leader` as its trainer: each Trainer call that
is a collective (load, train, checkpoint, publish) is first sent to the other ranks, which run
:func:`follow` and make the same call, until rank 0 says stop (:func:`stop_followers`). The
commands travel on the gloo group :func:`catq.learner.distributed.init_from_env` makes.

It sits above both :mod:`catq.learner.trainer` and :mod:`catq.learner.distributed` (the Trainer
uses the latter), which is why it is not part of either: imported by the learner worker only.
"""

from __future__ import annotations

import torch.distributed as dist

from catq.learner import distributed, grpo
from catq.learner.distributed import Ranks
from catq.learner.trainer import Trainer


def send(*command) -> None:
    """(rank 0) Tell the other ranks what to do next."""
    dist.broadcast_object_list([command], src=0, group=distributed._commands)


def receive() -> tuple:
    """(ranks > 0) Rank 0's next command."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=distributed._commands)
    return box[0]


class Leader:
    """Rank 0's Trainer: each collective call (load, train, checkpoint, publish) is first sent to
    the other ranks (:func:`follow`), so they make the same call; everything else is the
    Trainer's. The LearnerLoop uses it as its trainer and never knows there are other ranks."""

    def __init__(self, trainer):
        self.trainer = trainer

    @classmethod
    def from_config(cls, config, ranks: Ranks) -> Leader:
        send("load")
        return cls(Trainer.from_config(config, ranks))

    def __getattr__(self, name):
        return getattr(self.trainer, name)

    def train(self, groups, entry_ids, should_stop=None) -> dict:
        send("train", groups, entry_ids)
        return self.trainer.train(groups, entry_ids, should_stop)

    def save_checkpoint(self):
        send("checkpoint")
        return self.trainer.save_checkpoint()

    def write_weights(self):
        send("publish")
        return self.trainer.write_weights()


def stop_followers() -> None:
    send("stop")


def follow(config, ranks: Ranks) -> None:
    """(ranks > 0) Make the Trainer calls rank 0 makes, in the same order, until it says stop.
    A step rank 0 abandons or refuses (stop asked, not finite) is abandoned or refused here
    alike: the decision is agreed on inside the step."""
    trainer = None
    while True:
        command, *args = receive()
        if command == "stop":
            return
        if command == "load":
            trainer = Trainer.from_config(config, ranks)
        elif command == "train":
            try:
                trainer.train(*args)
            except (grpo.StepCancelled, grpo.NonFiniteStep):
                pass
        elif command == "checkpoint":
            trainer.save_checkpoint()
        elif command == "publish":
            trainer.write_weights()
        else:
            raise ValueError(f"unknown command from rank 0: {command!r}")
