"""Carrying out a plan, part one: every object a deployment runs, made at once from its plan (nothing started).

`build(plan, ...)` makes the engines (one `Engine` per SGLang server), the routers in front of replicas with their
worker lists and the worker tasks that join them, the residency when models share GPUs by sleeping, the gateway's
routes and the gateway, and the two supervisors (servers, then routers). `app.serving.deployment` starts, serves and
stops what it made.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from app.config.types import GeneralConfig
from app.gateway import Gateway, GatewayLimits, KeyRing, ModelRoute, RequestStats
from app.serving.adapter_files import Fetcher
from app.serving.adapters import AdapterStats, EngineAdapters, OnRequestAdapters
from app.serving.engine import Engine
from app.serving.gateway_workers import Front, GatewayWorkers, worker_count, worker_setup
from app.serving.gpus import MAX_MEMORY_FRACTION_PER_DEVICE
from app.serving.idle import IdleTracker
from app.serving.memory import CPU_OFFLOAD, DISK_SWAP, SGLangMemoryControl
from app.serving.models import ModelRegistry
from app.serving.plan import DeploymentPlan
from app.serving.residency import Residency, Slot
from app.serving.scale_out import RemoteWorkers, WorkerPool
from app.serving.startup import OnPhase
from app.serving.supervisor import EngineSupervisor
from app.sglang.api import SGLangClient
from app.sglang.router import RouterWorkers

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass
class RoutedModel:
    """A model served through sglang-router: the router's engine, its worker list, the servers on this machine."""

    router: Engine
    control: RouterWorkers
    servers: list[Engine]
    metrics_port: int

    @property
    def metrics_url(self) -> str:
        """The router's own Prometheus listener (its per-worker counts)."""
        return f"http://127.0.0.1:{self.metrics_port}"


@dataclass(frozen=True)
class GatewayOptions:
    """The gateway's timeouts, where a run changes them (None: the gateway's own default), and its links."""

    upstream_read_timeout_s: float | None = None
    request_receive_timeout_s: float | None = None
    write_timeout_s: float | None = None
    task_url: str | None = None  # the ClearML task's page (the endpoint's page links to it)
    max_connections: int | None = None  # the connection table's size

    def limits(self, general: GeneralConfig) -> GatewayLimits:
        """The gateway's limits: the config's body size and share per client address, and this run's timeouts and
        connection table where it sets them."""
        default = GatewayLimits()
        return GatewayLimits(
            max_body_bytes=int(general.max_request_body_mib * 2**20),
            upstream_read_timeout_s=_given(self.upstream_read_timeout_s, default.upstream_read_timeout_s),
            request_receive_timeout_s=_given(self.request_receive_timeout_s, default.request_receive_timeout_s),
            write_timeout_s=_given(self.write_timeout_s, default.write_timeout_s),
            max_connections=_given(self.max_connections, default.max_connections),
            max_connections_per_address=general.max_connections_per_address)


def _given(value: _T | None, default: _T) -> _T:
    return value if value is not None else default


@dataclass
class Built:
    """Everything a deployment runs, made from its plan."""

    plan: DeploymentPlan
    gateway: Gateway
    tracker: IdleTracker
    supervisor: EngineSupervisor  # the SGLang servers
    routers: EngineSupervisor  # the routers in front of replicas (started once their servers are)
    routed: dict[str, RoutedModel] = field(default_factory=dict)
    remote_workers: dict[str, RemoteWorkers] = field(default_factory=dict)
    residency: Residency | None = None
    adapters: dict[str, OnRequestAdapters] = field(default_factory=dict)  # endpoint -> its adapters on request
    adapter_stats: AdapterStats = field(default_factory=AdapterStats)
    workers: GatewayWorkers | None = None  # the gateway's worker processes (`general.gateway_workers` above one)

    @property
    def front(self) -> Front:
        """The endpoint's port: the gateway, or its workers in front of it."""
        return Front(self.gateway, self.workers)


@dataclass(frozen=True)
class Collaborators:
    """What the built objects talk to: the gateway's request statistics, SGLang's API, the registry that fetches the
    ClearML models adapters on request name, where worker tasks come from (under an agent), the clock."""

    stats: RequestStats
    client: SGLangClient
    registry: ModelRegistry
    worker_pool: WorkerPool | None = None
    clock: Callable[[], float] = time.monotonic


@dataclass
class _Engines:
    """The engines of a plan: the one in front of each model (its server, or its router), every server, the
    routed models and their worker tasks."""

    front: dict[str, Engine] = field(default_factory=dict)
    servers: list[Engine] = field(default_factory=list)
    routed: dict[str, RoutedModel] = field(default_factory=dict)
    remote_workers: dict[str, RemoteWorkers] = field(default_factory=dict)


def build(plan: DeploymentPlan, keys: list[tuple[str, str]], using: Collaborators, *, startup_deadline_s: float,
          gateway_options: GatewayOptions = GatewayOptions(), on_change: Callable[[Engine], None] | None = None,
          on_phase: OnPhase | None = None) -> Built:
    """The deployment's objects; `keys` are the access tokens, (name, token) each, whose limits the config says.
    The tokens and the config's secrets are masked in every engine's log; `on_change` hears every engine's news (the
    deployment passes them on to the residency and the routers); `on_phase` each SGLang server's startup phases."""
    config = plan.config
    stats, client, clock = using.stats, using.client, using.clock
    made = _engines(plan, [*(token for _, token in keys), *config.secrets], using, on_phase)
    front, servers, routed, remote_workers = made.front, made.servers, made.routed, made.remote_workers
    residency = _residency(plan, [front[c.endpoint] for c in plan.commands], client, clock)
    tracker = IdleTracker(config.idle.time_limit_hours * 3600 if config.idle.shuts_down else None,
                          config.idle.report_interval_seconds, clock())
    adapter_stats = AdapterStats()
    adapters = _adapters_on_request(plan, front, client, using.registry, adapter_stats, clock)
    routes = [ModelRoute(c.endpoint, front[c.endpoint], api_key=c.api_key, adapters=plan.adapters[c.endpoint],
                         adapter_loader=adapters.get(c.endpoint), residency=residency,
                         wake_deadline_s=config.general.wake_deadline_seconds,
                         restart_hold_s=config.general.restart_hold_seconds)
              for c in plan.commands]
    ring = KeyRing((name, token, config.auth.limits_for(name)) for name, token in keys)
    limits = gateway_options.limits(config.general)
    gateway = Gateway(routes, ring, stats, activity=tracker, clock=clock, limits=limits,
                      task_url=gateway_options.task_url)
    count = worker_count(config.general.gateway_workers, len(os.sched_getaffinity(0)),
                         [len(p.devices) for p in plan.layout.placements] if plan.layout.placements else None)
    workers = GatewayWorkers(count, gateway, worker_setup(
        [(name, token, config.auth.limits_for(name).set_values()) for name, token in keys], gateway, limits, count,
        gateway_options.task_url), stats=stats, tracker=tracker, clock=clock) if count > 1 else None
    supervisor = EngineSupervisor(
        servers, startup_deadline_s=startup_deadline_s, clock=clock,
        admit=residency.admit if residency else None, on_ready=residency.started if residency else None,
        on_change=on_change)
    routers = EngineSupervisor([r.router for r in routed.values()], startup_deadline_s=startup_deadline_s,
                               clock=clock)
    return Built(plan, gateway, tracker, supervisor, routers, routed, remote_workers, residency, adapters,
                 adapter_stats, workers)


def _engines(plan: DeploymentPlan, secrets: list[str], using: Collaborators, on_phase: OnPhase | None) -> _Engines:
    """One `Engine` per SGLang server and router of the plan, each router's worker list, each model's worker tasks."""
    client, made = using.client, _Engines()
    for command in plan.commands:
        route_plan = plan.routed.get(command.endpoint)
        if route_plan is None:
            made.servers.append(engine := Engine(command, secrets=secrets, probe=client.healthy, on_phase=on_phase))
            made.front[command.endpoint] = engine
            continue
        workers = [Engine(c, secrets=secrets, probe=client.healthy, on_phase=on_phase) for c in route_plan.servers]
        control = RouterWorkers(f"http://127.0.0.1:{route_plan.router.port}", command.api_key, client=client)
        router = Engine(route_plan.router, secrets=secrets, probe=control.readiness(len(workers)))
        made.servers += workers
        made.front[command.endpoint] = router
        made.routed[command.endpoint] = RoutedModel(router, control, workers, route_plan.metrics_port)
        if route_plan.remote:
            assert using.worker_pool is not None
            made.remote_workers[command.endpoint] = RemoteWorkers(
                command.endpoint, route_plan.remote, using.worker_pool, add=control.add, remove=control.remove,
                engine_key=command.api_key)
        logger.info("Model %s: %d SGLang server(s) here%s behind sglang-router", command.endpoint, len(workers),
                    f" and {route_plan.remote} replica(s) in worker tasks" if route_plan.remote else "")
    return made


def _adapters_on_request(plan: DeploymentPlan, front: dict[str, Engine], client: SGLangClient,
                         registry: ModelRegistry, stats: AdapterStats,
                         clock: Callable[[], float]) -> dict[str, OnRequestAdapters]:
    """Each model that loads adapters on request (one SGLang server each: the config's rules see to it)."""
    config = plan.config
    fetch = Fetcher(registry, config.general.hf_token)
    adapters = {}
    for model in config.models:
        if model.lora.on_request and not model.cli:
            engine = front[model.endpoint]
            assert model.endpoint not in plan.routed, "adapters on request need one SGLang server"
            adapters[model.endpoint] = OnRequestAdapters(
                model.endpoint, model.lora, engine=EngineAdapters(client, engine.url, engine.command.api_key),
                fetch=fetch, base_model=engine.command.model_path or "", stats=stats, clock=clock)
            logger.info("Model %s loads LoRA adapters on request from: %s (at most %d loaded)", model.endpoint,
                        ", ".join(model.lora.on_request), model.lora.loaded_cap)
    return adapters


def _residency(plan: DeploymentPlan, engines: list[Engine], client: SGLangClient,
               clock: Callable[[], float]) -> Residency | None:
    """With CPU offloading or disk swapping on GPUs: who is resident, who sleeps (app.serving.residency)."""
    general = plan.config.general
    placements = plan.layout.placements
    if not general.sleeps or placements is None:
        return None
    memory = {g.index: g.memory_gib for g in plan.layout.gpus}
    slots = [Slot(e.endpoint, p.devices, (p.memory_fraction or MAX_MEMORY_FRACTION_PER_DEVICE)
                  * min(memory[d] for d in p.devices))
             for e, p in zip(engines, placements, strict=True)]
    control = SGLangMemoryControl(CPU_OFFLOAD if general.auto_cpu_offload else DISK_SWAP,
                                  model_paths={e.endpoint: e.command.model_path or "" for e in engines},
                                  api_keys={e.endpoint: e.command.api_key for e in engines}, client=client)
    logger.info("Models share GPUs by %s: a model idle %s gives its memory back",
                "CPU offloading" if general.auto_cpu_offload else "disk swapping",
                f"for {general.sleep_after_idle_seconds} s or" if general.sleep_after_idle_seconds else "")
    return Residency(slots, {e.endpoint: e for e in engines}, control,
                     budget_gib={i: m * MAX_MEMORY_FRACTION_PER_DEVICE for i, m in memory.items()},
                     sleep_after_s=general.sleep_after_idle_seconds, protect_s=general.wake_deadline_seconds,
                     clock=clock)

