"""Entry point of the anchor role: `catq worker anchor [--config F] [--run R] [--redis-url U]` runs
this module's `run` (so does `python -m workers.anchor`); the wiring is catq.roles.anchor."""

import sys

from catq.roles.anchor import run

__all__ = ["run"]

if __name__ == "__main__":
    from catq.cli import main

    sys.exit(main(["worker", "anchor", *sys.argv[1:]]))
