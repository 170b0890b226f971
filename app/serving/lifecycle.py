"""What every deployment process shares: where it reports, how it is stopped, how it ends.

`Reporter` is where a deployment says what it does: its ClearML task (`app.clearml.reporting.TaskReporter`) or the
console (`ConsoleReporter`), in the frozen values of `app.serving.report` (all a reporter needs of serving). Reports
may wait on the network, so `Lifecycle.tell` makes each call on a daemon thread (`ReportWorker`), one at a time,
bounded in time: a report that fails or hangs never stops serving, nor holds up the exit. `Lifecycle` is the part
the instance (`app.serving.deployment.Deployment`) and its other machines (`app.serving.node`: `RankNode`,
`ReplicaWorker`) have in common: the stop request a signal or the UI makes, the status it reports, and its exit
code (`app.constants`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app import constants
from app.config.types import DeploymentConfig
from app.constants import EXIT_ENGINE, EXIT_OK, exit_after_signal
from app.errors import ConfigError, Problem
from app.serving.failures import EngineStartupError
from app.serving.gpus import Gpu
from app.serving.models import ModelRegistry, ResolvedModel, resolve
from app.serving.report import BenchmarkResult, Report, Span, StartupSummary
from app.sglang.command import MultiNode
from app.states import ModelState, Status

logger = logging.getLogger(__name__)

# Longest wait for one report (a call to ClearML, which may retry on the network): past it, serving goes on.
REPORT_TIMEOUT_SECONDS = 30.0


# Longest wait for requests in flight to finish once shutdown begins; a stream longer than this is cut.
DRAIN_DEADLINE_SECONDS = 300.0
# Grace for each engine between SIGTERM and SIGKILL.
ENGINE_STOP_GRACE_SECONDS = 20.0


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
    max_connections: int | None = None  # client connections at most (default: the gateway's MAX_CONNECTIONS)
    process_started: float | None = None  # on the monotonic clock: where "ready in N s" counts from
    prior: tuple[Span, ...] = ()  # startup phases before run(): fetching and converting the demo model
    task_url: str | None = None  # the ClearML task's page, where there is one (the endpoint's page links to it)
    exit_after_benchmark: bool = False  # `bench`: stop (exit 0) once the benchmark at ready has been reported
    environ: Mapping[str, str] | None = None  # where tokens and this machine's address are read (None: os.environ)
    # pre-flight (`app.preflight`, composed in by `app.run`): the resolved models' problems, warnings and choices (their
    # parsers), before any engine starts
    preflight: Callable[[DeploymentConfig, Sequence[ResolvedModel]],
                        tuple[list[Problem], list[str], list[str]]] | None = None


class Reporter(Protocol):
    """Where the deployment says what it does. Called from a worker thread, one call at a time."""

    def status(self, state: Status, reason: str = "") -> None: ...

    def access_token(self, token: str) -> None: ...

    def preflight(self, findings: list[str]) -> None: ...

    def base_url(self, port: int, local_url: str) -> str: ...

    def endpoints(self, base_url: str, models: dict[str, str], curl: str) -> None: ...

    def states(self, states: dict[str, ModelState]) -> None: ...

    def startup(self, summary: StartupSummary) -> None: ...

    def benchmark(self, results: list[BenchmarkResult]) -> None: ...

    def report(self, report: Report) -> None: ...

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
    """Reports to the log only (and never a token: a generated one goes to `token_file`, readable by its owner)."""

    def __init__(self, token_file: Path | None = None):
        self.token_file = token_file or constants.cache_dir() / "access-token"

    def status(self, state: Status, reason: str = "") -> None:
        logger.info("Status: %s%s", state, f" ({reason})" if reason else "")

    def base_url(self, port: int, local_url: str) -> str:
        return local_url

    def endpoints(self, base_url: str, models: dict[str, str], curl: str) -> None:
        logger.info("Endpoint: %s", base_url)
        for name, url in models.items():
            logger.info("  model %s: %s", name, url)
        logger.info("Try it:\n%s", curl)

    def states(self, states: dict[str, ModelState]) -> None:
        logger.debug("Models: %s", states)

    def startup(self, summary: StartupSummary) -> None:
        pass  # (the deployment prints it)

    def benchmark(self, results: list[BenchmarkResult]) -> None:
        pass  # (the deployment prints it)

    def close(self) -> None:
        pass

    def preflight(self, findings: list[str]) -> None:
        pass  # (the deployment prints them)

    def access_token(self, token: str) -> None:
        """Never printed: written to a file only this user can read, whose path is printed."""
        path = self.token_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(token + "\n")
        os.chmod(path, 0o600)
        logger.info("No access token was configured: one was generated and saved to %s (readable by you only). "
                    "Set %s (comma-separated) to choose your own.", path, constants.API_TOKENS_ENV)

    def report(self, report: Report) -> None:
        logger.debug("%d requests in total, %d in flight, idle for %.0f s", report.total_requests,
                     report.in_flight, report.idle_for_s)  # (the deployment prints each window's traffic)


class Lifecycle:
    """A deployment process: its config and collaborators, its stop request, reports and end. Constructing it starts
    nothing."""

    def __init__(self, config: DeploymentConfig, registry: ModelRegistry, *, reporter: Reporter | None,
                 options: RunOptions, detect: Callable[[], list[Gpu]], clock: Callable[[], float],
                 multi_node: MultiNode | None) -> None:
        self.config = config
        self.registry = registry
        self.options = options
        self.detect = detect
        self.clock = clock
        self.environ = dict(os.environ if options.environ is None else options.environ)
        self.multi_node = multi_node
        self.reporter = reporter or ConsoleReporter()
        self.stop_signal: int | None = None
        self.stop_reason = ""
        self.failure_reason = ""
        self._stop = asyncio.Event()
        self._reports = ReportWorker()

    def request_stop(self, signum: int, reason: str = "") -> None:
        """Called from a signal handler (or the abort callback, on the loop): drain and stop, exit 128 + signum
        (signal 0: the work asked for is done, exit 0)."""
        self.stop_signal = signum
        self.stop_reason = reason
        self._stop.set()

    async def tell(self, method: Callable[..., object], *args: object) -> object:
        """A reporter call, off the event loop, bounded in time; a failing or hanging report is logged and serving
        goes on."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self._reports.submit(method, *args)),
                                          REPORT_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("Reporting (%s) took longer than %.0f s; going on without it",
                           getattr(method, "__name__", method), REPORT_TIMEOUT_SECONDS)
        except Exception:
            logger.exception("Reporting failed")
        return None

    async def resolve_and_check(self) -> tuple[list[ResolvedModel], float]:
        """The models resolved (ClearML's fetched), then pre-flight (`options.preflight`): its warnings told, its
        problems a ConfigError before any engine starts; and how long fetching took."""
        await self.tell(self.reporter.status, Status.LOADING, "fetching models")
        fetching = self.clock()
        resolved = await asyncio.to_thread(resolve, self.config, self.registry)
        fetched_s = self.clock() - fetching
        if self.options.preflight is not None:
            await self.tell(self.reporter.status, Status.LOADING, "pre-flight checks")
            problems, warnings, notes = await asyncio.to_thread(self.options.preflight, self.config, resolved)
            for warning in warnings:
                logger.warning("Pre-flight: %s", warning)
            await self.tell(self.reporter.preflight, [*map(str, problems), *warnings, *notes])
            if problems:
                error = ConfigError(problems)
                await self.tell(self.reporter.status, Status.FAILED, error.render())
                error.told = True  # (the status line said it)
                raise error
        return resolved, fetched_s

    async def fail(self, failure: EngineStartupError) -> int:
        logger.error("%s", failure.render())
        self.failure_reason = str(failure)
        await self.tell(self.reporter.status, Status.FAILED, self.failure_reason)
        return EXIT_ENGINE

    async def signal_exit(self) -> int:
        signum = 15 if self.stop_signal is None else self.stop_signal
        await self.tell(self.reporter.status, Status.STOPPED, self.stop_reason or f"stopped by signal {signum}")
        return exit_after_signal(signum) if signum else EXIT_OK
