"""Loading and validating a configuration: the one edge where user input becomes a DeploymentConfig.

Three sources, one path: a YAML/JSON file, ClearML hyperparameters (every value a string, as the UI edits them)
and `--set section.key=value` overrides all become one raw mapping, and `parse_config` turns that mapping into a
frozen `DeploymentConfig` or raises a `ConfigError` listing every problem, each as `field: problem (fix)`.
Values of secret fields never appear in a message.

Example::

    config = load_config("deploy.yaml", overrides=["general.max-running-requests=64"])
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from app.config import schema
from app.config.schema import BOOL, CHOICE, FLOAT, INT, LIST, STR, Field
from app.config.types import (
    AuthConfig,
    DeploymentConfig,
    GeneralConfig,
    IdleConfig,
    InstanceConfig,
    LoraConfig,
    LoraModule,
    ModelConfig,
    derive_endpoint_name,
)
from app.errors import ConfigError, Problem
from app.sglang_flags import (
    FlagSpec,
    FlagTable,
    FlagValueError,
    parse_bool,
    parse_float,
    parse_int,
    parse_list,
    preview,
)

# A config file larger than this is not a deployment config (the largest real ones are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024
# Longest single text value (a CLI, a chat template path, an env value).
MAX_TEXT_CHARS = 64 * 1024
MAX_MODELS = 64
MAX_ENV_VARS = 512
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512

ENDPOINT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
LORA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
# $VAR, ${VAR}, $(cmd) and `cmd`: nothing expands them, since no shell runs the command line.
SHELL_EXPANSION_RE = re.compile(r"\$[({A-Za-z_]|`")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")

# The hyperparameter sections of a ClearML task, by config section.
HYPERPARAMETER_SECTIONS = {
    "instance": "Instance",
    "models": "Models",
    "general": "General",
    "env": "Environment",
    "idle": "Idle",
    "auth": "Auth",
}
_SECTION_BY_HYPERPARAMETER = {v.lower(): k for k, v in HYPERPARAMETER_SECTIONS.items()}
# The app form's lists (wizard `list` entries) are one JSON hyperparameter each: Models/models, a list of models
# keyed like the config file ("lora.enable"), and Environment/variables, a list of {"name", "value"}.
WIZARD_MODELS_KEY = "models"
WIZARD_ENV_KEY = "variables"

GENERATE_TOKEN_HINT = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class _Problems:
    """Collects problems; every check adds to it and goes on, so the user sees them all at once."""

    def __init__(self) -> None:
        self.items: list[Problem] = []

    def add(self, field: str, problem: str, fix: str = "") -> None:
        self.items.append(Problem(field, problem, fix))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


# ----------------------------------------------------------------------------------------------------------
# sources -> raw mapping


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
    problems = _Problems()
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
                         _did_you_mean(parts[0], schema.TOP_LEVEL_KEYS) or
                         "sections: " + ", ".join(schema.TOP_LEVEL_KEYS))
            continue
        if parts[0] == "models":
            if len(parts) < 3 or not parts[1].isdigit():
                problems.add(f"--set {preview(key)}", "a model setting needs the model's number",
                             "e.g. --set models.0.gpus=2")
                continue
            models = result.setdefault("models", [])
            if not isinstance(models, list):
                problems.add("models", "is not a list", "write models as a list of mappings")
                continue
            index = int(parts[1])
            if index > len(models):
                problems.add(f"--set {preview(key)}", f"there is no model {index - 1} yet",
                             f"number models from 0; the next one is {len(models)}")
                continue
            if index == len(models):
                models.append({})
            target, path = models[index], parts[2:]
        else:
            target, path = result, parts
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


def raw_from_hyperparameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """A raw mapping from a ClearML task's hyperparameters ("Section/key" -> string).

    Sections the app does not own (Args, properties, ...) are left alone. Models are numbered keys in the
    `Models` section: `Models/0/model`, `Models/0/lora/enable`.
    """
    raw: dict[str, Any] = {}
    models: dict[int, dict[str, Any]] = {}
    problems = _Problems()
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


def _wizard_models(value: Any, problems: _Problems) -> Any:
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


def _wizard_env(value: Any, problems: _Problems) -> dict[str, Any]:
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


def load_config(
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    hyperparameters: Mapping[str, Any] | None = None,
    flag_table: FlagTable | None = None,
) -> DeploymentConfig:
    """Read, merge and validate: file (or hyperparameters), then overrides, then the schema."""
    raw: dict[str, Any] = {}
    if hyperparameters is not None:
        raw = raw_from_hyperparameters(hyperparameters)
    if config_path is not None:
        raw = read_config_file(config_path)
    raw = apply_overrides(raw, overrides)
    return parse_config(raw, flag_table=flag_table)


# ----------------------------------------------------------------------------------------------------------
# raw mapping -> DeploymentConfig


def parse_config(raw: Any, flag_table: FlagTable | None = None) -> DeploymentConfig:
    """Validate a raw mapping and build the config; raise ConfigError with every problem."""
    table = flag_table or FlagTable.load()
    problems = _Problems()
    if not isinstance(raw, Mapping):
        problems.add("config", f"is a {type(raw).__name__}, not a mapping", "start with keys such as `models:`")
        problems.raise_if_any()
    for key in raw:
        if key not in schema.TOP_LEVEL_KEYS:
            problems.add(_key_text(key), "is not a section of the config",
                         _did_you_mean(str(key), schema.TOP_LEVEL_KEYS) or
                         "sections: " + ", ".join(schema.TOP_LEVEL_KEYS))

    instance = InstanceConfig(**_parse_fields(raw.get("instance"), "instance", schema.INSTANCE_FIELDS, problems))
    general = _parse_general(raw.get("general"), table, problems)
    models = _parse_models(raw.get("models"), general, table, problems)
    env = _parse_env(raw.get("env"), problems)
    idle = IdleConfig(**_parse_fields(raw.get("idle"), "idle", schema.IDLE_FIELDS, problems))
    auth_values = _parse_fields(raw.get("auth"), "auth", schema.AUTH_FIELDS, problems)
    _check_tokens(auth_values.get("tokens", ()), problems)
    _check_text_fields(instance, problems)
    problems.raise_if_any()
    return DeploymentConfig(models=tuple(models), instance=instance, general=general, env=env, idle=idle,
                            auth=AuthConfig(**auth_values))


def _section_mapping(value: Any, where: str, problems: _Problems) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        problems.add(where, f"is a {type(value).__name__}, not a mapping", f"write {where} as key: value lines")
        return {}
    return value


def _parse_fields(
    section: Any,
    where: str,
    fields: tuple[Field, ...],
    problems: _Problems,
    *,
    extra: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Coerce a section's app fields; hand other keys to `extra` (SGLang flags) or report them unknown."""
    mapping = _section_mapping(section, where, problems)
    by_key = {f.key: f for f in fields if not f.is_flag}
    values: dict[str, Any] = {f.key: _default(f) for f in by_key.values()}
    for key, value in mapping.items():
        f = by_key.get(key) if isinstance(key, str) else None
        if f is not None:
            values[key] = _coerce_field(f, value, f"{where}.{key}", problems)
        elif extra is not None and isinstance(key, str):
            extra(key, value)
        else:
            problems.add(f"{where}.{_key_text(key)}", "is not a setting of this section",
                         _did_you_mean(str(key), list(by_key)) or "settings: " + ", ".join(by_key))
    return values


def _default(f: Field) -> Any:
    return tuple(f.default) if isinstance(f.default, (list, tuple)) else f.default


def _coerce_field(f: Field, value: Any, where: str, problems: _Problems) -> Any:
    """One app field's value, or its default after reporting the problem."""
    if value is None or (isinstance(value, str) and not value.strip() and f.type != STR):
        return _default(f)
    try:
        if f.type == STR:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise FlagValueError(f"takes text, not a {type(value).__name__}")
            result: Any = str(value).strip()
            _check_text(result, allow_newlines=f.key == "cli")
        elif f.type == BOOL:
            result = parse_bool(value)
        elif f.type == INT:
            result = parse_int(value)
        elif f.type == FLOAT:
            result = parse_float(value)
        elif f.type == LIST:
            items = parse_list(value)
            for item in items:
                if not isinstance(item, str):
                    raise FlagValueError(f"takes a list of text, not of {type(item).__name__}")
                _check_text(item, allow_newlines=False)
            result = tuple(item.strip() for item in items if item.strip())
        elif f.type == CHOICE:
            result = value.strip() if isinstance(value, str) else value
            if result not in (f.choices or ()):
                raise FlagValueError("is not one of the choices")
        else:  # pragma: no cover - a schema typo, caught by the schema tests
            raise AssertionError(f.type)
    except FlagValueError as exc:
        problems.add(where, str(exc) if f.secret else f"{preview(value)} {exc}", _field_fix(f))
        return _default(f)
    if not _within_bounds(f, result):
        problems.add(where, f"{_num(result)} is not supported" if f.bound_fix else f"{_num(result)} is out of range",
                     f.bound_fix or _bounds_text(f))
        return _default(f)
    return result


def _within_bounds(f: Field, value: Any) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    if f.minimum is not None and value < f.minimum:
        return False
    return not (f.maximum is not None and value > f.maximum)


def _bounds_text(f: Field) -> str:
    if f.minimum is not None and f.maximum is not None:
        return f"use a value from {_num(f.minimum)} to {_num(f.maximum)}"
    if f.minimum is not None:
        return f"use {_num(f.minimum)} or more"
    return f"use at most {_num(f.maximum)}"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


def _field_fix(f: Field) -> str:
    if f.type == BOOL:
        return "write true or false"
    if f.type == INT:
        return _bounds_text(f) if f.minimum is not None or f.maximum is not None else "write a whole number"
    if f.type == FLOAT:
        return _bounds_text(f) if f.minimum is not None or f.maximum is not None else "write a number"
    if f.type == CHOICE:
        return "choose one of: " + ", ".join(str(c) for c in f.choices or ())
    if f.type == LIST:
        return "write a list, or items separated by commas"
    return "write plain UTF-8 text on one line"


def _check_text(text: str, *, allow_newlines: bool) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise FlagValueError("is not valid UTF-8 text") from None
    if len(text) > MAX_TEXT_CHARS:
        raise FlagValueError(f"is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted")
    bad = _CONTROL_RE.search(text if allow_newlines else text.replace("\t", " "))
    if bad or (not allow_newlines and "\n" in text):
        raise FlagValueError("contains a control character (a new line, NUL, ...)")


def _check_text_fields(instance: InstanceConfig, problems: _Problems) -> None:
    for key in ("name", "project"):
        if not getattr(instance, key):
            problems.add(f"instance.{key}", "must not be empty", "give it a name")


# ----- general -----


def _parse_general(section: Any, table: FlagTable, problems: _Problems) -> GeneralConfig:
    flags: dict[str, Any] = {}
    named = {f.key: f for f in schema.GENERAL_FIELDS if f.is_flag}

    def extra(key: str, value: Any) -> None:
        _parse_flag(key, value, f"general.{key}", named.get(key), table, flags, problems,
                    app_keys=[f.key for f in schema.GENERAL_FIELDS])

    values = _parse_fields(section, "general", schema.GENERAL_FIELDS, problems, extra=extra)
    if values["auto_cpu_offload"] and values["disk_swap"]:
        problems.add("general.disk_swap", "cannot be on together with auto_cpu_offload",
                     "choose one: CPU offloading keeps models in RAM, disk swapping reloads them from disk")
    if values["device"] == "cpu":
        for key in ("auto_cpu_offload", "disk_swap"):
            if values[key]:
                problems.add(f"general.{key}", "does not work with device cpu (SGLang's memory saver needs CUDA)",
                             f"turn {key} off for the CPU development mode")
        if values["max_cuda_memory_gib"]:
            problems.add("general.max_cuda_memory_gib", "has no meaning with device cpu", "set it to 0")
    token = values["hf_token"]
    if token and (any(c.isspace() for c in token) or not token.isascii()):
        problems.add("general.hf_token", "contains spaces or non-ASCII characters",
                     "paste the token exactly as HuggingFace shows it")
    values["flags"] = tuple(sorted(flags.items()))
    return GeneralConfig(**values)


def _parse_flag(
    key: str,
    value: Any,
    where: str,
    named: Field | None,
    table: FlagTable,
    flags: dict[str, Any],
    problems: _Problems,
    *,
    app_keys: list[str],
) -> None:
    """An SGLang flag written by its CLI name in `general` or a model."""
    spec = table.lookup_key(key)
    if spec is None:
        hint = table.suggest(key)
        fix = f"did you mean {hint[2:]}?" if hint else _did_you_mean(key, app_keys)
        problems.add(where, "is neither a setting of this section nor an SGLang flag",
                     fix or "see the README's configuration table, or `python -m sglang.launch_server --help`")
        return
    if spec.dest in schema.OWNED_FLAGS:
        if spec.dest == "enable_metrics" and value is not None and _is_true(value):
            return  # asking for what the app does anyway
        problems.add(where, "is set by the app", schema.OWNED_FLAGS[spec.dest])
        return
    if spec.flag != "--" + key:  # an alias: the canonical name keeps exports stable
        problems.add(where, f"is an alias of {spec.name}", f"write {spec.name}")
        return
    if value is None or (isinstance(value, str) and not value.strip() and not spec.is_bool):
        return  # unset: SGLang's default
    try:
        coerced = spec.coerce(value)
        if named is not None and named.choices and not spec.choices and coerced not in named.choices:
            raise FlagValueError("is not one of the choices")
        for item in coerced if isinstance(coerced, list) else [coerced]:
            if isinstance(item, str):
                _check_text(item, allow_newlines=False)
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                raise FlagValueError("is far too large")
    except FlagValueError as exc:
        problems.add(where, f"{preview(value)} {exc}", _flag_fix(spec, named))
        return
    if named is not None and not _within_bounds(named, coerced):
        problems.add(where, f"{preview(coerced)} is out of range", named.bound_fix or _bounds_text(named))
        return
    if spec.kind == "switch" and coerced is False:
        return  # a store_true flag set to false is SGLang's default: nothing to pass
    flags[key] = coerced


def _is_true(value: Any) -> bool:
    try:
        return parse_bool(value)
    except FlagValueError:
        return False


def _flag_fix(spec: FlagSpec, named: Field | None = None) -> str:
    if spec.is_bool:
        return "write true or false"
    choices = spec.choices or (named.choices if named is not None else None)
    if choices:
        return "choose one of: " + ", ".join(str(c) for c in choices)
    return f"{spec.flag} takes {spec._describe()}; see `python -m sglang.launch_server --help`"


# ----- models -----


def _parse_models(section: Any, general: GeneralConfig, table: FlagTable, problems: _Problems) -> list[ModelConfig]:
    if section is None or section == [] or section == "":
        problems.add("models", "no model is configured", "add one: models: [{model: <HF name or ClearML Model ID>}]")
        return []
    if isinstance(section, Mapping):
        section = [section]  # one model written without the list
    if not isinstance(section, list):
        problems.add("models", f"is a {type(section).__name__}, not a list", "write models as a list of mappings")
        return []
    if len(section) > MAX_MODELS:
        problems.add("models", f"has {len(section)} models; at most {MAX_MODELS} are served by one instance",
                     "split them over several instances")
        return []
    models = [_parse_model(item, f"models[{i}]", general, table, problems) for i, item in enumerate(section)]
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        if model is None:
            continue
        name = model.endpoint
        if name in seen:
            how = "the same endpoint_name" if model.endpoint_name else f"the endpoint name {name!r} derived from it"
            problems.add(f"models[{i}].endpoint_name", f"{how} is also used by models[{seen[name]}]",
                         "give each model its own endpoint_name")
        else:
            seen[name] = i
    spanning = [i for i, m in enumerate(models) if m is not None and m.nodes > 1]
    for i in spanning[1:]:
        problems.add(f"models[{i}].nodes", f"models[{spanning[0]}] spans nodes already; ClearML's multi-node launch "
                     "runs the whole instance once per node", "let one model per instance span nodes")
    for i in spanning:
        model = models[i]
        assert model is not None
        if model.replicas > 1:
            problems.add(f"models[{i}].replicas", "cannot be combined with nodes > 1 in this version",
                         "use either replicas (copies on one machine) or nodes (one copy over several machines)")
        if model.cli:
            problems.add(f"models[{i}].nodes", "cannot be used with cli (the app sets each node's rank)",
                         "use the form's fields, or set nodes to 1")
    return [m for m in models if m is not None]


def _parse_model(item: Any, where: str, general: GeneralConfig, table: FlagTable,
                 problems: _Problems) -> ModelConfig | None:
    if isinstance(item, str):
        item = {"model": item}  # a bare model name is a model with defaults
    if not isinstance(item, Mapping):
        problems.add(where, f"is a {type(item).__name__}, not a mapping", "write each model as key: value lines")
        return None
    flags: dict[str, Any] = {}
    body = {k: v for k, v in item.items() if k != "lora"}

    def extra(key: str, value: Any) -> None:
        _parse_flag(key, value, f"{where}.{key}", None, table, flags, problems,
                    app_keys=[f.key for f in schema.MODEL_FIELDS] + ["lora"])

    values = _parse_fields(body, where, schema.MODEL_FIELDS, problems, extra=extra)
    lora, modules_valid = _parse_lora(item.get("lora"), f"{where}.lora", problems)
    model = values["model"]
    if not model:
        problems.add(f"{where}.model", "is empty" if "model" in item else "is missing",
                     "give a HuggingFace name (org/name), a ClearML Model ID or a local path")
        return None
    if any(c.isspace() for c in model):
        problems.add(f"{where}.model", f"{preview(model)} contains spaces",
                     "a model is an HF name, a 32-hex ClearML Model ID or a path, without spaces")
    endpoint_name = values["endpoint_name"]
    if endpoint_name is not None:
        _check_endpoint_name(endpoint_name, f"{where}.endpoint_name", problems)
    elif not derive_endpoint_name(model) or derive_endpoint_name(model) in schema.RESERVED_ENDPOINT_NAMES:
        problems.add(f"{where}.endpoint_name", f"cannot be derived from {preview(model)}", "set endpoint_name")
    values["flags"] = tuple(sorted(flags.items()))
    values["lora"] = lora
    config = ModelConfig(**values)
    if config.cli:
        _check_cli(config, f"{where}.cli", table, problems, general)
    if lora.enable and not config.cli and modules_valid:
        _check_lora_limits(lora, config, f"{where}.lora", problems)
    return config


def _check_endpoint_name(name: str, where: str, problems: _Problems) -> None:
    if not ENDPOINT_NAME_RE.match(name):
        problems.add(where, f"{preview(name)} is not a valid endpoint name",
                     "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
    elif name in schema.RESERVED_ENDPOINT_NAMES:
        problems.add(where, f"{name!r} is a path the gateway answers itself", "choose another name")


# Flags that need CUDA: on the CPU SGLang's memory saver dies at start (exit 127, no libcuda.so.1; reference/sglang.md
# B, try8), and there is no GPU memory to offload from or to.
_CUDA_ONLY_FLAGS = {"enable_memory_saver": "general.auto_cpu_offload or general.disk_swap",
                    "enable_weights_cpu_backup": "general.auto_cpu_offload",
                    "cpu_offload_gb": "general.max_cuda_memory_gib"}


def _check_cli(model: ModelConfig, where: str, table: FlagTable, problems: _Problems,
               general: GeneralConfig | None = None) -> None:
    import shlex

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
            _check_endpoint_name(values[0], where + " --served-model-name", problems)


def _parse_lora(section: Any, where: str, problems: _Problems) -> tuple[LoraConfig, bool]:
    """The LoRA sub-section, and whether every module parsed (limits are only checked then)."""
    values = _parse_fields(section, where, schema.LORA_FIELDS, problems)
    modules: list[LoraModule] = []
    names: set[str] = set()
    for i, text in enumerate(values["modules"]):
        name, sep, path = text.partition("=")
        name, path = name.strip(), path.strip()
        at = f"{where}.modules[{i}]"
        if not sep or not name or not path:
            problems.add(at, f"{preview(text)} is not name=path", "e.g. sql=org/sql-lora")
        elif not LORA_NAME_RE.match(name):
            problems.add(at, f"adapter name {preview(name)} is not valid",
                         "use letters, digits, '.', '_' or '-' (no ':' - it separates endpoint and adapter)")
        elif name in names:
            problems.add(at, f"adapter name {name!r} is used twice", "give each adapter its own name")
        elif any(c.isspace() for c in path):
            problems.add(at, f"path {preview(path)} contains spaces", "paths and names without spaces")
        else:
            names.add(name)
            modules.append(LoraModule(name, path))
    modules_valid = len(modules) == len(values["modules"])
    values["modules"] = tuple(modules)
    if values["dtype"] != "auto":
        problems.add(f"{where}.dtype", f"{values['dtype']!r} cannot be honoured: SGLang has no LoRA dtype option",
                     "leave it at auto: adapters take the model's dtype, which the model's `dtype` flag sets")
    return LoraConfig(**values), modules_valid


def _check_lora_limits(lora: LoraConfig, model: ModelConfig, where: str, problems: _Problems) -> None:
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


# ----- env and auth -----


def _parse_env(section: Any, problems: _Problems) -> tuple[tuple[str, str], ...]:
    mapping = _section_mapping(section, "env", problems)
    if len(mapping) > MAX_ENV_VARS:
        problems.add("env", f"has {len(mapping)} variables; at most {MAX_ENV_VARS}", "remove unused ones")
        return ()
    env: dict[str, str] = {}
    for name, value in mapping.items():
        where = f"env.{_key_text(name)}"
        if not isinstance(name, str) or not ENV_NAME_RE.match(name):
            problems.add(where, "is not a valid environment variable name",
                         "use letters, digits and '_', not starting with a digit")
            continue
        if name in schema.OWNED_ENV:
            problems.add(where, "is set by the app", schema.OWNED_ENV[name])
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif value is None:
            value = ""
        elif isinstance(value, (int, float)) and not (isinstance(value, float) and not math.isfinite(value)):
            value = str(value)
        if not isinstance(value, str):
            problems.add(where, f"is a {type(value).__name__}", "an environment variable's value is text")
            continue
        try:
            _check_text(value, allow_newlines=False)
        except FlagValueError as exc:
            problems.add(where, str(exc), "write the value on one line, in plain text")
            continue
        env[name] = value
    return tuple(sorted(env.items()))


def _check_tokens(tokens: tuple[str, ...], problems: _Problems) -> None:
    for i, token in enumerate(tokens):
        where = f"auth.tokens[{i}]"
        if len(token) < MIN_TOKEN_CHARS:
            problems.add(where, f"is {len(token)} characters long; a token needs at least {MIN_TOKEN_CHARS}",
                         GENERATE_TOKEN_HINT)
        elif len(token) > MAX_TOKEN_CHARS:
            problems.add(where, f"is longer than {MAX_TOKEN_CHARS} characters", GENERATE_TOKEN_HINT)
        elif not token.isascii() or any(c.isspace() or not c.isprintable() for c in token):
            problems.add(where, "contains spaces or characters a header cannot carry", GENERATE_TOKEN_HINT)
    if len(set(tokens)) != len(tokens):
        problems.add("auth.tokens", "lists the same token twice", "remove the repeat")


# ----- helpers -----


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(word.replace("-", "_"), list(candidates), n=1, cutoff=0.6)
    if not matches:
        matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {matches[0]}?" if matches else ""


def _key_text(key: Any) -> str:
    return key if isinstance(key, str) and len(key) <= 60 and key.isprintable() else preview(str(key))

