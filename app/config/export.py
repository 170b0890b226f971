"""Writing a configuration back out: the config-file mapping (export/import JSON) and ClearML hyperparameters.

Both are exact inverses of `app.config.load`: `parse_config(to_mapping(c)) == c` for any config without secrets,
and `load_config(hyperparameters=as_strings(to_hyperparameters(c))) == c` for any config. Secrets (the HF token,
access tokens) are left out of exports unless `secrets=True` is asked for by code that stores them where only
project members can read them (the task's own hyperparameters). Keys' limits are no secret: they are always written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from app.config import schema
from app.config.flags import FlagTable
from app.config.schema import HYPERPARAMETER_SECTIONS, Field
from app.config.types import AuthConfig, DeploymentConfig, LoraConfig, ModelConfig


@dataclass(frozen=True)
class Hyperparameter:
    """One ClearML hyperparameter as the UI shows it: a string value with a type and a description."""

    name: str  # "Section/key"
    value: str
    type: str
    description: str

    @property
    def section(self) -> str:
        return self.name.split("/", 1)[0]


def to_mapping(config: DeploymentConfig, *, secrets: bool = False) -> dict[str, Any]:
    """The config in the config file format (docs/configuration.md) (every field written, in the form's order)."""
    general = {f.key: getattr(config.general, f.key) for f in schema.GENERAL_FIELDS
               if not f.is_flag and (secrets or not f.secret)}
    general.update(dict(config.general.flags))
    mapping: dict[str, Any] = {
        "instance": _fields(config.instance, schema.INSTANCE_FIELDS),
        "models": [_model_mapping(m) for m in config.models],
        "general": general,
        "env": dict(config.env),
        "idle": _fields(config.idle, schema.IDLE_FIELDS),
        "benchmark": _fields(config.benchmark, schema.BENCHMARK_FIELDS),
    }
    mapping["auth"] = _auth_mapping(config.auth, secrets=secrets)
    return mapping


def _auth_mapping(auth: AuthConfig, *, secrets: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": list(auth.tokens)} if secrets else {}
    out["limits"] = limits_mapping(auth)
    return out


def limits_mapping(auth: AuthConfig) -> dict[str, dict[str, Any]]:
    """`auth.limits` as the file has it: each name's limits that are set."""
    return {name: limits.set_values() for name, limits in auth.limits}


def _fields(section: object, fields: tuple[Field, ...]) -> dict[str, Any]:
    """A section's fields as the file has them (lists, where the config holds tuples)."""
    return {f.key: list(v) if isinstance(v := getattr(section, f.key), tuple) else v for f in fields}


def _model_mapping(model: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {f.key: getattr(model, f.key) for f in schema.MODEL_FIELDS}
    out.update(dict(model.flags))
    out["lora"] = _lora_mapping(model.lora)
    return out


def _lora_mapping(lora: LoraConfig) -> dict[str, Any]:
    out = _fields(lora, schema.LORA_FIELDS)
    out["modules"] = [str(m) for m in lora.modules]
    return out


def to_json(config: DeploymentConfig) -> str:
    """The export file: JSON that import reads back unchanged; secrets removed."""
    return json.dumps(to_mapping(config), indent=2, ensure_ascii=False) + "\n"


def to_hyperparameters(config: DeploymentConfig, flag_table: FlagTable | None = None) -> list[Hyperparameter]:
    """The config as a ClearML task's hyperparameters, secrets included (the task is the deployment)."""
    table = flag_table or FlagTable.load()
    out: list[Hyperparameter] = []

    def add(section: str, key: str, value: Any, f: Field | None, flag_help: str = "", flag_type: str = "") -> None:
        out.append(Hyperparameter(
            name=f"{HYPERPARAMETER_SECTIONS[section]}/{key}",
            value=format_value(value),
            type=flag_type or _hyperparameter_type(f),
            description=(f"{f.title}: {f.help}" if f else flag_help),
        ))

    for f in schema.INSTANCE_FIELDS:
        add("instance", f.key, getattr(config.instance, f.key), f)
    for i, model in enumerate(config.models):
        for f in schema.MODEL_FIELDS:
            add("models", f"{i}/{f.key}", getattr(model, f.key), f)
        for f in schema.LORA_FIELDS:
            value = getattr(model.lora, f.key)
            add("models", f"{i}/lora/{f.key}", [str(m) for m in value] if f.key == "modules" else value, f)
        for key, value in model.flags:
            spec = table.lookup_key(key)
            add("models", f"{i}/{key}", value, None, _flag_help(spec), spec.value_type_name if spec else "str")
    named = {f.key: f for f in schema.GENERAL_FIELDS}
    for f in schema.GENERAL_FIELDS:
        if not f.is_flag:
            add("general", f.key, getattr(config.general, f.key), f)
    for key, value in config.general.flags:
        spec = table.lookup_key(key)
        add("general", key, value, named.get(key), _flag_help(spec), spec.value_type_name if spec else "str")
    for name, value in config.env:
        out.append(Hyperparameter(f"{HYPERPARAMETER_SECTIONS['env']}/{name}", value, "str",
                                  "Environment variable for the engines"))
    for f in schema.IDLE_FIELDS:
        add("idle", f.key, getattr(config.idle, f.key), f)
    for f in schema.BENCHMARK_FIELDS:
        add("benchmark", f.key, getattr(config.benchmark, f.key), f)
    auth = {f.key: f for f in schema.AUTH_FIELDS}
    add("auth", "tokens", list(config.auth.tokens), auth["tokens"])
    add("auth", "limits", limits_mapping(config.auth), auth["limits"])
    return out


def _flag_help(spec: Any) -> str:
    return f"SGLang {spec.flag}: {spec.help}" if spec is not None else "SGLang flag"


def _hyperparameter_type(f: Field | None) -> str:
    if f is None:
        return "str"
    return {"choice": "str", "list": "list", "mapping": "dict"}.get(f.type, f.type)


def format_value(value: Any) -> str:
    """A value as the string a ClearML hyperparameter holds; `app.config.load` parses it back."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
    return str(value)
