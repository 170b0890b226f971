"""How an engine process starts: its key off its command line, its life tied to the app's.

Every engine (SGLang's server, sglang-router) is started as

    python -m app.sglang.launch -m sglang.launch_server --model-path ... --port 30001

- A process's command line is readable by every user of the machine (`ps`, /proc/<pid>/cmdline); its environment
  only by its own user. The engine's secret flags (its key) arrive in `CLEARML_SGLANG_SECRET_ARGS`
  ('{"--api-key": "..."}'): this module takes the variable out of the environment (the engine's own children do not
  inherit it) and appends the flags to `sys.argv` in this process, so the command line the kernel shows stays the
  one it was started with.
- On Linux it asks the kernel to kill it when the app that started it dies (`PR_SET_PDEATHSIG`): an app killed
  outright (SIGKILL, out of memory) leaves no engine running on its GPUs. SGLang's own processes die with their
  launcher the same way.

Then it runs the module (`-m NAME`) or script (`PATH`) as `__main__`. `app.serving.engine.Engine` launches every
engine so.
"""

from __future__ import annotations

import ctypes
import json
import os
import runpy
import signal
import sys

SECRET_ARGS_ENV = "CLEARML_SGLANG_SECRET_ARGS"
_PR_SET_PDEATHSIG = 1


def secret_argv(environ: dict[str, str] | os._Environ[str]) -> list[str]:
    """The flags in the variable, taken out of `environ`."""
    flags = json.loads(environ.pop(SECRET_ARGS_ENV, "") or "{}")
    return [token for flag, value in flags.items() for token in (flag, str(value))]


def die_with_parent() -> None:
    """Be killed when the process that started this one ends (Linux; elsewhere nothing happens)."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


def main(argv: list[str]) -> None:
    if sys.platform.startswith("linux"):
        die_with_parent()
    if len(argv) >= 2 and argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        sys.argv = [module, *rest, *secret_argv(os.environ)]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    elif argv:
        sys.argv = [argv[0], *argv[1:], *secret_argv(os.environ)]
        runpy.run_path(argv[0], run_name="__main__")
    else:
        sys.exit("usage: python -m app.sglang.launch (-m MODULE | PATH) [ARGS...]")


if __name__ == "__main__":
    main(sys.argv[1:])
