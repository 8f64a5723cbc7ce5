import sys

from catq.cli import main

sys.exit(main())
