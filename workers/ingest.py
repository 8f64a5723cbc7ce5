"""Entry point of the ingest role: `catq worker ingest [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.ingest`); the wiring is catq.roles.ingest."""

import sys

from catq.roles.ingest import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "ingest", *sys.argv[1:]]))
