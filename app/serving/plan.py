"""What a deployment will run, computed before anything runs (pure): `layout`, then `plan`.

`layout(config, gpus, can_spawn=...)` decides where things go: which replicas stay on this machine and which go to
worker tasks (`app.serving.scale_out`), and each model's GPUs and memory share (`app.serving.gpus`). `plan(layout,
resolved, ports, ...)` turns it into every process's command: each model's SGLang server (its replicas as separate
servers behind sglang-router in the CPU development mode, or where worker tasks join them), and the routers. The
deployment (`app.serving.deployment`) only carries a plan out; `ports_needed` says how many free ports to find for
it first.

Example::

    where = layout(config, detect_gpus(), can_spawn=False)
    deployment_plan = plan(where, resolved, free_ports(where.ports_needed), engine_key=key)
    deployment_plan.servers, deployment_plan.routed["qwen"].router
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from app.config.flags import FlagTable
from app.config.types import DeploymentConfig
from app.errors import ConfigError, Problem
from app.serving.gpus import Demand, Gpu, Placement, place
from app.serving.models import ResolvedModel
from app.serving.scale_out import plan_replicas
from app.sglang.command import (
    EngineCommand,
    Machine,
    MultiNode,
    as_worker,
    build_engine_commands,
    gpus_per_copy,
    replica_servers,
)
from app.sglang.router import router_command


@dataclass(frozen=True)
class Layout:
    """Where a deployment's models go. `config` keeps, per model, the replicas this machine runs."""

    config: DeploymentConfig
    machine: Machine = Machine()
    gpus: tuple[Gpu, ...] = ()
    placements: tuple[Placement, ...] | None = None
    remote_replicas: Mapping[str, int] = field(default_factory=dict)  # endpoint -> replicas in worker tasks

    def routed(self, index: int) -> bool:
        """Whether a model is served through sglang-router (several servers, or worker tasks to join it)."""
        return replica_servers(self.config, index) > 1 or self.config.models[index].endpoint in self.remote_replicas

    @property
    def ports_needed(self) -> int:
        """One per model's server; a routed model's other servers, its router and the router's metrics too."""
        return sum(1 + (replica_servers(self.config, i) + 1 if self.routed(i) else 0)
                   for i in range(len(self.config.models)))


@dataclass(frozen=True)
class RoutedPlan:
    """A model served through sglang-router: its servers on this machine, the router, the router's metrics port,
    and how many replicas worker tasks add."""

    router: EngineCommand
    servers: tuple[EngineCommand, ...]
    metrics_port: int
    remote: int = 0


@dataclass(frozen=True)
class DeploymentPlan:
    layout: Layout
    commands: tuple[EngineCommand, ...]  # each model's command (its first server)
    routed: Mapping[str, RoutedPlan]  # endpoint -> its router and servers
    adapters: Mapping[str, tuple[str, ...]]  # endpoint -> its LoRA adapters' names

    @property
    def config(self) -> DeploymentConfig:
        return self.layout.config

    @property
    def servers(self) -> tuple[EngineCommand, ...]:
        """Every SGLang server this machine runs, model by model."""
        out: list[EngineCommand] = []
        for command in self.commands:
            routed = self.routed.get(command.endpoint)
            out += routed.servers if routed is not None else [command]
        return tuple(out)

    @property
    def routers(self) -> tuple[EngineCommand, ...]:
        return tuple(r.router for r in self.routed.values())


def demands(config: DeploymentConfig, machine: Machine, table: FlagTable | None = None) -> list[Demand]:
    """What each model asks of one machine's GPUs: devices (tp per node x dp x pp) and its own memory fraction."""
    table = table or FlagTable.load()
    out = []
    for i, model in enumerate(config.models):
        if model.cli:
            parsed, _ = table.parse_argv(shlex.split(model.cli))
            values = {spec.dest: v for spec, _, v in parsed}
            devices = 1
            for dest in ("tp_size", "dp_size", "pp_size"):
                devices *= int(values[dest][0]) if values.get(dest) else 1
            fraction = float(values["mem_fraction_static"][0]) if values.get("mem_fraction_static") else None
        else:
            devices = gpus_per_copy(model, machine) * model.replicas
            fraction = model.flag("mem-fraction-static", config.general.flag("mem-fraction-static"))
        out.append(Demand(model.endpoint, devices, fraction, f"models[{i}].gpus"))
    return out


def layout(config: DeploymentConfig, gpus: Sequence[Gpu], *, can_spawn: bool) -> Layout:
    """Replicas split between this machine and worker tasks, and each model placed on this machine's GPUs (the
    CPU development mode has none to place)."""
    if config.general.device != "cuda":
        return Layout(config)
    if not gpus:
        raise ConfigError(Problem("general.device", "is cuda, but this machine has no NVIDIA GPU",
                                  "run on a GPU machine, or set general.device: cpu for the CPU development mode"))
    machine = Machine(gpu_count=len(gpus), gpu_memory_gib=min(g.memory_gib for g in gpus))
    splits = plan_replicas(config, len(gpus), can_spawn=can_spawn)
    remote = {m.endpoint: s.remote for m, s in zip(config.models, splits, strict=True) if s.remote}
    if remote:  # this machine keeps the replicas that fit; worker tasks take the rest
        config = replace(config, models=tuple(replace(m, replicas=s.local)
                                              for m, s in zip(config.models, splits, strict=True)))
    placements = place(demands(config, machine), list(gpus), sleeping=config.general.sleeps)
    return Layout(config, machine, tuple(gpus), tuple(placements), remote)


def plan(where: Layout, resolved: Sequence[ResolvedModel], ports: Sequence[int], *, engine_key: str | None,
         launcher: tuple[str, ...] | None = None, multi_node: MultiNode | None = None,
         python: str = sys.executable) -> DeploymentPlan:
    """Every command of the deployment, from its layout, its resolved models and `where.ports_needed` free ports."""
    config = where.config
    free = iter(ports)
    commands = build_engine_commands(config, list(resolved), [next(free) for _ in resolved], machine=where.machine,
                                     placements=list(where.placements) if where.placements else None,
                                     engine_api_key=engine_key, launcher=launcher, multi_node=multi_node,
                                     python=python)
    routed = {}
    for i, command in enumerate(commands):
        if not where.routed(i):
            continue
        count = replica_servers(config, i)
        servers = [command] if count == 1 else [as_worker(command, r, command.port if r == 0 else next(free))
                                                for r in range(count)]
        metrics_port = next(free)
        model = config.models[i]
        router = router_command(
            command.endpoint, port=next(free), metrics_port=metrics_port,
            worker_urls=[f"http://127.0.0.1:{s.port}" for s in servers], api_key=command.api_key, python=python,
            load_balance_method=model.flag("load-balance-method", config.general.flag("load-balance-method")))
        routed[command.endpoint] = RoutedPlan(router, tuple(servers), metrics_port,
                                              where.remote_replicas.get(command.endpoint, 0))
    adapters = {m.endpoint: tuple(a.name for a in m.lora_modules) for m in resolved}
    return DeploymentPlan(where, tuple(commands), routed, adapters)
