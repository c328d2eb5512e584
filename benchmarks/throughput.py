"""Training throughput; the same as `slowrun bench throughput` (see src/slowrun/speed.py)."""

import sys

from slowrun.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", *sys.argv[1:]]))
