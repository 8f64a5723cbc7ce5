"""Entry point of the learner role: `catq worker learner [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.learner`); the logic lives in catq.learner.worker (wired in catq.learner.role)."""

import sys

from catq.learner.role import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "learner", *sys.argv[1:]]))
