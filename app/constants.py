"""Names and numbers the app relies on, each with why it has that value."""

# The SGLang release the argument table, the reference notes and the `engine` extra describe.
SGLANG_VERSION = "0.5.23"

# The server module we launch; `python -m sglang.launch_server` takes the same arguments as `sglang serve`.
SGLANG_LAUNCH_MODULE = "sglang.launch_server"

# Engines listen on loopback only: the gateway is the one authenticated way in.
ENGINE_HOST = "127.0.0.1"

# The gateway's default port (DESIGN section 3, `run --port`).
GATEWAY_DEFAULT_PORT = 8000

# Environment variable with comma-separated access tokens for the gateway (DESIGN section 4).
API_TOKENS_ENV = "CLEARML_SGLANG_API_TOKENS"

# huggingface_hub reads the token from here; it never goes on a command line.
HF_TOKEN_ENV = "HF_TOKEN"

# SGLang only runs its CPU engine with this set; `--device cpu` alone is not enough (reference/sglang.md B2).
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
