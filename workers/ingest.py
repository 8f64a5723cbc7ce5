"""The ingest process: `python -m workers.ingest [--config F] [--run R] [--redis-url U]`.

Same as `catq worker ingest`; the HTTP API lives in catq.ingest.
"""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", "ingest", *sys.argv[1:]]))
