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
engine so, in the environment `engine_environment` makes: the machine's, less what is the app's alone.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import runpy
import signal
import sys
from collections.abc import Mapping

SECRET_ARGS_ENV = "CLEARML_SGLANG_SECRET_ARGS"
_PR_SET_PDEATHSIG = 1
# What an engine's environment never holds, though the app's may: the app's access tokens, ClearML's credentials and
# every other ClearML or agent setting (an engine calls no ClearML server), and whatever is named like a credential.
# An engine reads none of them, and any user who can read its process (or a dump of it) could read them there.
_NOT_FOR_ENGINES = re.compile(r"^(CLEARML|TRAINS)_|(^|_)(TOKENS?|SECRETS?|PASSWORD|PASSWD|PASS|KEY|API_?KEY|"
                              r"ACCESS_KEY_ID|CREDENTIALS?|AUTH)$", re.IGNORECASE)
# ... except HuggingFace's token: SGLang downloads models with it.
_ENGINES_NEED = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"})


def engine_environment(machine: Mapping[str, str], own: Mapping[str, str]) -> dict[str, str]:
    """An engine's environment: the machine's (`os.environ`), less the app's secrets and settings and anything named
    like a credential, then the engine's own variables (the config's `env`, its GPUs, the HF token), which win. A
    variable an engine needs that this drops is given in the config's `env`."""
    env = {name: value for name, value in machine.items()
           if name in _ENGINES_NEED or not _NOT_FOR_ENGINES.search(name)}
    env.update(own)
    return env


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
