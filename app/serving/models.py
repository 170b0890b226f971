"""Model resolution: what each configured model and LoRA adapter becomes on the engine's command line.

A reference is one of three things, told apart by its shape:
    ClearML Model ID   32 hex characters          -> the SDK's local copy (downloaded, with progress)
    local path         /abs, ./rel, ~/x, or exists -> checked to exist, made absolute
    HuggingFace name   org/name or name            -> handed to SGLang, which downloads it (HF_TOKEN in its env)

`describe` does what `clearml-sglang args` needs: nothing is fetched, local paths are checked. `resolve` does
what `run` needs: ClearML models are fetched through the registry it is given (the ClearML adapter, or a fake in
tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.config.flags import FlagTable
from app.config.types import CLEARML_MODEL_ID, DeploymentConfig, LoraModule
from app.errors import ModelNotFound, ModelResolutionError, Problem
from app.sglang.parsers import NONE, Parsers, chat_template_of, choose_parsers

logger = logging.getLogger(__name__)

CLEARML, HUGGINGFACE, LOCAL_PATH = "clearml", "huggingface", "path"

# HuggingFace repo ids: `name` or `org/name`, letters, digits, '-', '_', '.'; no '--' or '..' (hub rules).
_HF_REPO_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class ModelRegistry(Protocol):
    """Where ClearML Model IDs are looked up and downloaded (`app.clearml.task.ClearMLModelRegistry`)."""

    def get_local_copy(self, model_id: str) -> str:
        """A local path holding the model's files; raises ModelNotFound or OSError."""
        ...


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to be put on an engine's command line."""

    endpoint: str
    model_path: str
    source: str
    lora_modules: tuple[LoraModule, ...] = ()
    parsers: Parsers = NONE  # its family's tool-call and reasoning parsers, where its files say it (`model_parsers`)
    # What its files say of its size, where they are here (a local folder, the local HuggingFace cache): its
    # config.json, and its weights' bytes on disk (the CPU's KV pool is sized from them, `app.sglang.pool`)
    config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    weights_bytes: int = 0


def classify(reference: str) -> str:
    """Which kind of reference this is: CLEARML, LOCAL_PATH or HUGGINGFACE (raises ValueError if none)."""
    if CLEARML_MODEL_ID.match(reference):
        return CLEARML
    if reference.startswith(("/", "./", "../", "~", ".\\")) or reference in (".", "..") or \
            os.path.exists(os.path.expanduser(reference)):
        return LOCAL_PATH
    if is_hf_repo(reference):
        return HUGGINGFACE
    raise ValueError(reference)


def is_hf_repo(reference: str) -> bool:
    """A HuggingFace repo id by the hub's rules: `name` or `org/name`, no `--` or `..`."""
    return bool(_HF_REPO_RE.match(reference)) and "--" not in reference and ".." not in reference


def describe(config: DeploymentConfig) -> list[ResolvedModel]:
    """Resolve without fetching: ClearML IDs and HF names stay as given, local paths are checked."""
    return _resolve_all(config, registry=None)


def resolve(config: DeploymentConfig, registry: ModelRegistry) -> list[ResolvedModel]:
    """Resolve for a launch: ClearML models are fetched to local copies through `registry`."""
    return _resolve_all(config, registry=registry)


def _resolve_all(config: DeploymentConfig, registry: ModelRegistry | None) -> list[ResolvedModel]:
    problems: list[Problem] = []
    resolved: list[ResolvedModel] = []
    for i, model in enumerate(config.models):
        where = f"models[{i}]"
        path = _resolve_one(model.model, f"{where}.model", registry, problems)
        modules = []
        if model.lora.enable and not model.cli:
            for j, module in enumerate(model.lora.modules):
                module_path = _resolve_one(module.path, f"{where}.lora.modules[{j}]", registry, problems)
                if module_path is not None:
                    modules.append(LoraModule(module.name, module_path))
        if path is not None:
            folder = local_folder(path)
            files = json_object(folder / "config.json") if folder else None
            resolved.append(ResolvedModel(model.endpoint, path, classify(model.model), tuple(modules),
                                          model_parsers(folder, files, model.model), files,
                                          _weights_on_disk(folder) if folder else 0))
    if problems:
        raise ModelResolutionError(problems)
    return resolved


def local_folder(path: str) -> Path | None:
    """Where a model's files are on this machine without fetching anything: a local folder, or the local HuggingFace
    cache's snapshot of a name (None: neither)."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(path, "config.json") if is_hf_repo(path) else None
    return Path(cached).parent if isinstance(cached, str) else None


def model_parsers(folder: Path | None, config: dict[str, Any] | None, reference: str) -> Parsers:
    """The parsers its family gets (`app.sglang.parsers`), from its config.json and its chat template, read from its
    files here (`local_folder`)."""
    if folder is None or config is None:
        return NONE
    tokenizer = json_object(folder / "tokenizer_config.json")
    template = folder / "chat_template.jinja"
    table = FlagTable.load()
    return choose_parsers(config, chat_template_of(tokenizer, _text(template)),
                          reference, tool_choices=frozenset(table.lookup_key("tool-call-parser").choices or ()),
                          reasoning_choices=frozenset(table.lookup_key("reasoning-parser").choices or ()))


def _weights_on_disk(folder: Path) -> int:
    """The bytes of a model's safetensors files (the cache's links followed)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        try:
            total += file.stat().st_size
        except OSError:
            continue
    return total


# Largest model metadata file read (config.json, tokenizer_config.json: kilobytes to a few megabytes); a larger one is
# not read, as one that is not there.
MAX_METADATA_BYTES = 16 * 1024 * 1024


def _text(path: Path, max_bytes: int = MAX_METADATA_BYTES) -> str | None:
    """A metadata text file (a chat template), or None where it cannot be read as such."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return None


def json_object(path: Path, max_bytes: int = MAX_METADATA_BYTES) -> dict[str, Any] | None:
    """A metadata file's JSON object (None: missing, larger than `max_bytes`, not JSON, nested past the parser's
    depth, or not an object)."""
    try:
        if path.stat().st_size > max_bytes:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _resolve_one(reference: str, where: str, registry: ModelRegistry | None, problems: list[Problem]) -> str | None:
    try:
        kind = classify(reference)
    except ValueError:
        problems.append(Problem(where, f"{reference[:60]!r} is neither a HuggingFace name, a ClearML Model ID "
                                       "nor an existing path",
                                "use org/name, 32 hex characters, or a path starting with / or ./"))
        return None
    if kind == HUGGINGFACE:
        return reference
    if kind == LOCAL_PATH:
        path = Path(os.path.expanduser(reference)).absolute()
        if not path.exists():
            problems.append(Problem(where, f"path {str(path)[:200]!r} does not exist",
                                    "check the path on the machine that runs the deployment"))
            return None
        return str(path)
    model_id = reference.lower()
    if registry is None:
        return model_id
    logger.info("Fetching ClearML model %s", model_id)
    try:
        local = registry.get_local_copy(model_id)
    except ModelNotFound as exc:
        problems.append(Problem(where, f"ClearML model {model_id} was not found ({exc})",
                                "check the Model ID in the ClearML web UI (Models tab)"))
        return None
    except OSError as exc:
        problems.append(Problem(where, f"ClearML model {model_id} could not be downloaded ({exc.strerror or exc})",
                                "check the storage credentials in clearml.conf and the free disk space"))
        return None
    logger.info("ClearML model %s is at %s", model_id, local)
    return local
