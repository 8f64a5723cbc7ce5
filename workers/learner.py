"""Entry point of the learner role: `catq worker learner [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.learner`); the wiring is catq.roles.learner."""

import sys

from catq.roles.learner import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "learner", *sys.argv[1:]]))
