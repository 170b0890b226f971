"""The script a ClearML agent runs for a deployment task: `clearml-sglang run`, configured from the task itself.

The task's hyperparameters (the form) are the configuration; `Args/<section.key>` entries, which
`clearml-task --args` writes, are applied on top as `--set` overrides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: the `app` package

from app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
