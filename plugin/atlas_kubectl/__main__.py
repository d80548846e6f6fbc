"""Entry point of the `kubectl-atlas` console script (`python -m atlas_kubectl` works too)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
