"""Entry point of the anchor role: `python -m workers.anchor [--config F] [--run R] [--redis-url U]`
(the same as `catq worker anchor`). The logic lives in catq.teacher.anchor."""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "anchor", *sys.argv[1:]]))
