"""Entry point of the rollout role: `catq worker rollout [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.rollout`); the wiring is catq.roles.rollout."""

import sys

from catq.roles.rollout import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "rollout", *sys.argv[1:]]))
