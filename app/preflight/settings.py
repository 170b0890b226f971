"""What one engine will run with, as pre-flight needs it: its tensor-parallel size and the SGLang flags that size its
memory, read from the config the way the command builder reads it (`app.sglang.command`): a form's flags by name
(general's, the model's on top), or the model's own `cli`."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from app.config.flags import FlagTable
from app.config.types import DeploymentConfig
from app.sglang.command import gpus_per_copy
from app.sglang.spec import Machine


@dataclass(frozen=True)
class EngineSettings:
    device: str
    tp: int = 1
    mem_fraction: float | None = None
    context_length: int | None = None
    kv_cache_dtype: str = "auto"
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    max_lora_rank: int | None = None
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


def engine_settings(config: DeploymentConfig, index: int, machine: Machine,
                    table: FlagTable | None = None) -> EngineSettings:
    model, general = config.models[index], config.general
    if model.cli:
        parsed, _ = (table or FlagTable.load()).parse_argv(shlex.split(model.cli))
        values: dict[str, Any] = {spec.dest: (raw[0] if raw else True) for spec, _, raw in parsed}
        tp = _int(values.get("tp_size")) or 1
        device = str(values.get("device") or general.device)
    else:
        values = {name.replace("-", "_"): value for name, value in (*general.flags, *model.flags)}
        tp = 1 if general.device == "cpu" else gpus_per_copy(model, machine) * model.nodes
        device = general.device
        if model.lora.enable and model.lora.max_lora_rank is not None:
            values.setdefault("max_lora_rank", model.lora.max_lora_rank)
    return EngineSettings(
        device=device, tp=tp, mem_fraction=_float(values.get("mem_fraction_static")),
        context_length=_int(values.get("context_length")), kv_cache_dtype=str(values.get("kv_cache_dtype") or "auto"),
        max_running_requests=_int(values.get("max_running_requests")),
        max_total_tokens=_int(values.get("max_total_tokens")), max_lora_rank=_int(values.get("max_lora_rank")),
        tool_call_parser=values.get("tool_call_parser"), reasoning_parser=values.get("reasoning_parser"))


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
