"""Entry point of the syncer role: `catq worker syncer [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.syncer`); the wiring is catq.roles.syncer."""

import sys

from catq.roles.syncer import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "syncer", *sys.argv[1:]]))
