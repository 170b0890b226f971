"""Names and numbers the app relies on, each with why it has that value."""

import os
from pathlib import Path

# The SGLang release the argument table, the reference notes and the `engine` extra describe.
SGLANG_VERSION = "0.5.23"

# The server module we launch; `python -m sglang.launch_server` takes the same arguments as `sglang serve`.
SGLANG_LAUNCH_MODULE = "sglang.launch_server"

# Engines listen on loopback only: the gateway is the one authenticated way in.
ENGINE_HOST = "127.0.0.1"

# The gateway's default port (`run --port`; docs/deploying.md, "Commands").
GATEWAY_DEFAULT_PORT = 8000

# Environment variable with comma-separated access tokens for the gateway (docs/serving.md, "The endpoint").
API_TOKENS_ENV = "CLEARML_SGLANG_API_TOKENS"

# huggingface_hub reads the token from here; it never goes on a command line.
HF_TOKEN_ENV = "HF_TOKEN"

# SGLang only runs its CPU engine with this set; `--device cpu` alone is not enough (docs/sglang.md, "CPU mode").
SGLANG_CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"

# What replaces a secret wherever something must be shown in its place.
SECRET_MASK = "***"

# Longest piece of a user's value quoted back in an error message: enough to recognise it, never a wall of text.
ERROR_VALUE_PREVIEW_CHARS = 60

# Port of the first engine when `args` describes a launch; `run` checks the ports are free (engines on loopback).
ENGINE_BASE_PORT = 30000

# Where the ranks of a model spanning nodes meet (SGLang's --dist-init-addr port on the master): ClearML's
# multi-node launch default, overridable by CLEARML_MULTI_NODE_MASTER_DEF_PORT as ClearML reads it.
MULTI_NODE_PORT = 29500

# Exit codes of `clearml-sglang` (docs/deploying.md, "Commands"): success (an idle shutdown included), an invalid
# configuration or usage (nothing launched), an engine that failed to start or crashed past its restart budget;
# after SIGINT or SIGTERM and a clean drain, 128 + the signal's number, as shells report a process a signal ended.
EXIT_OK, EXIT_USAGE, EXIT_ENGINE = 0, 2, 3


def exit_after_signal(signum: int) -> int:
    return 128 + signum


# Where the app keeps what it makes for the user (the demo model, a generated access token).
CACHE_ENV = "CLEARML_SGLANG_CACHE"


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    environ = dict(os.environ) if environ is None else environ
    return Path(environ.get(CACHE_ENV) or Path.home() / ".cache" / "clearml-sglang")

# The routes the app (and sglang-router) call on an engine on their own, every few seconds: never in the console.
ENGINE_PROBE_PATHS = ("/health", "/metrics")
