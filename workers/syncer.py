"""The syncer process: `python -m workers.syncer [--config F] [--run R] [--redis-url U]`.

Same as `catq worker syncer`; the logic lives in catq.learner.syncer.
"""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "syncer", *sys.argv[1:]]))
