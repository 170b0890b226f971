"""References to adapters loaded on request: which source a reference names (`source_of`, pure: refused before
anything is looked up or fetched), and which adapter it is (`identify`: a local one looked up on disk).

    clearml   32 hex characters              a ClearML Model ID, fetched through the model registry
    hf        org/name                       a HuggingFace repo: its adapter files only, into the HF cache
    local     /abs/path, or a folder's name  a directory inside one of `lora.on_request_dirs`: the path as written
                                             must be inside one, and so must the directory it leads to

An adapter is one adapter however it is spelled: `/dir/one`, `/dir//one/`, `/dir/../dir/one` and `one` are one
`Identity` (a local one's key is its directory's real path), with one name: the folder's where that name finds it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from app.config.types import CLEARML_MODEL_ID, LoraConfig
from app.gateway.adapters import AdapterRefused, Refusal
from app.serving.models import is_hf_repo

CLEARML, HF, LOCAL = "clearml", "hf", "local"
_SOURCE_TEXT = {CLEARML: "ClearML Model IDs", HF: "HuggingFace repos", LOCAL: "the adapter directories"}
MAX_REFERENCE_CHARS = 1024
# An adapter's own name inside an adapter directory.
_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


@dataclass(frozen=True)
class Source:
    kind: str  # clearml | hf | local
    location: str  # the Model ID, the repo name, or the local reference (an absolute path normalized as written)


@dataclass(frozen=True)
class Identity:
    """What makes references one adapter (`key`), the name it is loaded and listed under, and a local one's
    directory (others are fetched)."""

    key: str
    name: str
    path: str | None = None


def source_of(reference: str, endpoint: str, lora: LoraConfig) -> Source:
    """Where an adapter reference is loaded from, or AdapterRefused saying why it is not: not a reference, a source
    this model does not load on request, or a path written outside the adapter directories. Nothing on disk is looked
    at: whatever is outside is refused alike, whether it exists or not."""
    shown = reference[:200]
    kind = _kind(reference)
    if kind is None:
        raise AdapterRefused(Refusal.NOT_A_REFERENCE, f"{shown!r} is not an adapter reference: use a ClearML Model "
                             "ID, an HF repo (org/name) or an adapter directory's path")
    allowed = lora.on_request
    if kind not in allowed:
        named = ", ".join(m.name for m in lora.modules) or "none"
        if kind == LOCAL and not reference.startswith("/"):  # a bare name: most likely a configured adapter mistyped
            raise AdapterRefused(Refusal.NO_SUCH_MODEL,
                                 f"The model {endpoint}:{shown} does not exist: {endpoint!r} has the adapters {named}")
        raise AdapterRefused(Refusal.SOURCE_NOT_ALLOWED, f"{endpoint!r} does not load adapters from "
                             f"{_SOURCE_TEXT[kind]} on request (it loads from: "
                             f"{', '.join(_SOURCE_TEXT[k] for k in allowed)})")
    if kind == LOCAL:
        return Source(LOCAL, _written_inside(reference, lora.on_request_dirs))
    return Source(kind, reference.lower() if kind == CLEARML else reference)


def _kind(reference: str) -> str | None:
    """The source a reference names by its shape, or None when it is no reference at all."""
    if not reference or len(reference) > MAX_REFERENCE_CHARS or reference != reference.strip() or \
            any(c.isspace() or not c.isprintable() for c in reference):
        return None
    if CLEARML_MODEL_ID.match(reference):
        return CLEARML
    if reference.startswith("/") or _FOLDER_RE.match(reference):
        return LOCAL
    if "/" in reference and is_hf_repo(reference):  # (an adapter's repo always has its owner: org/name)
        return HF
    return None


def _normalized(path: str) -> str:
    """A path with `.`, `..` and doubled slashes folded as written (nothing resolved on disk)."""
    return "/" + os.path.normpath(path).lstrip("/")


def _written_inside(reference: str, directories: Iterable[str]) -> str:
    """An absolute reference must be written strictly inside an adapter directory, `..` and all (a folder's name is
    looked up in each of them later)."""
    if not reference.startswith("/"):
        return reference
    written = _normalized(reference)
    for directory in directories:
        root = _normalized(directory)
        if written.startswith(root.rstrip("/") + "/"):
            return written
    raise AdapterRefused(Refusal.PATH_NOT_ALLOWED, f"{reference[:200]!r} is outside the adapter directories this "
                         "model loads from (lora.on_request_dirs)")


def identify(source: Source, lora: LoraConfig) -> Identity:
    """The adapter a source names. A local one is looked up on disk (blocking): its directory, symlinks resolved,
    must be inside an adapter directory, resolved too."""
    if source.kind != LOCAL:
        key = source.location if source.kind == CLEARML else source.location.lower()
        return Identity(f"{source.kind}:{key}", source.location)
    roots = [(os.path.realpath(d), d) for d in lora.on_request_dirs]
    path = _local_directory(source.location, roots)
    return Identity(f"{LOCAL}:{path}", _local_name(path, roots), path)


def _inside(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _find(name: str, roots: list[tuple[str, str]]) -> str | None:
    """A folder's name looked up in each adapter directory in turn: the first directory found, resolved."""
    for real_root, _ in roots:
        real = os.path.realpath(os.path.join(real_root, name))
        if _inside(real, real_root) and os.path.isdir(real):
            return real
    return None


def _local_directory(location: str, roots: list[tuple[str, str]]) -> str:
    if location.startswith("/"):
        real = os.path.realpath(location)
        if not any(_inside(real, real_root) for real_root, _ in roots):
            raise AdapterRefused(Refusal.PATH_NOT_ALLOWED, f"{location[:200]!r} is outside the adapter directories "
                                 "this model loads from (lora.on_request_dirs)")
        found = real if os.path.isdir(real) else None
    else:
        found = _find(location, roots)
    if found is None:
        raise AdapterRefused(Refusal.NOT_FOUND, f"No adapter {location[:200]!r} in the adapter directories")
    return found


def _local_name(path: str, roots: list[tuple[str, str]]) -> str:
    """The name a local adapter is loaded and listed under, however it was asked for: its folder's name where that
    name finds it, else its path under the first adapter directory that holds it, as that directory is written."""
    name = os.path.basename(path)
    if _FOLDER_RE.match(name) and _find(name, roots) == path:
        return name
    real_root, written = next(r for r in roots if _inside(path, r[0]))
    return os.path.join(_normalized(written), os.path.relpath(path, real_root))
