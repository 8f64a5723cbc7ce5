"""Entry point of the judge role: `catq worker judge [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.judge`); the wiring is catq.roles.judge."""

import sys

from catq.roles.judge import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "judge", *sys.argv[1:]]))
