"""Which architectures the installed SGLang runs, read from its own package without importing it.

SGLang's registry (`sglang/srt/models/registry.py`, `import_model_classes`) imports every module of
`sglang.srt.models` and maps the `__name__` of each module's `EntryClass` (one class or a list) to it: about 21 s on
this machine. The same names are in the modules' source: `EntryClass = Name` or `EntryClass = [A, B]`, where a name is
the class itself, an alias of it in the module (`A = B`) or a class imported under another name; each is followed to
the class's own name here. An architecture not among them is not refused by SGLang outright: its `_normalize_archs`
falls back to `TransformersForCausalLM` (the Transformers backend), which runs what the installed `transformers`
knows by its `model_type`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import re
from pathlib import Path

logger = logging.getLogger(__name__)


def models_dir() -> Path | None:
    """`sglang/srt/models` of the installed SGLang (found, not imported), or None where SGLang is not installed."""
    try:
        spec = importlib.util.find_spec("sglang")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "srt" / "models"
    return folder if folder.is_dir() else None


@functools.lru_cache(maxsize=4)
def sglang_architectures(folder: Path | None = None) -> frozenset[str] | None:
    """The architecture names SGLang's registry would hold (None: SGLang is not installed here)."""
    folder = folder or models_dir()
    if folder is None:
        return None
    names: set[str] = set()
    for module in sorted(folder.glob("*.py")):
        try:
            names.update(module_entry_classes(module.read_text(encoding="utf-8"), str(module)))
        except (OSError, SyntaxError, UnicodeDecodeError) as exc:  # (SGLang would skip it too, with a warning)
            logger.debug("Skipped %s: %s", module.name, exc)
    return frozenset(names)


# The usual shape, read by pattern: one `EntryClass = Name` (or a bracketed list of names) at a line's start, naming
# classes the module defines at its top level and binds no other way (no `Name = ...`, no `... as Name`).
_ENTRY = re.compile(r"^EntryClass[ \t]*=[ \t]*(\[[^\]]*\]|\([^)]*\)|[A-Za-z_]\w*)[ \t]*(?:#[^\n]*)?$", re.M)
_CLASS = re.compile(r"^class[ \t]+([A-Za-z_]\w*)", re.M)
_REBOUND = re.compile(r"^([A-Za-z_]\w*)[ \t]*=|\bas[ \t]+([A-Za-z_]\w*)", re.M)
_NAME = re.compile(r"[A-Za-z_]\w*")


def module_entry_classes(source: str, filename: str = "<module>") -> list[str]:
    """A module's entry classes: read by pattern where it has the usual shape (parsing all of SGLang's 255 model modules
    took 1.5 s of the pre-flight on this machine; the patterns a fifth of it), else by parsing it (`entry_classes`)."""
    if "EntryClass" not in source:
        return []
    found = _ENTRY.findall(source)
    if len(found) == 1:
        names = _NAME.findall(found[0])
        classes = set(_CLASS.findall(source))
        rebound = {assigned or imported for assigned, imported in _REBOUND.findall(source)}
        if names and all(name in classes and name not in rebound for name in names):
            return names
    return entry_classes(ast.parse(source, filename=filename))


def entry_classes(tree: ast.Module) -> list[str]:
    """The class names a module's `EntryClass` holds, each alias followed to the class's own name."""
    aliases: dict[str, str] = {}
    entry: ast.expr | None = None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
            if target == "EntryClass":
                entry = value
            elif isinstance(value, ast.Name):
                aliases[target] = value.id
    if entry is None:
        return []
    items = entry.elts if isinstance(entry, (ast.List, ast.Tuple)) else [entry]
    return [_follow(item.id, aliases) for item in items if isinstance(item, ast.Name)]


def _follow(name: str, aliases: dict[str, str]) -> str:
    seen = set()
    while name in aliases and name not in seen:
        seen.add(name)
        name = aliases[name]
    return name


def transformers_knows(model_type: str) -> bool | None:
    """The installed `transformers` has a configuration for this `model_type` (SGLang's fallback can then try it);
    None where transformers is not installed."""
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    except ImportError:
        return None
    return model_type in CONFIG_MAPPING_NAMES
