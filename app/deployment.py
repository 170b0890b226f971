"""Serving a deployment: resolve → place → build → start engines behind the gateway → watch → drain → stop.

`Deployment.run()` is what `clearml-sglang run` does once the config is loaded. Its collaborators (model
registry, GPU detection, reporter, clock) are passed in; signals only set `stop_signal`, which the loop observes.
Teardown runs in reverse order of startup, in `finally`, with every wait bounded.

Exit codes (DESIGN section 3): 0 after an idle shutdown, 3 when an engine failed to start or crashed beyond its
restart budget, 128 + signal number after SIGINT/SIGTERM and a clean drain.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

import aiohttp

from app import constants
from app.config.types import DeploymentConfig
from app.engine import FAILED as ENGINE_FAILED
from app.engine import (
    RESIDENT,
    RESTARTING,
    Engine,
    EngineStartupError,
    EngineSupervisor,
    classify_failure,
    http_health_probe,
)
from app.engine import STOPPED as ENGINE_STOPPED
from app.errors import ConfigError, Problem
from app.gateway import Gateway, ModelRoute, RequestStats, TokenChecker
from app.gateway.auth import generate_token
from app.gateway.stats import WindowSummary
from app.gpus import MAX_MEMORY_FRACTION_PER_DEVICE, Gpu, Placement, detect_gpus, place
from app.idle import IdleDecision, IdleTracker
from app.metrics import ZERO, TokenRate, TokenTotals, parse_prometheus
from app.models import ModelRegistry, ResolvedModel, resolve
from app.residency import (
    CPU_OFFLOAD,
    DISK_SWAP,
    SLEEPING,
    WAKING,
    Residency,
    SGLangMemoryControl,
    Slot,
    WakeStats,
)
from app.router import RouterError, RouterWorkers, requests_per_worker, router_command
from app.scale_out import RemoteWorkers, WorkerPool, plan_replicas
from app.sglang_command import (
    EngineCommand,
    Machine,
    MultiNode,
    as_worker,
    build_engine_commands,
    demands,
    replica_servers,
)

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ENGINE = 0, 3
# Longest wait for requests in flight to finish once shutdown begins; a stream longer than this is cut.
DRAIN_DEADLINE_SECONDS = 300.0
# Grace for each engine between SIGTERM and SIGKILL.
ENGINE_STOP_GRACE_SECONDS = 20.0
# How often the loop looks at the idle policy and the engines; reports go out every report interval.
TICK_SECONDS = 1.0
# How often worker tasks are looked at (each look is a few ClearML calls).
SCALE_TICK_SECONDS = 10.0
# Longest wait for one report (a call to ClearML, which may retry on the network): past it, serving goes on.
REPORT_TIMEOUT_SECONDS = 30.0

LOADING, ACTIVE, IDLE, STOPPED, FAILED = "loading", "active", "idle", "stopped", "failed"


class Reporter(Protocol):
    """Where the deployment says what it does: its ClearML task (`app.reporting.TaskReporter`), or the console.

    The deployment calls it from a worker thread (a report may wait on the network), one call at a time.
    """

    def status(self, state: str, reason: str = "") -> None: ...

    def access_token(self, token: str) -> None: ...

    def base_url(self, port: int, local_url: str) -> str: ...

    def endpoints(self, base_url: str, models: dict[str, str], curl: str) -> None: ...

    def states(self, states: dict[str, str]) -> None: ...

    def report(self, elapsed_s: float, decision: IdleDecision, window: WindowSummary, stats: RequestStats,
               states: dict[str, str], tokens: TokenTotals | None = None, wakes: WakeStats | None = None,
               replicas: dict[str, float] | None = None) -> None:
        ...

    def close(self) -> None: ...


class ReportWorker:
    """Runs reporter calls one at a time, in order, on a daemon thread: a call that hangs holds up nothing else,
    not even the interpreter's exit (the default executor's threads are joined when the loop closes)."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[object], Callable[..., object], tuple]] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, method: Callable[..., object], *args: object) -> concurrent.futures.Future[object]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="reporter", daemon=True)
            self._thread.start()
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._calls.put((future, method, args))
        return future

    def _work(self) -> None:
        while True:
            future, method, args = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(method(*args))
                except BaseException as exc:  # handed to the awaiting side
                    future.set_exception(exc)


class ConsoleReporter:
    """Reports to the log only (and never a token)."""

    def status(self, state: str, reason: str = "") -> None:
        logger.info("Status: %s%s", state, f" ({reason})" if reason else "")

    def base_url(self, port: int, local_url: str) -> str:
        return local_url

    def endpoints(self, base_url: str, models: dict[str, str], curl: str) -> None:
        logger.info("Endpoint: %s", base_url)
        for name, url in models.items():
            logger.info("  model %s: %s", name, url)
        logger.info("Try it:\n%s", curl)

    def states(self, states: dict[str, str]) -> None:
        logger.debug("Models: %s", states)

    def close(self) -> None:
        pass

    def access_token(self, token: str) -> None:
        """Never printed: written to a file only this user can read, whose path is printed."""
        from app.demo import cache_dir

        path = cache_dir() / "access-token"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        os.chmod(path, 0o600)
        logger.info("No access token was configured: one was generated and saved to %s (readable by you only). "
                    "Set %s (comma-separated) to choose your own.", path, constants.API_TOKENS_ENV)

    def report(self, elapsed_s: float, decision: IdleDecision, window: WindowSummary, stats: RequestStats,
               states: dict[str, str], tokens: TokenTotals | None = None, wakes: WakeStats | None = None,
               replicas: dict[str, float] | None = None) -> None:
        logger.info("%d requests in total, %d in flight, idle for %.0f s", stats.total_requests, decision.in_flight,
                    decision.idle_for_s)


@dataclass(frozen=True)
class RunOptions:
    host: str = "0.0.0.0"
    port: int = constants.GATEWAY_DEFAULT_PORT
    public_host: str | None = None  # the address printed in URLs; default: this machine's
    startup_deadline_s: float = 1800.0
    drain_deadline_s: float = DRAIN_DEADLINE_SECONDS
    engine_stop_grace_s: float = ENGINE_STOP_GRACE_SECONDS
    upstream_read_timeout_s: float | None = None
    launcher: tuple[str, ...] | None = None  # instead of `python -m sglang.launch_server` (tests' stand-in)
    request_receive_timeout_s: float | None = None  # a client has this long to send a whole request
    write_timeout_s: float | None = None  # a client that reads none of its answer this long is cut off


async def scrape_metrics(url: str) -> str:
    """An engine's /metrics text (open without a key, as in SGLang); empty when it does not answer."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                session.get(url + "/metrics") as response:
            return await response.text() if response.status == 200 else ""
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return ""


def access_tokens(config: DeploymentConfig, environ: dict[str, str]) -> tuple[list[str], bool]:
    """The gateway's tokens: the config's and CLEARML_SGLANG_API_TOKENS'; one generated when there are none."""
    tokens = list(config.auth.tokens)
    tokens += [t.strip() for t in environ.get(constants.API_TOKENS_ENV, "").split(",") if t.strip()]
    if tokens:
        return tokens, False
    return [generate_token()], True


def free_ports(count: int, host: str = constants.ENGINE_HOST, exclude: frozenset[int] = frozenset()) -> list[int]:
    """Ports free right now on loopback (the OS picks them), one per engine, none of `exclude` (the gateway's)."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
            if s.getsockname()[1] not in exclude:
                ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def engine_key() -> str:
    """The key only the gateway knows. Hex, not url-safe base64: a value starting with "-" would be read as an
    option by SGLang's argument parser (and by ours)."""
    return secrets.token_hex(24)


def public_address(environ: dict[str, str]) -> str:
    """How other machines reach this one: the agent's host IP when it set one, else this host's address."""
    if environ.get("CLEARML_AGENT_HOST_IP"):
        return environ["CLEARML_AGENT_HOST_IP"]
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


def curl_command(base_url: str, endpoint: str, token_placeholder: str = "YOUR_GENERATED_TOKEN") -> str:
    """A command that works as printed (once the placeholder is replaced by a token)."""
    return (f"curl {base_url}/{endpoint}/v1/chat/completions \\\n"
            f"  -H 'Authorization: Bearer {token_placeholder}' -H 'Content-Type: application/json' \\\n"
            f"  -d '{{\"model\": \"{endpoint}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], "
            f"\"max_tokens\": 64}}'")


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


class Deployment:
    """Everything `run` serves. Constructing it starts nothing; `run()` does, and returns the exit code."""

    def __init__(
        self,
        config: DeploymentConfig,
        registry: ModelRegistry,
        *,
        options: RunOptions = RunOptions(),
        reporter: Reporter | None = None,
        detect: Callable[[], list[Gpu]] = detect_gpus,
        clock: Callable[[], float] = time.monotonic,
        environ: dict[str, str] | None = None,
        multi_node: MultiNode | None = None,
        worker_pool: WorkerPool | None = None,
    ):
        """`multi_node`: rank 0 of a model spanning nodes (ClearML's multi-node launch started the others).
        `worker_pool`: where replicas that do not fit on this machine's GPUs go (under an agent: worker tasks)."""
        self.config = config
        self.multi_node = multi_node
        self.worker_pool = worker_pool
        self.remote_replicas: dict[str, int] = {}
        self.remote_workers: dict[str, RemoteWorkers] = {}
        self._scaler: asyncio.Task[None] | None = None
        self._next_scale = 0.0
        self.registry = registry
        self.options = options
        self.reporter = reporter or ConsoleReporter()
        self.detect = detect
        self.clock = clock
        self.environ = dict(os.environ if environ is None else environ)
        self.stop_signal: int | None = None
        self.stop_reason = ""
        self.failure_reason = ""
        self._stop = asyncio.Event()
        self.gateway: Gateway | None = None
        self.supervisor: EngineSupervisor | None = None
        self.stats = RequestStats()
        self._reports = ReportWorker()
        self._serving: tuple[IdleTracker, float, TokenRate] | None = None
        self._placements: list[Placement] | None = None
        self._gpus: list[Gpu] = []
        self.residency: Residency | None = None
        self.routers: EngineSupervisor | None = None
        self.routed: dict[str, RoutedModel] = {}  # models served through sglang-router, by endpoint
        self._routing = False  # the routers are up: worker deaths and returns are passed on to them
        self._router_changes: set[asyncio.Task[None]] = set()
        self._sleeper: asyncio.Task[list[str]] | None = None

    def request_stop(self, signum: int, reason: str = "") -> None:
        """Called from a signal handler (or the abort callback, on the loop): drain and stop, exit 128 + signum."""
        self.stop_signal = signum
        self.stop_reason = reason
        self._stop.set()

    async def _tell(self, method: Callable[..., object], *args: object) -> object:
        """A reporter call, off the event loop (it may wait on the network), bounded in time; a failing or hanging
        report never stops serving, and never holds up the exit."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._reports.submit(method, *args)),
                                          REPORT_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("Reporting (%s) took longer than %.0f s; going on without it",
                           getattr(method, "__name__", method), REPORT_TIMEOUT_SECONDS)
        except Exception:
            logger.exception("Reporting failed")
        return None

    async def run(self) -> int:
        started = self.clock()
        try:
            return await self._run(started)
        finally:
            await self._tell(self.reporter.close)

    async def _run(self, started: float) -> int:
        await self._tell(self.reporter.status, LOADING, "resolving models")
        resolved = await asyncio.to_thread(resolve, self.config, self.registry)
        commands = self._commands(resolved)
        tokens, generated = access_tokens(self.config, self.environ)
        if generated:
            await self._tell(self.reporter.access_token, tokens[0])
        secrets_to_mask = [*tokens, *self.config.secrets]
        engines, routers, front = self._engines(commands, secrets_to_mask)
        tracker = IdleTracker(self.config.idle.time_limit_hours * 3600 if self.config.idle.shuts_down else None,
                              self.config.idle.report_interval_seconds, self.clock())
        adapters = {m.endpoint: tuple(a.name for a in m.lora_modules) for m in resolved}
        self.residency = self._residency([front[c.endpoint] for c in commands])
        routes = [ModelRoute(c.endpoint, front[c.endpoint], api_key=c.api_key, adapters=adapters[c.endpoint],
                             residency=self.residency, wake_deadline_s=self.config.general.wake_deadline_seconds,
                             restart_hold_s=self.config.general.restart_hold_seconds)
                  for c in commands]
        gateway_kwargs = {}
        if self.options.upstream_read_timeout_s is not None:
            gateway_kwargs["upstream_read_timeout_s"] = self.options.upstream_read_timeout_s
        if self.options.request_receive_timeout_s is not None:
            gateway_kwargs["request_receive_timeout_s"] = self.options.request_receive_timeout_s
        if self.options.write_timeout_s is not None:
            gateway_kwargs["write_timeout_s"] = self.options.write_timeout_s
        self.gateway = Gateway(routes, TokenChecker(tokens), self.stats, activity=tracker, clock=self.clock,
                               **gateway_kwargs)
        residency = self.residency
        self.supervisor = EngineSupervisor(
            engines, startup_deadline_s=self.options.startup_deadline_s, clock=self.clock,
            admit=residency.admit if residency else None, on_ready=residency.started if residency else None,
            on_change=self._engine_changed)
        self.routers = EngineSupervisor(routers, startup_deadline_s=self.options.startup_deadline_s,
                                        clock=self.clock)
        try:
            await self.gateway.start(self.options.host, self.options.port)
            await self._tell(self.reporter.status, LOADING, "starting engines")
            await self._tell(self.reporter.states, self.states())
            try:
                await self._until_started()
            except EngineStartupError as exc:
                return await self._fail(exc)
            if self._stop.is_set():
                return await self._signal_exit()
            await self._announce()
            tracker.reset(self.clock())
            return await self._serve(tracker, started)
        finally:
            await self._shutdown()
            if self.gateway is not None:
                await self._tell(self.reporter.states, self.states())

    def _commands(self, resolved: list[ResolvedModel]) -> list[EngineCommand]:
        config = self.config
        placements, machine = None, Machine()
        if config.general.device == "cuda":
            gpus = self.detect()
            if not gpus:
                raise ConfigError(Problem("general.device", "is cuda, but this machine has no NVIDIA GPU",
                                          "run on a GPU machine, or set general.device: cpu for the CPU "
                                          "development mode"))
            machine = Machine(gpu_count=len(gpus), gpu_memory_gib=min(g.memory_gib for g in gpus))
            plans = plan_replicas(config, len(gpus), can_spawn=self.worker_pool is not None)
            self.remote_replicas = {m.endpoint: p.remote for m, p in zip(config.models, plans, strict=True)
                                    if p.remote}
            if self.remote_replicas:  # this machine keeps the replicas that fit; worker tasks take the rest
                config = replace(config, models=tuple(replace(m, replicas=p.local)
                                                      for m, p in zip(config.models, plans, strict=True)))
            placements = place(demands(config, machine), gpus, sleeping=config.general.sleeps)
            for m, p in zip(config.models, placements, strict=True):
                logger.info("Model %s on GPU %s%s", m.endpoint, p.cuda_visible_devices,
                            f" (shared; memory fraction {p.memory_fraction:g})" if p.shared else "")
            self._placements, self._gpus = placements, gpus
        ports = free_ports(len(resolved), exclude=frozenset({self.options.port}))
        return build_engine_commands(config, resolved, ports, machine=machine,
                                     placements=placements, engine_api_key=engine_key(),
                                     launcher=self.options.launcher, multi_node=self.multi_node)

    def _engines(self, commands: list[EngineCommand], secrets: list[str]) -> tuple[
            list[Engine], list[Engine], dict[str, Engine]]:
        """The engines to supervise, the routers in front of models served by several servers (replicas in the CPU
        mode), and the engine each model's route talks to (its only engine, or its router)."""
        counts = [replica_servers(self.config, i) for i in range(len(commands))]
        taken = {self.options.port, *(c.port for c in commands)}
        routed = [n > 1 or c.endpoint in self.remote_replicas for n, c in zip(counts, commands, strict=True)]
        # a routed model: its servers but the first (which keeps the model's port), the router and its metrics
        extra = iter(free_ports(sum(n + 1 for n, r in zip(counts, routed, strict=True) if r),
                                exclude=frozenset(taken)))
        engines: list[Engine] = []
        routers: list[Engine] = []
        front: dict[str, Engine] = {}
        for i, (command, count) in enumerate(zip(commands, counts, strict=True)):
            if not routed[i]:
                engines.append(engine := Engine(command, secrets=secrets))
                front[command.endpoint] = engine
                continue
            if count == 1:  # the replicas that fit here (--dp-size), and worker tasks for the rest
                workers = [Engine(command, secrets=secrets)]
            else:
                workers = [Engine(as_worker(command, r, command.port if r == 0 else next(extra)), secrets=secrets)
                           for r in range(count)]
            model = self.config.models[i]
            metrics_port = next(extra)
            router_cmd = router_command(
                command.endpoint, port=next(extra), metrics_port=metrics_port, worker_urls=[w.url for w in workers],
                api_key=command.api_key,
                load_balance_method=model.flag("load-balance-method",
                                               self.config.general.flag("load-balance-method")))
            control = RouterWorkers(f"http://127.0.0.1:{router_cmd.port}", command.api_key)
            router = Engine(router_cmd, secrets=secrets, probe=control.readiness(len(workers)))
            engines += workers
            routers.append(router)
            front[command.endpoint] = router
            self.routed[command.endpoint] = RoutedModel(router, control, workers, metrics_port)
            remote = self.remote_replicas.get(command.endpoint, 0)
            if remote:
                assert self.worker_pool is not None
                self.remote_workers[command.endpoint] = RemoteWorkers(
                    command.endpoint, remote, self.worker_pool, add=control.add, remove=control.remove,
                    engine_key=command.api_key)
            logger.info("Model %s: %d SGLang server(s) here%s behind sglang-router", command.endpoint, count,
                        f" and {remote} replica(s) in worker tasks" if remote else "")
        return engines, routers, front

    def _engine_changed(self, engine: Engine) -> None:
        """The supervisor's news: the residency policy hears of crashes; a router stops sending requests to a worker
        that died and takes it back once its restart is ready."""
        if self.residency is not None:
            self.residency.engine_changed(engine)
        if not self._routing:
            return
        for routed in self.routed.values():
            if engine in routed.servers and engine.state in (RESIDENT, RESTARTING, ENGINE_FAILED, ENGINE_STOPPED):
                control = routed.control
                change = control.add(engine.url) if engine.state == RESIDENT else control.remove(engine.url)
                task = asyncio.create_task(self._router_change(change, engine))
                self._router_changes.add(task)
                task.add_done_callback(self._router_changes.discard)

    @staticmethod
    async def _router_change(change: Awaitable[None], engine: Engine) -> None:
        try:
            await change
        except RouterError as exc:
            logger.warning("Could not tell the router about %s (%s): %s", engine.endpoint, engine.state, exc)

    def _residency(self, engines: list[Engine]) -> Residency | None:
        """With CPU offloading or disk swapping on GPUs: who is resident, who sleeps (app.residency)."""
        general = self.config.general
        if not general.sleeps or self._placements is None:
            return None
        memory = {g.index: g.memory_gib for g in self._gpus}
        slots = [Slot(e.endpoint, p.devices, (p.memory_fraction or MAX_MEMORY_FRACTION_PER_DEVICE)
                      * min(memory[d] for d in p.devices))
                 for e, p in zip(engines, self._placements, strict=True)]
        control = SGLangMemoryControl(CPU_OFFLOAD if general.auto_cpu_offload else DISK_SWAP,
                                      model_paths={e.endpoint: e.command.model_path or "" for e in engines},
                                      api_keys={e.endpoint: e.command.api_key for e in engines})
        logger.info("Models share GPUs by %s: a model idle %s gives its memory back",
                    "CPU offloading" if general.auto_cpu_offload else "disk swapping",
                    f"for {general.sleep_after_idle_seconds} s or" if general.sleep_after_idle_seconds else "")
        return Residency(slots, {e.endpoint: e for e in engines}, control,
                         budget_gib={i: m * MAX_MEMORY_FRACTION_PER_DEVICE for i, m in memory.items()},
                         sleep_after_s=general.sleep_after_idle_seconds, protect_s=general.wake_deadline_seconds,
                         clock=self.clock)

    async def _start_all(self) -> None:
        """The engines, then the routers in front of replicas (each over workers that are ready)."""
        assert self.supervisor is not None and self.routers is not None
        await self.supervisor.start_all()
        await self.routers.start_all()
        self._routing = True

    async def _until_started(self) -> None:
        start = asyncio.create_task(self._start_all())
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            stop.cancel()
            start.result()
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineStartupError):
                await start

    async def _announce(self) -> None:
        assert self.gateway is not None and self.gateway.port is not None
        host = self.options.public_host or (public_address(self.environ) if self.options.host == "0.0.0.0"
                                            else self.options.host)
        local = f"http://{host}:{self.gateway.port}"
        base = await self._tell(self.reporter.base_url, self.gateway.port, local) or local
        models = {name: f"{base}/{name}/v1" for name in self.gateway.routes}
        await self._tell(self.reporter.endpoints, base, models, curl_command(base, next(iter(models))))
        await self._tell(self.reporter.states, self.states())

    async def _serve(self, tracker: IdleTracker, started: float) -> int:
        assert self.gateway is not None and self.supervisor is not None
        interval = self.config.idle.report_interval_seconds
        next_report = self.clock()
        state = None
        self._serving = (tracker, started, TokenRate())
        states = self.states()
        while True:
            now = self.clock()
            decision = tracker.decide(now)
            if decision.state != state:
                state = decision.state
                await self._tell(self.reporter.status, ACTIVE if state == "active" else IDLE)
            if self.states() != states:
                states = self.states()
                await self._tell(self.reporter.states, states)
            if now >= next_report:
                await self._report(decision)
                next_report = now + interval
            if self.residency is not None and (self._sleeper is None or self._sleeper.done()):
                self._sleeper = asyncio.create_task(self.residency.sleep_idle(), name="sleep-idle-models")
            if self.remote_workers and now >= self._next_scale and (self._scaler is None or self._scaler.done()):
                self._next_scale = now + SCALE_TICK_SECONDS
                self._scaler = asyncio.create_task(self._scale(), name="remote-workers")
            if decision.stop:
                logger.info("Idle for %.0f s (limit %.0f s): shutting down", decision.idle_for_s,
                            tracker.limit_seconds or 0)
                await self._tell(self.reporter.status, STOPPED, "idle time limit reached")
                return EXIT_OK
            for supervisor in (self.supervisor, self.routers):
                if supervisor is not None and supervisor.failed.is_set() and supervisor.failure is not None:
                    return await self._fail(supervisor.failure)
            if self._stop.is_set():
                return await self._signal_exit()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(TICK_SECONDS, max(0.05, next_report - now)))

    def states(self) -> dict[str, str]:
        """Each model's state, and each replica server's (`<endpoint>/<n>`, `<endpoint>/remote<n>`) where a router
        spreads a model."""
        assert self.gateway is not None
        states = self.gateway.states()
        for routed in self.routed.values():
            states.update({w.endpoint: w.state for w in routed.servers if w.endpoint not in states})
        for remote in self.remote_workers.values():
            states.update(remote.states())
        if self.multi_node is not None:  # SGLang's rank 0 is ready only once every rank has joined it
            for model in self.config.models:
                if model.nodes > 1:
                    state = states.get(model.endpoint, LOADING)
                    states.update({f"{model.endpoint}/node{r}": state for r in range(model.nodes)})
        return states

    async def _scale(self) -> None:
        """Keep each model's worker tasks at their count, their URLs in its router."""
        for remote in self.remote_workers.values():
            try:
                await remote.tick()
            except Exception:
                logger.exception("Managing the worker tasks of %s failed; trying again shortly", remote.endpoint)

    async def _report(self, decision: IdleDecision) -> None:
        assert self.gateway is not None and self._serving is not None
        _, started, rate = self._serving
        now = self.clock()
        tokens = rate.update(now, await self._scrape_tokens())
        await self._tell(self.reporter.report, now - started, decision, self.stats.take_window(), self.stats,
                         self.states(), tokens, self.residency.wake_stats() if self.residency else None,
                         await self._replica_requests() if self.routed else None)

    async def _replica_requests(self) -> dict[str, float]:
        """Requests each replica server has answered, as its router counts them."""
        counts: dict[str, float] = {}
        for routed in self.routed.values():
            answered = requests_per_worker(await scrape_metrics(routed.metrics_url))
            counts.update({w.endpoint: answered.get(w.url, 0.0) for w in routed.servers})
        return counts

    async def _scrape_tokens(self) -> TokenTotals:
        """SGLang's own token counters, summed over every serving engine."""
        assert self.supervisor is not None
        resident = [e for e in self.supervisor.engines if e.state in (RESIDENT, SLEEPING, WAKING)]
        texts = await asyncio.gather(*(scrape_metrics(e.url) for e in resident))
        total = ZERO
        for text in texts:
            total = total + TokenTotals.from_metrics(parse_prometheus(text))
        return total

    async def _fail(self, failure: EngineStartupError) -> int:
        logger.error("%s", failure.render())
        self.failure_reason = str(failure)
        await self._tell(self.reporter.status, FAILED, self.failure_reason)
        return EXIT_ENGINE

    async def _signal_exit(self) -> int:
        signum = self.stop_signal or 15
        reason = self.stop_reason or f"stopped by signal {signum}"
        await self._tell(self.reporter.status, STOPPED, reason)
        return 128 + signum

    async def _shutdown(self) -> None:
        if self._scaler is not None:
            self._scaler.cancel()
        for remote in self.remote_workers.values():
            with contextlib.suppress(Exception):
                await remote.stop()
        if self._sleeper is not None:
            self._sleeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._sleeper
        if self.gateway is not None:
            self.gateway.begin_drain()
            if self.gateway.in_flight:
                logger.info("Draining %d request(s) in flight (at most %.0f s)", self.gateway.in_flight,
                            self.options.drain_deadline_s)
            if not await self.gateway.wait_drained(self.options.drain_deadline_s):
                logger.warning("%d request(s) still in flight after the drain deadline", self.gateway.in_flight)
            if self._serving is not None:  # the last word: what happened since the last report, drain included
                await self._report(self._serving[0].decide(self.clock()))
        self._routing = False
        if self.routers is not None:
            await self.routers.stop_all(self.options.engine_stop_grace_s)
        if self.supervisor is not None:
            await self.supervisor.stop_all(self.options.engine_stop_grace_s)
        for task in list(self._router_changes):
            task.cancel()
        if self.gateway is not None:
            await self.gateway.close()
        logger.info("Deployment stopped")


# ----------------------------------------------------------------------------------------------------------
# the other machines of a model spanning nodes


async def _always_ready(url: str) -> bool:
    """SGLang's ranks above 0 serve no HTTP: a rank is ready once it runs (rank 0's readiness covers them all)."""
    return True


class NodeDeployment:
    """Another machine of the instance, running one engine until the instance's (the master's) task ends, its
    engine exits, or a signal. Two kinds:

    - a node of a model spanning nodes (`multi_node`, rank > 0): its SGLang rank joins rank 0 at the master's
      address and serves nothing (rank 0 serves, behind the gateway);
    - a replica worker (`worker_of`, app.scale_out): one SGLang server for that model, on this machine's address
      with the instance's engine key, its URL published (`publish`) for the instance's router.

    Exit codes: 0 when the master ended, 3 when the engine failed, 128 + signal number after a signal.
    """

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, multi_node: MultiNode | None = None, *,
                 master_running: Callable[[], bool], reporter: Reporter | None = None,
                 options: RunOptions = RunOptions(), detect: Callable[[], list[Gpu]] = detect_gpus,
                 clock: Callable[[], float] = time.monotonic, environ: dict[str, str] | None = None,
                 watch_interval_s: float = 10.0, worker_of: str | None = None, engine_api_key: str | None = None,
                 publish: Callable[[str], None] | None = None):
        if worker_of is not None:
            index = next(i for i, m in enumerate(config.models) if m.endpoint == worker_of)
            model = replace(config.models[index], replicas=1)
        else:
            index = next(i for i, m in enumerate(config.models) if m.nodes > 1)
            model = config.models[index]
        self.config = replace(config, models=(model,))
        self.registry = registry
        self.multi_node = multi_node
        self.worker_of = worker_of
        self.engine_api_key = engine_api_key
        self.publish = publish
        self.master_running = master_running
        self.reporter = reporter or ConsoleReporter()
        self.options = options
        self.detect = detect
        self.clock = clock
        self.environ = dict(os.environ if environ is None else environ)
        self.watch_interval_s = watch_interval_s
        self.engine: Engine | None = None
        self.stop_signal: int | None = None
        self.failure_reason = ""
        self.stop_reason = ""
        self._stop = asyncio.Event()
        self._reports = ReportWorker()

    @property
    def role(self) -> str:
        if self.multi_node is not None:
            return f"node {self.multi_node.rank} of {self.multi_node.nodes}"
        return f"replica worker of {self.worker_of}"

    def request_stop(self, signum: int, reason: str = "") -> None:
        self.stop_signal, self.stop_reason = signum, reason
        self._stop.set()

    async def _tell(self, method: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(self._reports.submit(method, *args)), REPORT_TIMEOUT_SECONDS)

    async def run(self) -> int:
        model = self.config.models[0]
        await self._tell(self.reporter.status, LOADING, f"{self.role} for {model.endpoint}")
        resolved = await asyncio.to_thread(resolve, self.config, self.registry)
        gpus = self.detect()
        machine = Machine(gpu_count=len(gpus), gpu_memory_gib=min((g.memory_gib for g in gpus), default=None))
        placements = place(demands(self.config, machine), gpus) if gpus else None
        host = constants.ENGINE_HOST if self.worker_of is None else "0.0.0.0"
        (command,) = build_engine_commands(self.config, resolved, free_ports(1, host="0.0.0.0"), machine=machine,
                                           placements=placements, engine_api_key=self.engine_api_key or engine_key(),
                                           launcher=self.options.launcher, multi_node=self.multi_node, host=host)
        probe = _always_ready if self.multi_node is not None else http_health_probe
        self.engine = engine = Engine(command, probe=probe,
                                      secrets=[*self.config.auth.tokens, *self.config.secrets,
                                               *([self.engine_api_key] if self.engine_api_key else [])])
        try:
            await engine.start()
            await engine.wait_ready(self.clock() + self.options.startup_deadline_s)
            if self.multi_node is not None:
                what = f"SGLang rank {self.multi_node.rank}, joined at {self.multi_node.dist_init_addr}"
            else:
                url = f"http://{self.options.public_host or public_address(self.environ)}:{command.port}"
                if self.publish is not None:
                    await asyncio.to_thread(self.publish, url)
                what = f"serving at {url}"
            await self._tell(self.reporter.status, ACTIVE, f"{self.role}: {what}")
            return await self._watch(engine)
        except EngineStartupError as exc:
            return await self._failed(exc)
        finally:
            await engine.stop(self.options.engine_stop_grace_s)
            await self._tell(self.reporter.close)

    async def _watch(self, engine: Engine) -> int:
        exited = asyncio.create_task(engine.wait_exit())
        try:
            while True:
                stop = asyncio.create_task(self._stop.wait())
                done, _ = await asyncio.wait({exited, stop}, timeout=self.watch_interval_s,
                                             return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                if self._stop.is_set():
                    signum = self.stop_signal or 15
                    await self._tell(self.reporter.status, STOPPED, self.stop_reason or f"stopped by signal {signum}")
                    return 128 + signum
                master = await asyncio.to_thread(self.master_running)
                if not master:
                    logger.info("The master node's task has ended: stopping this node")
                    await self._tell(self.reporter.status, STOPPED, "the master node's task ended")
                    return EXIT_OK
                if exited in done:
                    return await self._failed(EngineStartupError(
                        engine.endpoint, f"({self.role}) exited while the master still runs",
                        classify_failure(engine.exit_code, engine.tail, engine.evidence), engine.exit_code,
                        engine.tail))
        finally:
            exited.cancel()

    async def _failed(self, failure: EngineStartupError) -> int:
        logger.error("%s", failure.render())
        self.failure_reason = str(failure)
        await self._tell(self.reporter.status, FAILED, self.failure_reason)
        return EXIT_ENGINE
