"""Pre-flight: what can be known before a process starts, checked in seconds (docs/deploying.md, "Pre-flight").

    config ─► settings (per engine: tp, memory flags) ─┐
    resolved models ─► files (config.json, safetensors headers, adapters' configs: local, cache or hub)
                                                       ▼
                      checks (pure): found · architecture · tensor parallel · fit · adapters ─► findings

`preflight` returns one `ModelCheck` per model; a finding that is a problem stops `run` before any engine starts
(exit 2, the task's status reason), a warning is told. `clearml-sglang check` prints the same report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from app.config.types import DeploymentConfig
from app.errors import ConfigError, ModelNotFound, Problem
from app.preflight.checks import (
    Finding,
    ModelCheck,
    Target,
    adapter_findings,
    architecture_findings,
    fit_findings,
    found_findings,
    parallel_findings,
)
from app.preflight.files import FOUND, HubFiles, Lookup, ModelFiles, bounded, read_local
from app.preflight.registry import sglang_architectures, transformers_knows
from app.preflight.settings import engine_settings
from app.serving.gpus import Gpu
from app.serving.models import CLEARML, LOCAL_PATH, ResolvedModel, classify
from app.serving.plan import layout
from app.sglang.spec import Machine

# How long `check` waits for the ClearML server to name a model.
CLEARML_TIMEOUT_SECONDS = 4.0

__all__ = ["Finding", "HubFiles", "ModelCheck", "Target", "preflight", "problems_of", "run_checks"]


def preflight(config: DeploymentConfig, resolved: Sequence[ResolvedModel], target: Target, files: ModelFiles, *,
              supported: frozenset[str] | None | bool = True,
              knows: Callable[[str], bool | None] = transformers_knows,
              registry: ModelNames | None = None,
              clearml_timeout_s: float = CLEARML_TIMEOUT_SECONDS) -> list[ModelCheck]:
    """Every model's check (`supported`: the architectures SGLang runs; True: read from the installed SGLang;
    `registry`: where ClearML Model IDs are looked up, None where no ClearML server is configured)."""
    archs = sglang_architectures() if supported is True else supported or None
    machine = Machine(gpu_count=target.gpu_count, gpu_memory_gib=target.gpu_memory_gib)
    fractions, placing = _shared_fractions(config, target, machine)
    checks = []
    for index, model in enumerate(resolved):
        where = f"models[{index}]"
        check = ModelCheck(model.endpoint, config.models[index].model)
        checks.append(check)
        lookup = _look(model.model_path, files)
        if lookup is None:
            check.found, found = _clearml_model(f"{where}.model", model.model_path, registry, clearml_timeout_s)
            check.findings += found
            continue
        check.found = lookup.where or lookup.outcome
        check.findings += found_findings(where, model.model_path, lookup, bool(config.general.hf_token))
        if lookup.outcome != FOUND:
            continue
        settings = engine_settings(config, index, machine)
        if settings.mem_fraction is None and index in fractions:  # (models sharing GPUs: the plan's split)
            settings = replace(settings, mem_fraction=fractions[index])
        if model.parsers and not (settings.tool_call_parser or settings.reasoning_parser):
            check.parsers = ", ".join(f"{flag} {value}" for flag, value in (
                ("tool-call-parser", model.parsers.tool_call), ("reasoning-parser", model.parsers.reasoning))
                if value) + f" (for {model.parsers.family})"
        check.architecture, found = architecture_findings(where, lookup.config, archs, knows)
        check.findings += found
        check.findings += parallel_findings(where, lookup.config, settings.tp)
        check.findings += fit_findings(where, check, lookup.config, lookup.tensors, settings, target)
        adapters = [(m.name, _look(m.path, files, "adapter_config.json")) for m in model.lora_modules]
        check.findings += adapter_findings(where, [(n, a) for n, a in adapters if a is not None], lookup.tensors,
                                           settings.max_lora_rank)
    if checks:
        checks[0].findings += placing
    return checks


class ModelNames(Protocol):
    """ClearML's model registry, asked for a model's name only (`app.clearml.task.ClearMLModelRegistry`)."""

    def name_of(self, model_id: str) -> str:
        """Raises ModelNotFound."""
        ...


def _clearml_model(field: str, model_id: str, registry: ModelNames | None,
                   timeout_s: float) -> tuple[str, list[Finding]]:
    """A ClearML Model ID: known to the server (its files are read when `run` fetches it), unknown (a problem), or
    not verified (no server configured here, or no answer in time)."""
    later = "its files are checked when `run` fetches it"
    if registry is None:
        return "ClearML model, not verified", [Finding(field, f"not verified: no ClearML server is configured here; "
                                                       f"{later}", "", problem=False)]

    def ask() -> tuple[str | None, str]:
        try:
            return registry.name_of(model_id), ""
        except ModelNotFound as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - the SDK's own errors (the server unreachable): not verified
            return "", f"the ClearML server could not be asked ({type(exc).__name__})"

    name, why = bounded(ask, timeout_s, ("", f"the ClearML server did not answer in {timeout_s:g} s"))
    if name == "":
        return "ClearML model, not verified", [Finding(field, f"not verified: {why}; {later}", "", problem=False)]
    if name is None:
        return "not found", [Finding(field, f"no ClearML model {model_id} ({why})",
                                     "copy the ID from the model's page in the ClearML web app (Models)")]
    return f"ClearML model '{name}'", [Finding(field, later, "", problem=False)]


def _shared_fractions(config: DeploymentConfig, target: Target,
                      machine: Machine) -> tuple[dict[int, float], list[Finding]]:
    """Where models share the target's GPUs, each one's memory fraction as the plan splits them
    (`app.serving.plan.layout`); or why they cannot be placed at all, as problems."""
    if target.device != "cuda" or not target.gpu_count or not target.gpu_memory_gib:
        return {}, []
    gpus = [Gpu(i, "described", target.gpu_memory_gib) for i in range(target.gpu_count)]
    try:
        where = layout(config, gpus, can_spawn=True, machine=machine)
    except ConfigError as exc:
        return {}, [Finding(p.field, p.problem, p.fix) for p in exc.problems]
    return {i: p.memory_fraction for i, p in enumerate(where.placements or ()) if p.memory_fraction is not None}, []


def _look(reference: str, files: ModelFiles, config_name: str = "config.json") -> Lookup | None:
    """A model's or adapter's metadata (None: a ClearML model not fetched)."""
    try:
        kind = classify(reference)
    except ValueError:
        kind = LOCAL_PATH
    if kind == CLEARML:
        return None
    if kind == LOCAL_PATH:
        return read_local(Path(os.path.expanduser(reference)), config_name)
    return files.lookup(reference, (config_name,))


def problems_of(checks: Sequence[ModelCheck]) -> list[Problem]:
    """The findings that stop a launch, as config problems (`field: problem (fix)`)."""
    return [Problem(f.field, f.message, f.fix) for c in checks for f in c.findings if f.problem]


def run_checks(config: DeploymentConfig,
               resolved: Sequence[ResolvedModel]) -> tuple[list[Problem], list[str], list[str]]:
    """What `run` does before any engine starts (`app.serving.lifecycle.RunOptions.preflight`): this machine's
    check, its problems, its warnings and what it chose (each model's parsers)."""
    from app.preflight.report import target_of

    checks = preflight(config, resolved, target_of(config, None, None), HubFiles(config.general.hf_token))
    return (problems_of(checks), [str(f) for c in checks for f in c.findings if not f.problem],
            [f"{c.endpoint}: {c.parsers}" for c in checks if c.parsers])
