"""Entry point of the rollout role: `python -m workers.rollout [--config F] [--run R] [--redis-url U]`
(the same as `catq worker rollout`). The logic lives in catq.teacher.rollout."""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "rollout", *sys.argv[1:]]))
