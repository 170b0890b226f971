"""Keys as tenants in the config: `auth.limits`, each key name's (or `default`'s) limits, typed through
`schema.LIMIT_FIELDS`; the models they name; what SGLang needs for priorities; and the names only the running app
can judge (`check_key_names`: tokens may come from the environment too).

Example::

    problems = Problems()
    limits = parse_limits({"alice": {"rpm": 60, "models": ["qwen"]}}, models, problems)
    # -> (("alice", KeyLimits(rpm=60, models=("qwen",))),)
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any

from app.config import schema
from app.config.flags import FlagTable
from app.config.problems import Problems, did_you_mean, key_text, preview
from app.config.rules import KEY_NAME_FIX, LORA_NAME_RE
from app.config.types import AuthConfig, GeneralConfig, ModelConfig
from app.config.values import coerce_field
from app.constants import API_TOKENS_ENV
from app.keys import DEFAULT, NAME_RE, KeyLimits

# Entries one `auth.limits` may hold: one per key, and a deployment's keys are people and services, not thousands.
MAX_LIMIT_ENTRIES = 1024

# The schedule policies SGLang 0.5.23 takes with --enable-priority-scheduling (its validation_hook asserts it).
PRIORITY_POLICIES = ("fcfs", "lof")

_PRIORITY_WHY = "auth.limits sets priorities, and SGLang schedules by priority with schedule-policy fcfs or lof only"
_PRIORITY_FIX = "set schedule-policy to fcfs (SGLang's default) or lof, or take priority out of auth.limits"
_LOW_FIRST_WHY = "auth.limits sets priorities, higher first, and this flag would make SGLang run lower values first"
_LOW_FIRST_FIX = "remove it; give the keys to run first the higher priorities instead"


def parse_limits(value: Any, models: Sequence[ModelConfig], problems: Problems) -> tuple[tuple[str, KeyLimits], ...]:
    """`auth.limits` (a mapping, as `coerce_field` made it) → sorted `(name, KeyLimits)` pairs; every problem added
    to `problems`, naming its field (`auth.limits.alice.rpm`)."""
    if not value:
        return ()
    if len(value) > MAX_LIMIT_ENTRIES:
        problems.add("auth.limits", f"has {len(value)} entries; at most {MAX_LIMIT_ENTRIES}",
                     "give keys that share their limits the default entry")
        return ()
    endpoints = {m.endpoint: m for m in models}
    entries: dict[str, KeyLimits] = {}
    for key, entry in value.items():
        name = str(key) if isinstance(key, int) and not isinstance(key, bool) else key  # YAML reads `123:` as 123
        where = f"auth.limits.{key_text(name)}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            problems.add(where, "is not a key name", f"use {DEFAULT}, or a key's name: {KEY_NAME_FIX}")
            continue
        limits = _parse_entry(entry, where, endpoints, problems)
        if limits is not None:
            entries[name] = limits
    return tuple(sorted(entries.items()))


def _parse_entry(entry: Any, where: str, endpoints: Mapping[str, ModelConfig],
                 problems: Problems) -> KeyLimits | None:
    if entry is None:
        entry = {}  # `alice:` with nothing under it: no limits (and not default's)
    if not isinstance(entry, Mapping):
        problems.add(where, f"is a {type(entry).__name__}, not a mapping", "write its limits as a mapping, e.g. "
                     "{rpm: 60, models: [qwen]}")
        return None
    by_key = {f.key: f for f in schema.LIMIT_FIELDS}
    values: dict[str, Any] = {}
    for key, value in entry.items():
        f = by_key.get(key) if isinstance(key, str) else None
        if f is None:
            problems.add(f"{where}.{key_text(key)}", "is not a limit",
                         did_you_mean(str(key), by_key) or "limits: " + ", ".join(by_key))
            continue
        values[f.key] = coerce_field(f, value, f"{where}.{f.key}", problems)
    if values.get("models") is not None:
        values["models"] = _check_models(values["models"], f"{where}.models", endpoints, problems)
    return KeyLimits(**values)


def _check_models(names: tuple[str, ...], where: str, endpoints: Mapping[str, ModelConfig],
                  problems: Problems) -> tuple[str, ...]:
    """The models a key may use: endpoints of this config, or `endpoint:adapter` on one; repeats dropped."""
    if not names:
        problems.add(where, "is empty, so the key could use no model",
                     "list the endpoints it may use, or leave models out for every one")
    for i, item in enumerate(names):
        at = f"{where}[{i}]"
        endpoint, sep, adapter = item.partition(":")
        model = endpoints.get(endpoint)
        if model is None:
            problems.add(at, f"{preview(endpoint)} is not an endpoint of this config",
                         did_you_mean(endpoint, endpoints) or
                         ("endpoints: " + ", ".join(endpoints) if endpoints else "name one of models[].endpoint_name"))
        elif sep and not adapter:
            problems.add(at, f"{preview(item)} names no adapter",
                         f"write {endpoint}:<adapter> for one adapter, or {endpoint} for the model and its adapters")
        elif sep and model.lora.on_request and not model.cli:  # any reference an adapter may be loaded by
            if any(c.isspace() for c in adapter):
                problems.add(at, f"adapter {preview(adapter)} contains spaces",
                             f"write {endpoint}:<adapter>, its name or reference without spaces")
        elif sep and not LORA_NAME_RE.match(adapter):
            problems.add(at, f"adapter name {preview(adapter)} is not valid",
                         f"write {endpoint}:<adapter> with letters, digits, '.', '_' or '-'")
    return tuple(dict.fromkeys(names))


def check_priority_flags(limits: tuple[tuple[str, KeyLimits], ...], general: GeneralConfig,
                         models: Sequence[ModelConfig | None], table: FlagTable, problems: Problems) -> None:
    """With priorities, every SGLang server schedules by priority (`app.sglang.command` adds the flags): a schedule
    policy SGLang refuses with it, or lower values first, is a problem where it is set (`models`: as the config
    numbers them, None where a model did not parse)."""
    if not any(entry.priority is not None for _, entry in limits):
        return
    policy = general.flag("schedule-policy")
    inherited = any(m is not None and not m.cli and m.flag("schedule-policy") is None for m in models)
    if policy not in (None, *PRIORITY_POLICIES) and inherited:
        problems.add("general.schedule-policy", f"is {policy!r}, but {_PRIORITY_WHY}", _PRIORITY_FIX)
    if general.flag("schedule-low-priority-values-first"):
        problems.add("general.schedule-low-priority-values-first", f"is set, but {_LOW_FIRST_WHY}", _LOW_FIRST_FIX)
    for i, model in enumerate(models):
        if model is None:
            continue
        if model.cli:
            _check_cli(model.cli, f"models[{i}].cli", table, problems)
            continue
        own = model.flag("schedule-policy")
        if own not in (None, *PRIORITY_POLICIES):
            problems.add(f"models[{i}].schedule-policy", f"is {own!r}, but {_PRIORITY_WHY}", _PRIORITY_FIX)
        if model.flag("schedule-low-priority-values-first"):
            problems.add(f"models[{i}].schedule-low-priority-values-first", f"is set, but {_LOW_FIRST_WHY}",
                         _LOW_FIRST_FIX)


def _check_cli(cli: str, where: str, table: FlagTable, problems: Problems) -> None:
    try:
        tokens = shlex.split(cli)
    except ValueError:
        return  # `rules.check_cli` says so
    parsed, _ = table.parse_argv(tokens)
    for spec, option, values in parsed:
        if spec.dest == "schedule_policy" and values and values[0] not in PRIORITY_POLICIES:
            problems.add(where, f"sets {option} {preview(values[0])}, but {_PRIORITY_WHY}", _PRIORITY_FIX)
        elif spec.dest == "schedule_low_priority_values_first":
            problems.add(where, f"sets {option}, but {_LOW_FIRST_WHY}", _LOW_FIRST_FIX)


def check_key_names(auth: AuthConfig, names: list[str]) -> None:
    """Every name `auth.limits` gives limits to is a key's (or `default`): `names` are the keys the gateway holds
    (`app.keys.named_tokens` of the config's tokens and then CLEARML_SGLANG_API_TOKENS'; the config's own count
    anyway). Raises ConfigError listing each name no key has: only the running app knows the environment's keys."""
    keys = sorted({*auth.names, *names})
    fix = f"name a key NAME=TOKEN in auth.tokens or {API_TOKENS_ENV}, or use {DEFAULT}"
    problems = Problems()
    for name, _ in auth.limits:
        if name != DEFAULT and name not in keys:
            hint = did_you_mean(name, keys)
            problems.add(f"auth.limits.{name}", "is the name of no key", f"{hint} Otherwise {fix}" if hint else fix)
    problems.raise_if_any()
