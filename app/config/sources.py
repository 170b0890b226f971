"""Where a config comes from, each read into one raw mapping: a YAML/JSON file, ClearML hyperparameters (every value
a string, as the UI edits them, or the app form's JSON lists), and `--set section.key=value` overrides. Nothing is
typed here (`app.config.parse` does that); only the shape of each source is checked.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from app.config import schema
from app.config.problems import Problems, did_you_mean
from app.config.schema import HYPERPARAMETER_SECTIONS, WIZARD_ENV_KEY, WIZARD_MODELS_KEY
from app.config.values import preview
from app.errors import ConfigError, Problem

# A config file larger than this is not a deployment config (the largest real ones are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024


_SECTION_BY_HYPERPARAMETER = {v.lower(): k for k, v in HYPERPARAMETER_SECTIONS.items()}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a raw mapping (not yet validated)."""
    where = f"config file {path}"
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(Problem(where, f"is {size} bytes; a config is at most {MAX_CONFIG_BYTES}",
                                      "point --config at the deployment's YAML or JSON file"))
        data = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(Problem(where, "does not exist", "check the path")) from None
    except IsADirectoryError:
        raise ConfigError(Problem(where, "is a folder", "point --config at a .yaml or .json file")) from None
    except OSError as exc:
        raise ConfigError(Problem(where, f"cannot be read ({exc.strerror})", "check its permissions")) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(Problem(where, f"is not UTF-8 text (byte {exc.start})", "save it as UTF-8")) from None
    return parse_config_text(text, where)


def parse_config_text(text: str, where: str = "config") -> dict[str, Any]:
    try:
        # Exported files are JSON: read them with JSON's own rules (YAML 1.1 would take 1e-05 for text).
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        data = _parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(where, f"holds a {type(data).__name__}, not a mapping",
                                  "start the file with keys such as `models:`"))
    return data


def _parse_yaml(text: str, where: str) -> Any:
    try:
        # SafeLoader builds no objects from tags.
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "is not valid YAML or JSON"
        raise ConfigError(Problem(where, f"{problem}{at}", "fix the syntax")) from None
    except RecursionError:
        raise ConfigError(Problem(where, "is nested too deeply", "a config is a few levels deep")) from None


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values are strings, parsed later through the schema).

    `models.0.gpus=2` and `models[0].gpus=2` address a model; the next free index adds one; `env.NAME=value`
    sets a variable.
    """
    result = copy.deepcopy(dict(raw))
    problems = Problems()
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.add("--set", f"{preview(override)} is not section.key=value",
                         "e.g. --set general.max-running-requests=64")
            continue
        parts = [p for p in re.split(r"\.|\[(\d+)\]\.?", key) if p]
        if parts[0] not in schema.TOP_LEVEL_KEYS:
            problems.add(f"--set {preview(key)}", f"unknown section {preview(parts[0])}",
                         did_you_mean(parts[0], schema.TOP_LEVEL_KEYS) or
                         "sections: " + ", ".join(schema.TOP_LEVEL_KEYS))
            continue
        found = _override_target(result, parts, f"--set {preview(key)}", problems)
        if found is None:
            continue
        target, path = found
        for part in path[:-1]:
            nxt = target.setdefault(part, {}) if isinstance(target, dict) else None
            if not isinstance(nxt, dict):
                problems.add(f"--set {preview(key)}", f"{preview(part)} is not a section", "check the key")
                break
            target = nxt
        else:
            if isinstance(target, dict):
                target[path[-1]] = value
            else:
                problems.add(f"--set {preview(key)}", "does not name a setting", "check the key")
    problems.raise_if_any()
    return result


def _override_target(result: dict[str, Any], parts: list[str], where: str,
                     problems: Problems) -> tuple[Any, list[str]] | None:
    """Where an override's key lands: a model's mapping (added when the key names the next free index) and the
    rest of the key, or the whole config and the key; None when the key cannot name a setting (said in problems)."""
    if parts[0] != "models":
        return result, parts
    if len(parts) < 3 or not parts[1].isdigit():
        problems.add(where, "a model setting needs the model's number", "e.g. --set models.0.gpus=2")
        return None
    models = result.setdefault("models", [])
    if not isinstance(models, list):
        problems.add("models", "is not a list", "write models as a list of mappings")
        return None
    index = int(parts[1])
    if index > len(models):
        problems.add(where, f"there is no model {index - 1} yet",
                     f"number models from 0; the next one is {len(models)}")
        return None
    if index == len(models):
        models.append({})
    return models[index], parts[2:]


def raw_from_hyperparameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A raw mapping from a ClearML task's hyperparameters ("Section/key" -> string).

    Sections the app does not own (Args, properties, ...) are left alone. Models are numbered keys in the
    `Models` section: `Models/0/model`, `Models/0/lora/enable`.
    """
    raw: dict[str, Any] = {}
    models: dict[int, dict[str, Any]] = {}
    problems = Problems()
    for name, value in params.items():
        section_name, sep, rest = str(name).partition("/")
        section = _SECTION_BY_HYPERPARAMETER.get(section_name.lower())
        if section is None or not sep or not rest:
            continue
        if section == "models" and rest == WIZARD_MODELS_KEY:
            raw["models"] = _wizard_models(value, problems)
            continue
        if section == "env" and rest == WIZARD_ENV_KEY:
            raw.setdefault("env", {}).update(_wizard_env(value, problems))
            continue
        if section == "models":
            index, sep2, key = rest.partition("/")
            if not index.isdigit() or not sep2 or not key:
                problems.add(f"hyperparameter {preview(name)}", "is not Models/<number>/<key>",
                             "e.g. Models/0/model")
                continue
            target = models.setdefault(int(index), {})
            *subsections, leaf = key.split("/")
            for sub in subsections:
                target = target.setdefault(sub, {})
            target[leaf] = value
        else:
            raw.setdefault(section, {})[rest] = value
    if models and "models" in raw:
        problems.add(f"hyperparameter Models/{WIZARD_MODELS_KEY}", "is set together with numbered Models/<n>/... keys",
                     "keep one of them: the app form writes Models/models, a cloned task Models/<n>/...")
    elif models:
        if sorted(models) != list(range(len(models))):
            problems.add("hyperparameters Models/<number>/...", "model numbers must run 0, 1, 2, … without gaps",
                         "renumber the Models keys")
        raw["models"] = [models[i] for i in sorted(models)]
    problems.raise_if_any()
    return raw


def _wizard_models(value: Any, problems: Problems) -> Any:
    """The app form's models list: one JSON hyperparameter, items keyed like the config file (`lora.enable`)."""
    where = f"hyperparameter Models/{WIZARD_MODELS_KEY}"
    try:
        items = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as exc:
        problems.add(where, f"is not JSON ({exc.msg})", "the form writes a JSON list of models")
        return []
    if not isinstance(items, list):
        problems.add(where, "is not a list", "the form writes a JSON list of models")
        return []
    out = []
    for item in items:
        if not isinstance(item, dict):
            out.append(item)  # parse_config says what is wrong with it
            continue
        model: dict[str, Any] = {}
        for key, val in item.items():
            head, dot, tail = str(key).partition(".")
            if dot:
                model.setdefault(head, {})[tail] = val
            else:
                model[key] = val
        out.append(model)
    return out


def _wizard_env(value: Any, problems: Problems) -> dict[str, Any]:
    where = f"hyperparameter Environment/{WIZARD_ENV_KEY}"
    try:
        items = json.loads(value) if isinstance(value, str) and value.strip() else value or []
    except json.JSONDecodeError as exc:
        problems.add(where, f"is not JSON ({exc.msg})", 'the form writes [{"name": ..., "value": ...}]')
        return {}
    if not isinstance(items, list) or not all(isinstance(i, dict) and "name" in i for i in items):
        problems.add(where, "is not a list of {name, value}", 'the form writes [{"name": ..., "value": ...}]')
        return {}
    return {str(i["name"]): i.get("value", "") for i in items}
