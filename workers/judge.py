"""Entry point of the judge role: `python -m workers.judge [--config F] [--run R] [--redis-url U]`
(the same as `catq worker judge`). The logic lives in catq.teacher.judge."""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "judge", *sys.argv[1:]]))
