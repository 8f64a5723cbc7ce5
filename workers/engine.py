"""Entry point of an engine container: `python -m workers.engine --model default --port 30000`.

Same flags as `catq engine`; the server lives in catq.engines.server (served by catq.engines.app).
"""

import sys

from catq.cli import main

if __name__ == "__main__":
    sys.exit(main(["engine", *sys.argv[1:]]))
