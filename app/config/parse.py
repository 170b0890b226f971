"""A raw mapping (from any source) → a frozen `DeploymentConfig`, or a `ConfigError` listing every problem.

Each section's app fields are typed through the schema (`app.config.values`); any other key in `general` or a
model is an SGLang flag by its command-line name, typed by SGLang's own table (`app.config.flags`); rules across
fields follow (`app.config.rules`). Values of secret fields never appear in a message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from app.config import schema
from app.config.flags import FlagSpec, FlagTable, preview
from app.config.limits import check_priority_flags, parse_limits
from app.config.problems import Problems, did_you_mean, key_text
from app.config.rules import (
    ENV_NAME_RE,
    LORA_NAME_RE,
    MAX_BENCHMARK_CONCURRENCY,
    MAX_ENV_VARS,
    MAX_MODELS,
    check_cli,
    check_endpoint_name,
    check_lora_limits,
    check_on_request,
    check_text_fields,
    check_tokens,
)
from app.config.schema import Field
from app.config.types import (
    AuthConfig,
    BenchmarkConfig,
    DeploymentConfig,
    GeneralConfig,
    IdleConfig,
    InstanceConfig,
    LoraConfig,
    LoraModule,
    ModelConfig,
    derive_endpoint_name,
)
from app.config.values import (
    ValueProblem,
    bounds_text,
    check_text,
    coerce_field,
    default_value,
    parse_bool,
    within_bounds,
)


def parse_config(raw: Any, flag_table: FlagTable | None = None) -> DeploymentConfig:
    """Validate a raw mapping and build the config; raise ConfigError with every problem."""
    table = flag_table or FlagTable.load()
    problems = Problems()
    if not isinstance(raw, Mapping):
        problems.add("config", f"is a {type(raw).__name__}, not a mapping", "start with keys such as `models:`")
        problems.raise_if_any()
    for key in raw:
        if key not in schema.TOP_LEVEL_KEYS:
            problems.add(key_text(key), "is not a section of the config",
                         did_you_mean(str(key), schema.TOP_LEVEL_KEYS) or
                         "sections: " + ", ".join(schema.TOP_LEVEL_KEYS))

    instance = InstanceConfig(**_parse_fields(raw.get("instance"), "instance", schema.INSTANCE_FIELDS, problems))
    general = _parse_general(raw.get("general"), table, problems)
    numbered = _parse_models(raw.get("models"), general, table, problems)
    models = [m for m in numbered if m is not None]
    env = _parse_env(raw.get("env"), problems)
    idle = IdleConfig(**_parse_fields(raw.get("idle"), "idle", schema.IDLE_FIELDS, problems))
    benchmark = _parse_benchmark(raw.get("benchmark"), problems)
    auth_values = _parse_fields(raw.get("auth"), "auth", schema.AUTH_FIELDS, problems)
    check_tokens(auth_values["tokens"], problems)
    auth_values["limits"] = parse_limits(auth_values["limits"], models, problems)
    check_priority_flags(auth_values["limits"], general, numbered, table, problems)
    check_text_fields(instance, problems)
    problems.raise_if_any()
    return DeploymentConfig(models=tuple(models), instance=instance, general=general, env=env, idle=idle,
                            benchmark=benchmark, auth=AuthConfig(**auth_values))


def _section_mapping(value: Any, where: str, problems: Problems) -> Mapping[str, Any]:
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
    problems: Problems,
    *,
    extra: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Coerce a section's app fields; hand other keys to `extra` (SGLang flags) or report them unknown."""
    mapping = _section_mapping(section, where, problems)
    by_key = {f.key: f for f in fields if not f.is_flag}
    values: dict[str, Any] = {f.key: default_value(f) for f in by_key.values()}
    for key, value in mapping.items():
        f = by_key.get(key) if isinstance(key, str) else None
        if f is not None:
            values[key] = coerce_field(f, value, f"{where}.{key}", problems)
        elif extra is not None and isinstance(key, str):
            extra(key, value)
        else:
            problems.add(f"{where}.{key_text(key)}", "is not a setting of this section",
                         did_you_mean(str(key), list(by_key)) or "settings: " + ", ".join(by_key))
    return values


def _parse_general(section: Any, table: FlagTable, problems: Problems) -> GeneralConfig:
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
    problems: Problems,
    *,
    app_keys: list[str],
) -> None:
    """An SGLang flag written by its CLI name in `general` or a model."""
    spec = table.lookup_key(key)
    if spec is None:
        hint = table.suggest(key)
        fix = f"did you mean {hint[2:]}?" if hint else did_you_mean(key, app_keys)
        problems.add(where, "is neither a setting of this section nor an SGLang flag",
                     fix or "see the configuration table in docs/configuration.md, "
                            "or `python -m sglang.launch_server --help`")
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
            raise ValueProblem("is not one of the choices")
        for item in coerced if isinstance(coerced, list) else [coerced]:
            if isinstance(item, str):
                check_text(item, allow_newlines=False)
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 2**63:
                raise ValueProblem("is far too large")
    except ValueProblem as exc:
        problems.add(where, f"{preview(value)} {exc}", _flag_fix(spec, named))
        return
    if named is not None and not within_bounds(named, coerced):
        problems.add(where, f"{preview(coerced)} is out of range", named.bound_fix or bounds_text(named))
        return
    if spec.kind == "switch" and coerced is False:
        return  # a store_true flag set to false is SGLang's default: nothing to pass
    flags[key] = coerced


def _is_true(value: Any) -> bool:
    try:
        return parse_bool(value)
    except ValueProblem:
        return False


def _flag_fix(spec: FlagSpec, named: Field | None = None) -> str:
    if spec.is_bool:
        return "write true or false"
    choices = spec.choices or (named.choices if named is not None else None)
    if choices:
        return "choose one of: " + ", ".join(str(c) for c in choices)
    return f"{spec.flag} takes {spec.describe()}; see `python -m sglang.launch_server --help`"


def _parse_models(section: Any, general: GeneralConfig, table: FlagTable,
                  problems: Problems) -> list[ModelConfig | None]:
    """The models as the config numbers them, None for each that did not parse (its problems said)."""
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
    return models


def _parse_model(item: Any, where: str, general: GeneralConfig, table: FlagTable,
                 problems: Problems) -> ModelConfig | None:
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
        check_endpoint_name(endpoint_name, f"{where}.endpoint_name", problems)
    elif not derive_endpoint_name(model) or derive_endpoint_name(model) in schema.RESERVED_ENDPOINT_NAMES:
        problems.add(f"{where}.endpoint_name", f"cannot be derived from {preview(model)}", "set endpoint_name")
    values["flags"] = tuple(sorted(flags.items()))
    values["lora"] = lora
    config = ModelConfig(**values)
    if config.cli:
        check_cli(config, f"{where}.cli", table, problems, general)
    if lora.enable and not config.cli and modules_valid:
        check_lora_limits(lora, config, f"{where}.lora", problems)
    if lora.on_request:
        check_on_request(lora, config, f"{where}.lora", problems)
    return config


def _parse_lora(section: Any, where: str, problems: Problems) -> tuple[LoraConfig, bool]:
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


def _parse_benchmark(section: Any, problems: Problems) -> BenchmarkConfig:
    values = _parse_fields(section, "benchmark", schema.BENCHMARK_FIELDS, problems)
    concurrencies = []
    for i, text in enumerate(values["concurrencies"]):
        if not text.isdigit() or not 1 <= int(text) <= MAX_BENCHMARK_CONCURRENCY:
            problems.add(f"benchmark.concurrencies[{i}]", f"{preview(text)} is not a number of requests",
                         f"write whole numbers from 1 to {MAX_BENCHMARK_CONCURRENCY}, e.g. [1, 8, 32]")
        else:
            concurrencies.append(int(text))
    if not values["concurrencies"]:
        problems.add("benchmark.concurrencies", "is empty", "list at least one, e.g. [1, 8, 32]")
    values["concurrencies"] = tuple(sorted(set(concurrencies)))
    return BenchmarkConfig(**values)


def _parse_env(section: Any, problems: Problems) -> tuple[tuple[str, str], ...]:
    mapping = _section_mapping(section, "env", problems)
    if len(mapping) > MAX_ENV_VARS:
        problems.add("env", f"has {len(mapping)} variables; at most {MAX_ENV_VARS}", "remove unused ones")
        return ()
    env: dict[str, str] = {}
    for name, value in mapping.items():
        where = f"env.{key_text(name)}"
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
            check_text(value, allow_newlines=False)
        except ValueProblem as exc:
            problems.add(where, str(exc), "write the value on one line, in plain text")
            continue
        env[name] = value
    return tuple(sorted(env.items()))
