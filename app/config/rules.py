"""Rules across fields: names and references that must be unique or well formed, tokens long enough, a raw
SGLang command line that leaves the app its own flags, LoRA limits that fit together."""

from __future__ import annotations

import re
import shlex

from app.config import schema
from app.config.flags import FlagTable, preview
from app.config.problems import Problems
from app.config.types import GeneralConfig, InstanceConfig, LoraConfig, ModelConfig
from app.keys import DEFAULT, named_tokens, split_entry

MAX_MODELS = 64


MAX_ENV_VARS = 512


MAX_BENCHMARK_CONCURRENCY = 4096


MIN_TOKEN_CHARS = 16


MAX_TOKEN_CHARS = 512


ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")


# $VAR, ${VAR}, $(cmd) and `cmd`: nothing expands them, since no shell runs the command line.
SHELL_EXPANSION_RE = re.compile(r"\$[({A-Za-z_]|`")


GENERATE_TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


# What a key's name may be (`app.keys.NAME_RE`), said as a fix.
KEY_NAME_FIX = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def check_text_fields(instance: InstanceConfig, problems: Problems) -> None:
    for key in ("name", "project"):
        if not getattr(instance, key):
            problems.add(f"instance.{key}", "must not be empty", "give it a name")


def check_endpoint_name(name: str, where: str, problems: Problems) -> None:
    if not ENDPOINT_NAME_RE.match(name):
        problems.add(where, f"{preview(name)} is not a valid endpoint name",
                     "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
    elif name in schema.RESERVED_ENDPOINT_NAMES:
        problems.add(where, f"{name!r} is a path the gateway answers itself", "choose another name")


# Flags that need CUDA: on the CPU SGLang's memory saver dies at start (exit 127, no libcuda.so.1; docs/sglang.md,
# "CPU mode"), and there is no GPU memory to offload from or to.
_CUDA_ONLY_FLAGS = {"enable_memory_saver": "general.auto_cpu_offload or general.disk_swap",
                    "enable_weights_cpu_backup": "general.auto_cpu_offload",
                    "cpu_offload_gb": "general.max_cuda_memory_gib"}


def check_cli(model: ModelConfig, where: str, table: FlagTable, problems: Problems,
               general: GeneralConfig | None = None) -> None:

    if SHELL_EXPANSION_RE.search(model.cli):
        problems.add(where, "contains $VAR, $(...) or `...`, which nothing expands (no shell runs SGLang)",
                     "write the literal value")
        return
    try:
        tokens = shlex.split(model.cli)
    except ValueError as exc:
        problems.add(where, f"cannot be split into arguments ({exc})", "close the quote")
        return
    parsed, _ = table.parse_argv(tokens)
    for message in table.check_argv(tokens):
        problems.add(where, message)
    for spec, option, values in parsed:
        if spec.dest in schema.OWNED_FLAGS_IN_CLI:
            problems.add(where, f"sets {option}", schema.OWNED_FLAGS[spec.dest])
        if general is not None and general.device == "cpu" and spec.dest in _CUDA_ONLY_FLAGS:
            problems.add(where, f"sets {option}, which needs CUDA (SGLang's memory saver cannot run on the CPU)",
                         f"remove it for the CPU development mode; on GPUs use {_CUDA_ONLY_FLAGS[spec.dest]}")
        if spec.dest == "served_model_name" and values and model.endpoint_name and values[0] != model.endpoint_name:
            problems.add(where, f"--served-model-name {preview(values[0])} differs from endpoint_name "
                                f"{model.endpoint_name!r}", "keep one of them")
        elif spec.dest == "served_model_name" and values and not model.endpoint_name:
            check_endpoint_name(values[0], where + " --served-model-name", problems)


def check_lora_limits(lora: LoraConfig, model: ModelConfig, where: str, problems: Problems) -> None:
    max_loras = lora.max_loras if lora.max_loras is not None else 8  # SGLang's default max-loras-per-batch
    if lora.max_cpu_loras is not None:
        if lora.max_cpu_loras < max_loras:
            problems.add(f"{where}.max_cpu_loras", f"{lora.max_cpu_loras} is below max_loras ({max_loras})",
                         f"set max_cpu_loras to {max_loras} or more, or lower max_loras")
        if lora.max_cpu_loras < len(lora.modules):
            problems.add(f"{where}.max_cpu_loras", f"{lora.max_cpu_loras} is below the {len(lora.modules)} "
                         "modules loaded at start", f"set max_cpu_loras to {len(lora.modules)} or more")
    if not lora.modules and (lora.max_lora_rank is None or model.flag("lora-target-modules") is None):
        problems.add(f"{where}.modules", "LoRA is enabled without modules, so SGLang cannot infer the rank and "
                     "the target modules", "add modules, or set lora.max_lora_rank and the model's "
                     "lora-target-modules, e.g. [all], for adapters loaded later")


def check_on_request(lora: LoraConfig, model: ModelConfig, where: str, problems: Problems) -> None:
    """Adapters on request: LoRA on, one copy of the model (SGLang 0.5.23 refuses runtime loads into data-parallel
    replicas: docs/sglang.md, "LoRA"), room left beside the modules, and directories for the local source."""
    at = f"{where}.on_request"
    if model.cli:
        problems.add(at, "cannot apply to a model given as a raw CLI", "set the LoRA fields instead of `cli`")
        return
    if not lora.enable:
        problems.add(at, "is set but LoRA is off", "set lora.enable: true")
    if model.replicas > 1:
        problems.add(at, f"needs one copy of the model, not {model.replicas} replicas (SGLang cannot load an adapter "
                     "into data-parallel replicas at runtime)", "set replicas: 1, or list the adapters in modules")
    if lora.max_cpu_loras is not None and lora.max_cpu_loras <= len(lora.modules):
        problems.add(f"{where}.max_cpu_loras", f"{lora.max_cpu_loras} leaves no room for adapters on request beside "
                     f"the {len(lora.modules)} modules", f"set max_cpu_loras to {len(lora.modules) + 1} or more")
    if "local" in lora.on_request and not lora.on_request_dirs:
        problems.add(f"{where}.on_request_dirs", "is empty, so no local adapter could be loaded",
                     "list the directories that hold adapters, e.g. [/data/adapters]")
    for i, directory in enumerate(lora.on_request_dirs):
        if not directory.startswith("/"):
            problems.add(f"{where}.on_request_dirs[{i}]", f"{preview(directory)} is not an absolute path",
                         "write the directory from the root, e.g. /data/adapters")
        elif directory.rstrip("/") == "":
            problems.add(f"{where}.on_request_dirs[{i}]", "is the root directory, which would allow any path",
                         "name the directory that holds the adapters")


def check_tokens(tokens: tuple[str, ...], problems: Problems) -> None:
    """Each entry `TOKEN` or `NAME=TOKEN` (`app.keys.split_entry`): a token a header can carry, a name that is not
    `default`, every key its own name (an unnamed one is `token-<position>`) and its own token. A token's text is
    never in a message; its name may be."""
    first_by_name: dict[str, int] = {}
    first_by_token: dict[str, int] = {}
    for i, (entry, (name, token)) in enumerate(zip(tokens, named_tokens(tokens), strict=True)):
        where = f"auth.tokens[{i}]"
        given, _ = split_entry(entry)
        if given is None and "=" in entry.rstrip("="):
            problems.add(where, "has '=' inside, but the text before it is not a key name",
                         f"write NAME=TOKEN with a name of {KEY_NAME_FIX}; a token itself has no '=' but its "
                         "base64 padding")
            continue
        if given == DEFAULT:
            problems.add(where, f"names its key {DEFAULT!r}, which auth.limits keeps for every key without limits "
                         "of its own", "choose another name")
        _check_token(token, where, f"the token of {name!r} " if given else "", problems)
        if name in first_by_name:
            how = f"names its key {name!r}" if given else f"is unnamed, so its key is {name!r} (its position)"
            problems.add(where, f"{how}, already the name of auth.tokens[{first_by_name[name]}]'s key",
                         "give each key its own name (NAME=TOKEN)")
        else:
            first_by_name[name] = i
        if token in first_by_token:
            problems.add(where, f"holds the same token as auth.tokens[{first_by_token[token]}]", "remove the repeat")
        else:
            first_by_token[token] = i


def _check_token(token: str, where: str, subject: str, problems: Problems) -> None:
    if len(token) < MIN_TOKEN_CHARS:
        problems.add(where, f"{subject}is {len(token)} characters long; a token needs at least {MIN_TOKEN_CHARS}",
                     GENERATE_TOKEN_HINT)
    elif len(token) > MAX_TOKEN_CHARS:
        problems.add(where, f"{subject}is longer than {MAX_TOKEN_CHARS} characters", GENERATE_TOKEN_HINT)
    elif not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
        problems.add(where, f"{subject}contains spaces or characters a header cannot carry", GENERATE_TOKEN_HINT)
