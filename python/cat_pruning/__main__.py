"""`python -m cat_pruning demo|generate`; see cat_pruning.cli."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
