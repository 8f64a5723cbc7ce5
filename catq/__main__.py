import sys

from catq.cli import main

if __name__ == "__main__":  # a spawned helper process (math-verify pool) imports this module too
    sys.exit(main())
