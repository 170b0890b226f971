"""The package tree is the architecture: imports flow one way, no module grows past what a reader takes in.

Layers (a package may import the ones listed for it, and `app/constants.py`, `app/errors.py`, `app/keys.py`,
`app/states.py`, `app/statistics.py`):
config (the schema, its sources and SGLang's flag table) → sglang (its commands, API, router, CPU mode) → serving
(plan, engines, residency, deployment), which wires the gateway (which imports none of them); preflight reads a
config and its resolved models (serving's) before any of it runs; clearml at the side,
reading the config and the report snapshot serving produces, nothing else; `app/run.py` composes them; `app/cli.py`
on top. No cycles, not even among imports made only for type checking.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent.parent / "app"
BASE = {"constants", "errors", "keys", "states", "statistics", "__init__"}
ALLOWED = {
    "config": set(),
    "sglang": {"config"},
    "gateway": set(),
    "serving": {"config", "sglang", "gateway"},
    "clearml": {"config", "serving"},
    "demo": {"config"},
    "preflight": {"config", "sglang", "serving"},
    "run": {"config", "sglang", "gateway", "serving", "clearml", "demo", "preflight"},
    "cli": {"config", "sglang", "gateway", "serving", "clearml", "demo", "run", "preflight"},
    "__main__": {"cli"},
}
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES, MAX_CONSTRUCTOR_PARAMETERS = 400, 50, 200, 8


def modules() -> list[Path]:
    return [p for p in sorted(APP.rglob("*.py")) if "cpu_shim" not in p.parts]


def layer(module: str) -> str:
    """`app.serving.plan` -> serving; `app.constants` -> constants."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, *, typing: bool = False) -> set[str]:
    """The app modules a module imports when it runs (with `typing`, also those `if TYPE_CHECKING:` guards)."""
    tree = ast.parse(path.read_text())
    guarded = set() if typing else {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body for n in ast.walk(child)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "app":
            for alias in node.names:  # `from app.gateway import routes`: the submodule, where it is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _module_path(sub) is not None else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "app"}
    return found


def _module_path(module: str) -> Path | None:
    base = APP.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def name_of(path: Path) -> str:
    return ".".join(path.relative_to(APP.parent).with_suffix("").parts).removesuffix(".__init__")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(APP)))
def test_imports_flow_one_way(path):
    source = layer(name_of(path))
    for target in imports(path):
        to = layer(target)
        if to in BASE or to == source or source in BASE and to in BASE:
            continue
        assert to in ALLOWED.get(source, set()), f"{name_of(path)} imports {target}: {source} may not import {to}"


# What the ClearML side reads of serving: the report's frozen values, nothing that runs.
CLEARML_READS = {"app.serving.report"}


@pytest.mark.parametrize("path", [p for p in modules() if layer(name_of(p)) == "clearml"],
                         ids=lambda p: str(p.relative_to(APP)))
def test_clearml_reads_only_the_report_and_the_config(path):
    for target in imports(path):
        if layer(target) in ("serving", "sglang", "gateway"):
            assert target in CLEARML_READS, f"{name_of(path)} imports {target}: clearml reads only {CLEARML_READS}"


def test_the_report_is_made_of_plain_values():
    """`app.serving.report` imports only the base modules: a reporter that reads it pulls in nothing of serving."""
    path = APP / "serving" / "report.py"
    assert all(layer(target) in BASE for target in imports(path)), imports(path)


def test_no_import_cycles():
    """Not even through imports made only for type checking: two modules that need each other are one design."""
    graph = {name_of(p): {t for t in imports(p, typing=True) if _module_path(t) is not None} for p in modules()}
    for module in graph:  # importing a submodule runs its package's __init__ first, not the other way round
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target):], target]))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(APP)))
def test_modules_functions_and_classes_stay_readable(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.name}: {text.count(chr(10))} lines"
    for node in ast.walk(ast.parse(text)):
        size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert size <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} is {size} lines"
            if node.name == "__init__":
                count = len(node.args.posonlyargs) + len(node.args.args) - 1 + len(node.args.kwonlyargs)
                assert count <= MAX_CONSTRUCTOR_PARAMETERS, f"{path.name}:{node.lineno}: __init__ takes {count}"
        elif isinstance(node, ast.ClassDef):
            assert size <= MAX_CLASS_LINES, f"{path.name}: class {node.name} is {size} lines"


def test_the_architecture_page_maps_every_module():
    section = (APP.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for path in modules():
        rel = path.relative_to(APP)
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            assert f"`app/{rel.parent}/`" in section, f"docs/architecture.md does not name app/{rel.parent}/"
        elif len(rel.parts) == 1:
            assert f"app/{rel.name}" in section, f"docs/architecture.md does not name app/{rel.name}"
        else:
            assert f"`{rel.name}`" in section or f"`app/{rel}`" in section, f"docs/architecture.md: no {rel}"
