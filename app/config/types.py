"""The validated, immutable configuration that everything past the loading edge works with.

Attribute names and defaults are the schema's (`app/config/schema.py`: one place for both); SGLang flags given by
their CLI name are kept in `flags` as sorted `(name, value)` pairs with values already coerced to the flag's type.
Secrets are left out of `repr`, so a config that reaches a log never carries them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from app.config.schema import default as field_default
from app.keys import DEFAULT, NO_LIMITS, KeyLimits, named_tokens

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
    enable: bool = field_default("lora", "enable")
    modules: tuple[LoraModule, ...] = ()
    max_loras: int | None = field_default("lora", "max_loras")
    max_lora_rank: int | None = field_default("lora", "max_lora_rank")
    extra_vocab_size: int = field_default("lora", "extra_vocab_size")
    dtype: str = field_default("lora", "dtype")
    max_cpu_loras: int | None = field_default("lora", "max_cpu_loras")
    on_request: tuple[str, ...] = field_default("lora", "on_request")
    on_request_dirs: tuple[str, ...] = field_default("lora", "on_request_dirs")

    @property
    def loaded_cap(self) -> int:
        """How many adapters stay loaded with adapters on request: max_cpu_loras, else max_loras (SGLang's default
        8) and at least one more than the modules loaded at start."""
        if self.max_cpu_loras is not None:
            return self.max_cpu_loras
        return max(self.max_loras if self.max_loras is not None else 8, len(self.modules) + 1)


@dataclass(frozen=True)
class ModelConfig:
    model: str
    cli: str = field_default("model", "cli")
    endpoint_name: str | None = field_default("model", "endpoint_name")
    gpus: int | None = field_default("model", "gpus")
    replicas: int = field_default("model", "replicas")
    nodes: int = field_default("model", "nodes")
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
    name: str = field_default("instance", "name")
    project: str = field_default("instance", "project")
    queue: str = field_default("instance", "queue")
    gateway_route: str = field_default("instance", "gateway_route")


@dataclass(frozen=True)
class GeneralConfig:
    debug: bool = field_default("general", "debug")
    device: str = field_default("general", "device")
    auto_cpu_offload: bool = field_default("general", "auto_cpu_offload")
    disk_swap: bool = field_default("general", "disk_swap")
    hf_token: str = field(default=field_default("general", "hf_token"), repr=False)
    max_cuda_memory_gib: float = field_default("general", "max_cuda_memory_gib")
    cuda_memory_threshold_kb: int = field_default("general", "cuda_memory_threshold_kb")
    sleep_after_idle_seconds: int = field_default("general", "sleep_after_idle_seconds")
    wake_deadline_seconds: int = field_default("general", "wake_deadline_seconds")
    restart_hold_seconds: int = field_default("general", "restart_hold_seconds")
    sleep_on_idle: bool = field_default("general", "sleep_on_idle")
    max_request_body_mib: float = field_default("general", "max_request_body_mib")
    max_connections_per_address: int = field_default("general", "max_connections_per_address")
    gateway_workers: int = field_default("general", "gateway_workers")  # 0: from the machine's cores
    flags: Flags = ()

    @property
    def sleeps(self) -> bool:
        """Models may give their GPU memory back while idle (CPU offloading or disk swapping)."""
        return self.auto_cpu_offload or self.disk_swap

    def flag(self, name: str, default: Any = None) -> Any:
        return dict(self.flags).get(name, default)


@dataclass(frozen=True)
class IdleConfig:
    time_limit_hours: float = field_default("idle", "time_limit_hours")
    report_interval_seconds: int = field_default("idle", "report_interval_seconds")

    @property
    def shuts_down(self) -> bool:
        return self.time_limit_hours > 0


@dataclass(frozen=True)
class BenchmarkConfig:
    enable: bool = field_default("benchmark", "enable")
    concurrencies: tuple[int, ...] = tuple(int(c) for c in field_default("benchmark", "concurrencies"))
    input_tokens: int = field_default("benchmark", "input_tokens")
    output_tokens: int = field_default("benchmark", "output_tokens")
    rounds: int = field_default("benchmark", "rounds")
    max_seconds: int = field_default("benchmark", "max_seconds")


@dataclass(frozen=True)
class AuthConfig:
    """The endpoint's keys: `tokens` as written (`TOKEN` or `NAME=TOKEN`: `app.keys.split_entry`; secret, so out of
    `repr`), and `limits`, each key name's (or `default`'s) `KeyLimits`, sorted by name (not secret).

    Example::

        auth = AuthConfig(tokens=("alice=" + "a" * 32,), limits=(("alice", KeyLimits(rpm=60)),))
        auth.limits_for("alice").rpm   # 60
        auth.limits_for("token-2")     # NO_LIMITS: no entry of its own and no `default`
    """

    tokens: tuple[str, ...] = field(default=field_default("auth", "tokens"), repr=False)
    limits: tuple[tuple[str, KeyLimits], ...] = field_default("auth", "limits")

    def limits_for(self, name: str) -> KeyLimits:
        """A key's limits: its own entry, else `default`'s, else none."""
        entries = dict(self.limits)
        if name in entries:
            return entries[name]
        return entries.get(DEFAULT, NO_LIMITS)

    @property
    def uses_priorities(self) -> bool:
        """Some entry sets a priority: every SGLang server then schedules by priority (`app.sglang.command`)."""
        return any(limits.priority is not None for _, limits in self.limits)

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the keys `tokens` holds, in order (`app.keys.named_tokens`)."""
        return tuple(name for name, _ in named_tokens(self.tokens))


@dataclass(frozen=True)
class DeploymentConfig:
    """A whole deployment: what `run` serves and what `args` describes."""

    models: tuple[ModelConfig, ...]
    instance: InstanceConfig = field(default_factory=InstanceConfig)
    general: GeneralConfig = field(default_factory=GeneralConfig)
    env: tuple[tuple[str, str], ...] = ()
    idle: IdleConfig = field(default_factory=IdleConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def without_secrets(self) -> DeploymentConfig:
        from dataclasses import replace

        return replace(self, general=replace(self.general, hf_token=""), auth=replace(self.auth, tokens=()))

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value this config holds, for masking: the HF token and each access token (without its
        name: masking the token masks its `NAME=TOKEN` entry too)."""
        values = [self.general.hf_token, *(token for _, token in named_tokens(self.auth.tokens))]
        return tuple(v for v in values if v)


@dataclass(frozen=True)
class MultiNode:
    """Where this machine stands in a model spanning nodes: not in the file but given by ClearML's multi-node
    launch (`app.clearml.task.DeploymentTask.launch_multi_node`), every node its rank and the master's (rank 0's)
    address; SGLang's ranks meet at `master_addr:master_port` (`app.sglang.command`)."""

    nodes: int
    rank: int
    master_addr: str
    master_port: int

    @property
    def dist_init_addr(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


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
