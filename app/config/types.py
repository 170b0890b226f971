"""The validated, immutable configuration that everything past the loading edge works with.

Attribute names are the schema's keys (`app/config/schema.py`); SGLang flags given by their CLI name are kept in
`flags` as sorted `(name, value)` pairs with values already coerced to the flag's type. Secrets are left out of
`repr`, so a config that reaches a log never carries them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

Flags = tuple[tuple[str, Any], ...]

_ENDPOINT_UNSAFE = re.compile(r"[^a-z0-9._-]+")
CLEARML_MODEL_ID = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class LoraModule:
    name: str
    path: str

    def __str__(self) -> str:
        return f"{self.name}={self.path}"


@dataclass(frozen=True)
class LoraConfig:
    enable: bool = False
    modules: tuple[LoraModule, ...] = ()
    max_loras: int | None = None
    max_lora_rank: int | None = None
    extra_vocab_size: int = 0
    dtype: str = "auto"
    max_cpu_loras: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    model: str
    cli: str = ""
    endpoint_name: str | None = None
    gpus: int | None = None
    replicas: int = 1
    nodes: int = 1
    lora: LoraConfig = field(default_factory=LoraConfig)
    flags: Flags = ()

    @property
    def endpoint(self) -> str:
        """The endpoint name: as configured, else derived from the model."""
        return self.endpoint_name or derive_endpoint_name(self.model)

    def flag(self, name: str, default: Any = None) -> Any:
        return dict(self.flags).get(name, default)


@dataclass(frozen=True)
class InstanceConfig:
    name: str = "SGLang Model Deployment"
    project: str = "LLM Deployments"
    queue: str = ""
    gateway_route: str = ""


@dataclass(frozen=True)
class GeneralConfig:
    debug: bool = False
    device: str = "cuda"
    auto_cpu_offload: bool = False
    disk_swap: bool = False
    hf_token: str = field(default="", repr=False)
    max_cuda_memory_gib: float = 0.0
    cuda_memory_threshold_kb: int = -1
    sleep_after_idle_seconds: int = 0
    wake_deadline_seconds: int = 120
    restart_hold_seconds: int = 180
    flags: Flags = ()

    @property
    def sleeps(self) -> bool:
        """Models may give their GPU memory back while idle (CPU offloading or disk swapping)."""
        return self.auto_cpu_offload or self.disk_swap

    def flag(self, name: str, default: Any = None) -> Any:
        return dict(self.flags).get(name, default)


@dataclass(frozen=True)
class IdleConfig:
    time_limit_hours: float = 24.0
    report_interval_seconds: int = 60

    @property
    def shuts_down(self) -> bool:
        return self.time_limit_hours > 0


@dataclass(frozen=True)
class AuthConfig:
    tokens: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class DeploymentConfig:
    """A whole deployment: what `run` serves and what `args` describes."""

    models: tuple[ModelConfig, ...]
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    env: tuple[tuple[str, str], ...] = ()
    idle: IdleConfig = field(default_factory=IdleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def without_secrets(self) -> DeploymentConfig:
        from dataclasses import replace

        return replace(self, general=replace(self.general, hf_token=""), auth=AuthConfig())

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value this config holds, for masking."""
        values = [self.general.hf_token, *self.auth.tokens]
        return tuple(v for v in values if v)


def derive_endpoint_name(model: str) -> str:
    """A readable endpoint name from a model reference.

    `Qwen/Qwen2.5-0.5B-Instruct` -> `qwen2.5-0.5b-instruct`; a ClearML Model ID -> `model-<first 8 hex>`;
    a local path -> its last component.
    """
    text = model.strip().rstrip("/")
    if CLEARML_MODEL_ID.match(text):
        return "model-" + text[:8].lower()
    last = text.replace("\\", "/").rsplit("/", 1)[-1]
    name = _ENDPOINT_UNSAFE.sub("-", last.lower()).strip("-._")
    return name[:63] or "model"
