"""What a deployment will run, computed before anything runs (pure): `layout`, then `plan`.

`layout(config, gpus, can_spawn=...)` decides where things go: how many of each model's replicas stay on this
machine and how many go to worker tasks (`app.serving.scale_out`), and each model's GPUs and memory share
(`app.serving.gpus`). `plan(layout, resolved, ports, launch=...)` turns it into every process's command: each model's
SGLang server (its replicas as separate servers behind sglang-router in the CPU development mode, or where worker
tasks join them), and the routers. This is the one place a deployment's commands are made: `clearml-sglang args`
prints a plan, the deployment (`app.serving.deployment`) carries one out, and the instance's other machines
(`app.serving.node`) carry out a node's (`node_plan`). The config is read as it is; what the layout derives from it
(the replicas here, the placements) travels with the plan. `ports_needed` says how many free ports to find first.

Example::

    where = layout(config, detect_gpus(), can_spawn=False)
    deployment_plan = plan(where, resolved, free_ports(where.ports_needed), launch=Launch(engine_key()))
    deployment_plan.servers, deployment_plan.routed["qwen"].router
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from app import constants
from app.config.flags import FlagTable
from app.config.types import DeploymentConfig
from app.errors import ConfigError, Problem
from app.serving.gpus import Demand, Gpu, Placement, place
from app.serving.models import ResolvedModel
from app.serving.scale_out import plan_replicas
from app.sglang.command import (
    EngineCommand,
    Launch,
    Machine,
    MultiNode,
    Site,
    as_worker,
    build_engine_command,
    build_engine_commands,
    gpus_per_copy,
    replica_servers,
)
from app.sglang.router import router_command

# A replica worker's server listens on every address: the instance's router reaches it from another machine.
WORKER_HOST = "0.0.0.0"


@dataclass(frozen=True)
class Layout:
    """Where a deployment's models go: `config` as it was read, and what was derived from it for this machine."""

    config: DeploymentConfig
    machine: Machine = Machine()
    gpus: tuple[Gpu, ...] = ()
    placements: tuple[Placement, ...] | None = None
    local_replicas: tuple[int, ...] = ()  # per model: the replicas this machine runs (default: the config's)
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
    """Every process the instance's machine runs, and the layout they were planned on: what `args` prints and the
    deployment carries out (`app.serving.build`)."""

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

    @property
    def processes(self) -> tuple[EngineCommand, ...]:
        """Every process this machine runs, model by model: its servers, then its router (what `args` prints)."""
        out: list[EngineCommand] = []
        for command in self.commands:
            routed = self.routed.get(command.endpoint)
            out += [*routed.servers, routed.router] if routed is not None else [command]
        return tuple(out)


@dataclass(frozen=True)
class NodePlan:
    """What one of the instance's other machines runs: one SGLang server of one model (`node_plan`)."""

    index: int  # the model's, in the config
    command: EngineCommand
    placement: Placement | None = None


def demand(config: DeploymentConfig, index: int, machine: Machine, replicas: int,
           table: FlagTable | None = None) -> Demand:
    """What `replicas` of one model ask of one machine's GPUs: devices (tp per node x dp x pp) and its own memory
    fraction."""
    model = config.models[index]
    if model.cli:
        parsed, _ = (table or FlagTable.load()).parse_argv(shlex.split(model.cli))
        values = {spec.dest: v for spec, _, v in parsed}
        devices = 1
        for dest in ("tp_size", "dp_size", "pp_size"):
            devices *= int(values[dest][0]) if values.get(dest) else 1
        fraction = float(values["mem_fraction_static"][0]) if values.get("mem_fraction_static") else None
    else:
        devices = gpus_per_copy(model, machine) * replicas
        fraction = model.flag("mem-fraction-static", config.general.flag("mem-fraction-static"))
    return Demand(model.endpoint, devices, fraction, f"models[{index}].gpus")


def demands(config: DeploymentConfig, machine: Machine, table: FlagTable | None = None,
            replicas: Sequence[int] | None = None) -> list[Demand]:
    """What each model asks of one machine's GPUs (`replicas`: each model's on this machine; default: the config's)."""
    table = table or FlagTable.load()
    return [demand(config, i, machine, replicas[i] if replicas else m.replicas, table)
            for i, m in enumerate(config.models)]


def layout(config: DeploymentConfig, gpus: Sequence[Gpu] | None, *, can_spawn: bool,
           machine: Machine | None = None) -> Layout:
    """Replicas split between this machine and worker tasks, and each model placed on this machine's GPUs (the
    CPU development mode has none to place).

    `gpus`: this machine's, detected, or described (`args --gpu-count`); None where they are not known (`args`
    without --gpu-count: nothing is placed). `machine`: what is known of a described machine (default: from `gpus`).
    """
    replicas = tuple(m.replicas for m in config.models)
    if config.general.device != "cuda":
        return Layout(config, machine or Machine(), local_replicas=replicas)
    if gpus is None:
        return Layout(config, machine or Machine(), local_replicas=replicas)
    if not gpus:
        raise ConfigError(Problem("general.device", "is cuda, but this machine has no NVIDIA GPU",
                                  "run on a GPU machine, or set general.device: cpu for the CPU development mode"))
    machine = machine or Machine(gpu_count=len(gpus), gpu_memory_gib=min(g.memory_gib for g in gpus))
    splits = plan_replicas(config, len(gpus), can_spawn=can_spawn)
    remote = {m.endpoint: s.remote for m, s in zip(config.models, splits, strict=True) if s.remote}
    replicas = tuple(s.local for s in splits)  # this machine keeps the replicas that fit; worker tasks take the rest
    placements = place(demands(config, machine, replicas=replicas), list(gpus), sleeping=config.general.sleeps)
    return Layout(config, machine, tuple(gpus), tuple(placements), replicas, remote)


def plan(where: Layout, resolved: Sequence[ResolvedModel], ports: Sequence[int], *, launch: Launch,
         multi_node: MultiNode | None = None) -> DeploymentPlan:
    """Every command of the deployment, from its layout, its resolved models and `where.ports_needed` free ports.
    `multi_node`: this machine's rank (0) when a model spans nodes (None: `args`, which says how the ranks go)."""
    config = where.config
    free = iter(ports)
    commands = build_engine_commands(config, resolved, [next(free) for _ in resolved],
                                     placements=where.placements, replicas=where.local_replicas,
                                     site=Site(where.machine, multi_node=multi_node), launch=launch)
    routed = {}
    for i, command in enumerate(commands):
        if where.routed(i):
            routed[command.endpoint] = _routed(where, i, command, free, launch.python)
    adapters = {m.endpoint: tuple(a.name for a in m.lora_modules) for m in resolved}
    return DeploymentPlan(where, tuple(commands), routed, adapters)


def _routed(where: Layout, index: int, command: EngineCommand, free: Iterator[int], python: str) -> RoutedPlan:
    """A routed model's servers on this machine (each replica its own in the CPU development mode) and its router."""
    config = where.config
    count = replica_servers(config, index)
    servers = [command] if count == 1 else [as_worker(command, r, command.port if r == 0 else next(free))
                                            for r in range(count)]
    metrics_port = next(free)
    model = config.models[index]
    remote = where.remote_replicas.get(command.endpoint, 0)
    router = router_command(
        command.endpoint, port=next(free), metrics_port=metrics_port,
        worker_urls=[f"http://127.0.0.1:{s.port}" for s in servers], api_key=command.api_key, python=python,
        load_balance_method=model.flag("load-balance-method", config.general.flag("load-balance-method")))
    if remote:
        router = replace(router, notes=(*router.notes, f"and {remote} replica(s) in worker tasks, each one SGLang "
                                        "server of this model on a machine of its own, added as it comes up"))
    return RoutedPlan(router, tuple(servers), metrics_port, remote)


def node_plan(config: DeploymentConfig, index: int, resolved: ResolvedModel, gpus: Sequence[Gpu], port: int, *,
              launch: Launch, multi_node: MultiNode | None = None) -> NodePlan:
    """One model's server on another machine of the instance: its rank when the model spans nodes (`multi_node`,
    serving nothing itself), else one replica of it for the instance's router (a worker task, `app.serving.scale_out`:
    one replica, listening on every address). Placed on this machine's GPUs, where it has any."""
    model = config.models[index]
    replicas = model.replicas if multi_node is not None else 1
    machine = Machine(gpu_count=len(gpus), gpu_memory_gib=min((g.memory_gib for g in gpus), default=None))
    placement = place([demand(config, index, machine, replicas)], list(gpus))[0] if gpus else None
    site = Site(machine, WORKER_HOST if multi_node is None else constants.ENGINE_HOST, multi_node)
    command = build_engine_command(config, index, resolved, port=port, placement=placement, replicas=replicas,
                                   site=site, launch=launch)
    return NodePlan(index, command, placement)
