"""The CPU track benchmark; the same as `slowrun bench cpu-track` (see src/slowrun/track.py)."""

import sys

from slowrun.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "cpu-track", *sys.argv[1:]]))
