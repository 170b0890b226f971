"""Serving a deployment: plan → build → start engines behind the gateway → serve → drain → stop.

`Deployment.run()` is what `clearml-sglang run` does once the config is loaded: it resolves the models, lays them
out and plans every command (`app.serving.plan`, pure), builds what the plan says (`app.serving.build`), then carries
it out; every report interval its report is read off what was built (`app.serving.readings`) and handed to its
reporter. Its collaborators (model registry, GPU detection, reporter, clock) are passed in; signals only set the stop
request, which the loop observes; background work runs as `Chores`. Teardown runs in reverse order of startup, in
`finally`, with every wait bounded.

Exit codes (`app.constants`): 0 after an idle shutdown, 3 when an engine failed to start or crashed beyond its
restart budget, 128 + signal number after SIGINT/SIGTERM and a clean drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine

from app.config.types import DeploymentConfig
from app.constants import EXIT_OK
from app.gateway import RequestStats
from app.serving.benchmark import benchmark_deployment
from app.serving.build import Built, Collaborators, GatewayOptions, build
from app.serving.engine import Engine
from app.serving.failures import EngineStartupError
from app.serving.gpus import Gpu, available_memory, detect_gpus
from app.serving.idle import IdleDecision
from app.serving.lifecycle import Lifecycle, Reporter, RunOptions
from app.serving.models import ModelRegistry
from app.serving.network import access_keys, curl_command, engine_key, free_ports, public_address, token_reference
from app.serving.plan import DeploymentPlan, layout, plan
from app.serving.readings import Readings, model_states
from app.serving.report import Span
from app.serving.scale_out import RemoteWorkers, WorkerPool
from app.serving.startup import StartupTimeline
from app.sglang.api import SGLangClient
from app.sglang.command import Launch, Machine, MultiNode
from app.sglang.logs import Phase
from app.sglang.router import RouterError
from app.states import EngineState, ModelState, Status

logger = logging.getLogger(__name__)

__all__ = ["Deployment", "RunOptions"]  # (RunOptions lives with the lifecycle the instance and its nodes share)

# How often the loop looks at the idle policy and the engines; reports go out every report interval.
TICK_SECONDS = 1.0
# How often worker tasks are looked at (each look is a few ClearML calls).
SCALE_TICK_SECONDS = 10.0


class Chores:
    """The deployment's background work, each a task on the loop that none outlives: idle models put to sleep
    (models sharing GPUs), worker tasks kept at their count, routers told of worker deaths and returns, status
    reasons while engines load, the benchmark at ready."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[object]] = set()
        self.sleeper: asyncio.Task[object] | None = None
        self.scaler: asyncio.Task[object] | None = None
        self.next_scale = 0.0

    def spawn(self, work: Awaitable[object], name: str | None = None) -> asyncio.Task[object]:
        task = asyncio.ensure_future(work)
        if name:
            task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def tick(self, built: Built, now: float) -> None:
        """Idle models to sleep (models sharing GPUs); worker tasks kept at their count."""
        if built.residency is not None and (self.sleeper is None or self.sleeper.done()):
            self.sleeper = self.spawn(built.residency.sleep_idle(), "sleep-idle-models")
        if built.remote_workers and now >= self.next_scale and (self.scaler is None or self.scaler.done()):
            self.next_scale = now + SCALE_TICK_SECONDS
            self.scaler = self.spawn(scale(built.remote_workers), "remote-workers")

    async def wind_down(self, built: Built) -> None:
        """Shutdown begins: no more sleeping or scaling, and the worker tasks are stopped."""
        for task in (self.scaler, self.sleeper):
            if task is not None:
                task.cancel()
        for remote in built.remote_workers.values():
            with contextlib.suppress(Exception):
                await remote.stop()
        if self.sleeper is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.sleeper

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


class Deployment(Lifecycle):
    """Everything `run` serves. Constructing it starts nothing; `run()` does, and returns the exit code."""

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, *, options: RunOptions = RunOptions(),
                 reporter: Reporter | None = None, detect: Callable[[], list[Gpu]] = detect_gpus,
                 clock: Callable[[], float] = time.monotonic, multi_node: MultiNode | None = None,
                 worker_pool: WorkerPool | None = None):
        """`multi_node`: rank 0 of a model spanning nodes (ClearML's multi-node launch started the others).
        `worker_pool`: where replicas that do not fit on this machine's GPUs go (under an agent: worker tasks)."""
        super().__init__(config, registry, reporter=reporter, options=options, detect=detect, clock=clock,
                         multi_node=multi_node)
        self.worker_pool = worker_pool
        self.stats = RequestStats()
        self.client = SGLangClient()
        self.built: Built | None = None  # what run() builds from its plan, at once
        self.readings = Readings(self.stats, self.client, clock)  # what each report says
        self.chores = Chores()
        self._routing = False  # the routers are up: worker deaths and returns are passed on to them
        self._reporting = False  # the serving loop has begun: a last report is owed at the end
        self.timeline = StartupTimeline(options.process_started or clock(), list(options.prior))

    # what was built, by name (None before run() has built it)
    gateway = property(lambda self: self.built.gateway if self.built else None)
    supervisor = property(lambda self: self.built.supervisor if self.built else None)
    routers = property(lambda self: self.built.routers if self.built else None)
    residency = property(lambda self: self.built.residency if self.built else None)
    routed = property(lambda self: self.built.routed if self.built else {})
    remote_workers = property(lambda self: self.built.remote_workers if self.built else {})

    def plan(self, resolved: list) -> DeploymentPlan:
        """Lay the models out on this machine and plan every command (pure, given the GPUs and free ports)."""
        cpu = self.config.general.device == "cpu"
        where = layout(self.config, [] if cpu else self.detect(), can_spawn=self.worker_pool is not None,
                       machine=Machine(memory_available_bytes=available_memory()) if cpu else None)
        for model, placement in zip(self.config.models, where.placements or (), strict=False):
            logger.info("Model %s on GPU %s%s", model.endpoint, placement.cuda_visible_devices,
                        f" (shared; memory fraction {placement.memory_fraction:g})" if placement.shared else "")
        ports = free_ports(where.ports_needed, exclude=frozenset({self.options.port}))
        planned = plan(where, resolved, ports, launch=Launch(engine_key(), launcher=self.options.launcher),
                       multi_node=self.multi_node)
        self.timeline.notes = {command.endpoint: command.notes for command in planned.commands if command.notes}
        return planned  # (SGLang's own parser checks them as each engine starts: importing it here costs seconds)

    async def run(self) -> int:
        self.readings.begin()
        try:
            return await self._run()
        finally:
            await self.client.close()
            await self.tell(self.reporter.close)

    async def _run(self) -> int:
        keys, generated = access_keys(self.config, self.environ)  # (a ConfigError before anything is fetched)
        resolved, fetched_s = await self.resolve_and_check()  # (pre-flight's problems: a ConfigError, nothing started)
        self.timeline.fetched(fetched_s)
        planned = self.plan(resolved)
        if generated:
            await self.tell(self.reporter.access_token, keys[0][1])
        options = self.options
        self.built = built = build(
            planned, keys, Collaborators(self.stats, self.client, self.registry, self.worker_pool, self.clock),
            startup_deadline_s=options.startup_deadline_s,
            gateway_options=GatewayOptions(options.upstream_read_timeout_s, options.request_receive_timeout_s,
                                           options.write_timeout_s, options.task_url, options.max_connections),
            on_change=self._engine_changed, on_phase=self._engine_phase)
        try:
            await built.front.start(options.host, options.port)
            await self.tell(self.reporter.status, Status.LOADING, "starting engines")
            await self.tell(self.reporter.states, self.states())
            try:
                await unless_stopped(self._start_all(built), self._stop)
            except EngineStartupError as exc:
                return await self.fail(exc)
            if self._stop.is_set():
                return await self.signal_exit()
            await learn_context_lengths(built, self.client)
            await self._announce(built)
            built.tracker.reset(self.clock())
            return await self._serve(built)
        finally:
            await self._shutdown(built)
            await self.tell(self.reporter.states, self.states())

    def _engine_changed(self, engine: Engine) -> None:
        """The supervisor's news: the residency policy hears of crashes; a router stops sending requests to a worker
        that died and takes it back once its restart is ready."""
        if self.residency is not None:
            self.residency.engine_changed(engine)
        adapters = self.built.adapters.get(engine.endpoint) if self.built is not None else None
        if adapters is not None and engine.state == EngineState.RESTARTING:
            adapters.forget()
        if not self._routing:
            return
        for routed in self.routed.values():
            if engine in routed.servers and engine.state in (EngineState.RESIDENT, EngineState.RESTARTING,
                                                             EngineState.FAILED, EngineState.STOPPED):
                control = routed.control
                change = control.add(engine.url) if engine.state == EngineState.RESIDENT else control.remove(engine.url)
                self.chores.spawn(_router_change(change, engine))

    def _engine_phase(self, endpoint: str, phase: Phase, left: Span | None) -> None:
        """An SGLang server moved on in its startup: the status reason while the deployment loads (its console line
        says it), else a console line."""
        logger.log(logging.INFO if self._reporting else logging.DEBUG, "Engine %s: %s%s", endpoint, phase.value,
                   f" ({left} done)" if left else "")
        if not self._reporting:
            self.chores.spawn(self.tell(self.reporter.status, Status.LOADING, f"{endpoint}: {phase.value}"))

    async def _start_all(self, built: Built) -> None:
        """The engines, then the routers in front of replicas (each over workers that are ready)."""
        await built.supervisor.start_all()
        await built.routers.start_all()
        self._routing = True

    async def _announce(self, built: Built) -> None:
        """Every engine serves: how long each startup phase took, then where to send requests, and how."""
        summary = self.timeline.all_ready(built.supervisor.engines, self.clock())
        logger.info("%s", "\n".join(summary.lines()))
        await self.tell(self.reporter.startup, summary)
        port = built.front.port
        assert port is not None
        host = self.options.public_host or (public_address(self.environ) if self.options.host == "0.0.0.0"
                                            else self.options.host)
        local = f"http://{host}:{port}"
        base = await self.tell(self.reporter.base_url, port, local) or local
        models = {name: f"{base}/{name}/v1" for name in built.gateway.routes}
        curl = curl_command(base, next(iter(models)), token_reference(self.config, self.environ))
        await self.tell(self.reporter.endpoints, base, models, curl)
        await self.tell(self.reporter.states, self.states())
        if self.config.benchmark.enable:
            self.chores.spawn(self._benchmark(built, f"http://{_loopback(self.options.host)}:{port}"))

    async def _benchmark(self, built: Built, base: str) -> None:
        """SGLang's benchmark through the endpoint, reported; `bench` then stops (exit 0), whatever happened."""
        try:
            await self.tell(self.reporter.benchmark, await benchmark_deployment(
                self.config, built.plan.commands, base, built.gateway.quiet_token, built.supervisor))
        except Exception:
            logger.exception("The benchmark at ready failed")
        finally:
            if self.options.exit_after_benchmark:
                self.request_stop(0, "benchmark finished")

    async def _serve(self, built: Built) -> int:
        self._reporting = True
        interval = self.config.idle.report_interval_seconds
        next_report = self.clock()
        shown: tuple[Status, str] | None = None
        states = self.states()
        while True:
            now = self.clock()
            decision = built.tracker.decide(now)
            status = dashboard_status(decision, built.supervisor.restarting())
            if status != shown:
                shown = status
                await self.tell(self.reporter.status, *status)
            if self.states() != states:
                states = self.states()
                await self.tell(self.reporter.states, states)
            if now >= next_report:
                await self._report(built, decision)
                next_report = now + interval
            self.chores.tick(built, now)
            if decision.stop:
                logger.info("Idle for %.0f s (limit %.0f s): shutting down", decision.idle_for_s,
                            built.tracker.limit_seconds or 0)
                await self.tell(self.reporter.status, Status.STOPPED, "idle time limit reached")
                return EXIT_OK
            for supervisor in (built.supervisor, built.routers):
                if supervisor.failed.is_set() and supervisor.failure is not None:
                    return await self.fail(supervisor.failure)
            if self._stop.is_set():
                return await self.signal_exit()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(TICK_SECONDS, max(0.05, next_report - now)))

    def states(self) -> dict[str, ModelState]:
        """Each model's state, and each replica server's where a router spreads a model (`<endpoint>/<n>`, …)."""
        return model_states(self.built, self.config, self.multi_node) if self.built is not None else {}

    async def _report(self, built: Built, decision: IdleDecision) -> None:
        await self.tell(self.reporter.report, await self.readings.take(built, decision, self.states()))

    async def _shutdown(self, built: Built) -> None:
        await self.chores.wind_down(built)
        front = built.front
        front.begin_drain()
        if front.in_flight:
            logger.info("Draining %d request(s) in flight (at most %.0f s)", front.in_flight,
                        self.options.drain_deadline_s)
        if not await front.wait_drained(self.options.drain_deadline_s):
            logger.warning("%d request(s) still in flight after the drain deadline", front.in_flight)
        if self._reporting:  # the last word: what happened since the last report, drain included
            await self._report(built, built.tracker.decide(self.clock()))
        self._routing = False
        await built.routers.stop_all(self.options.engine_stop_grace_s)
        await built.supervisor.stop_all(self.options.engine_stop_grace_s)
        self.chores.cancel()
        await front.close()
        logger.info("Deployment stopped")


def dashboard_status(decision: IdleDecision, restarting: list[str]) -> tuple[Status, str]:
    """The status the dashboard shows, and its reason: loading while an engine comes back from a crash (the
    dashboard's four states have no other word for it), else the idle policy's active or idle."""
    if restarting:
        return Status.LOADING, "; ".join(restarting)
    return decision.state, ""


async def learn_context_lengths(built: Built, client: SGLangClient) -> None:
    """Each model's context length, as its engine (or router) says: the gateway refuses a prompt far longer than it
    before the engine spends its time tokenizing it."""
    for route in built.gateway.routes.values():
        route.context_tokens = await client.context_length(route.engine.url, route.api_key)
        if route.context_tokens is None:
            logger.warning("Model %s did not say its context length: prompts are bounded by the body limit only",
                           route.endpoint)


async def unless_stopped(work: Coroutine[object, object, None], stop: asyncio.Event) -> None:
    """`work` to its end, or cancelled when a stop is asked first (then a failure it raises is moot)."""
    start = asyncio.create_task(work)
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if start in done:
        stopped.cancel()
        start.result()
    else:
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError, EngineStartupError):
            await start


async def _router_change(change: Awaitable[None], engine: Engine) -> None:
    try:
        await change
    except RouterError as exc:
        logger.warning("Could not tell the router about %s (%s): %s", engine.endpoint, engine.state, exc)


async def scale(remote_workers: dict[str, RemoteWorkers]) -> None:
    """Keep each model's worker tasks at their count, their URLs in its router."""
    for remote in remote_workers.values():
        try:
            await remote.tick()
        except Exception:
            logger.exception("Managing the worker tasks of %s failed; trying again shortly", remote.endpoint)


def _loopback(host: str) -> str:
    """Where this machine reaches a gateway listening on `host`."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
