"""`python -m gpuload`: the same command line as `gpuload`."""

import sys

from gpuload.cli import main

# Guarded: spawned worker processes (gpuload prepare --workers N) re-import the main module.
if __name__ == "__main__":
    sys.exit(main())
