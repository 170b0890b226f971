"""clearml-sglang: deploy LLMs with SGLang behind an authenticated, observable ClearML endpoint."""

import time

__version__ = "0.1.0"

# The earliest moment this interpreter's own code can read, on the monotonic clock: "Ready in N s" counts from it.
# (A process's creation time is not it: `bash -c "pip install … && clearml-sglang run"` execs the app in the shell's
# process, created minutes before.)
STARTED = time.monotonic()
