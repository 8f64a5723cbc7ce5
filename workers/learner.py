"""The learner process: `python -m workers.learner [--config F] [--run R] [--redis-url U]`.

Same as `catq worker learner`; the logic lives in catq.learner.worker.
"""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "learner", *sys.argv[1:]]))
