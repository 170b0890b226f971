"""``python -m app``: the same entry point as the ``clearml-sglang`` console script."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
