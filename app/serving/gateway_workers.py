"""The endpoint served by several gateway worker processes (`general.gateway_workers` above one): the control plane.

The deployment's own gateway then listens on a loopback port only, and answers what the workers send on
(`app.gateway.forward`); `GatewayWorkers` binds the endpoint's port once per worker (`SO_REUSEPORT`), starts each
worker (`app.gateway.worker`) with its socket and channel, and is the one owner of what they share:

- the counters and the idle clock: every worker's reports are counted into the deployment's `RequestStats` and
  `IdleTracker` as they arrive (at most `SYNC_SECONDS` late), as if its gateway had answered them;
- the engines' states and context lengths, and the drain: told to every worker when they change;
- the workers themselves: one that exits is started again (its requests in flight are lost with it: their clients
  see the connection close; the idle clock forgets them), after a pause that doubles while they keep failing.

`begin_drain`, `in_flight` and `wait_drained` answer for the workers together, as the gateway's do for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from app.gateway import Gateway, GatewayLimits, RequestStats
from app.gateway.worker import MAX_LINE_BYTES, SYNC_SECONDS, News, Report, WorkerSetup
from app.serving.idle import IdleTracker

logger = logging.getLogger(__name__)

# How long a worker may take to start and listen.
WORKER_START_SECONDS = 30.0
# Pause before a worker that exited is started again, doubling while they keep exiting, up to the most.
RESTART_PAUSE_SECONDS = 0.5
MAX_RESTART_PAUSE_SECONDS = 30.0
# A worker that served this long is a healthy one: the next restart pauses the least again.
HEALTHY_SECONDS = 60.0
# How long a worker told to stop may take before it is killed.
STOP_SECONDS = 5.0
LISTEN_BACKLOG = 511


def worker_count(configured: int, cores: int, gpus: list[int] | None) -> int:
    """The gateway's processes: as configured, or (0) half the cores that the engines (a core per GPU for its
    scheduler, two per engine for its tokenizer and detokenizer: `gpus`, each engine's GPU count) and the control
    plane leave, at most 8; 1 on a CPU deployment (`gpus` None: the engines take every core). One: the deployment's
    own gateway serves alone."""
    if configured:
        return configured
    if gpus is None:
        return 1
    return max(1, min(8, (cores - sum(n + 2 for n in gpus) - 1) // 2))


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    in_flight: int = 0
    outstanding: int = 0  # requests it reported began and not yet ended (the idle clock's)
    seq: int = -1  # the latest news it has applied
    started_at: float = 0.0
    restarts: int = 0
    table: tuple[int, ...] = (0, 0, 0)  # its connection table, as it last reported it
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class GatewayWorkers:
    """N gateway workers on one port, and the control plane's side of their channels."""

    def __init__(self, count: int, control: Gateway, setup: Callable[[int], WorkerSetup], *, stats: RequestStats,
                 tracker: IdleTracker | None, clock: Callable[[], float]):
        """`setup(control_port)`: what each worker is told; `control`: the deployment's gateway, started already."""
        self.count, self.control, self.setup, self.stats, self.tracker = count, control, setup, stats, tracker
        self.clock = clock
        self.host, self.port = "", None  # (the port, once every worker listens on it)
        self.workers = [_Worker(i) for i in range(count)]
        self._bound = 0
        self._gone = [0, 0]  # connections closed to make room and refused by workers that have exited
        self.draining = self.stopping = False
        self._seq = 0
        self._told: tuple[object, ...] = ()
        self._changed = asyncio.Event()
        self._news_task: asyncio.Task[None] | None = None

    # ----- lifecycle -----

    async def start(self, host: str, port: int) -> None:
        """Bind the port for every worker and start them; returns once every one listens."""
        self.host = host
        first = _listening(host, port)
        bound = first.getsockname()[1]
        sockets = [first] + [_listening(host, bound) for _ in self.workers[1:]]  # (the port held throughout)
        self._bound = bound
        await asyncio.gather(*(self._start(w, s) for w, s in zip(self.workers, sockets, strict=True)))
        self.port = bound
        self._news_task = asyncio.create_task(self._tell_news())
        self.control.workers = self  # (the clients' connections and requests are the workers')
        logger.info("Gateway: %d worker processes on port %d (the control plane on %d)", self.count, self.port,
                    self.control.port)

    async def _start(self, worker: _Worker, sock: socket.socket | None = None) -> None:
        sock = sock or _listening(self.host, self._bound)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "app.gateway.worker", str(theirs.fileno()), str(sock.fileno()),
                pass_fds=(theirs.fileno(), sock.fileno()))
        finally:
            theirs.close()
            sock.close()  # (the worker's now: a connection queued on it is the worker's to take)
        reader, worker.writer = await asyncio.open_unix_connection(sock=mine, limit=MAX_LINE_BYTES)
        assert self.control.port is not None
        worker.writer.write(json.dumps({"setup": self.setup(self.control.port).to_json()}).encode() + b"\n")
        try:
            line = await asyncio.wait_for(reader.readline(), WORKER_START_SECONDS)
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError(f"gateway worker {worker.index} did not start")
        except BaseException:
            if worker.process.returncode is None:  # (nothing left running)
                worker.process.kill()
            worker.writer = None
            raise
        worker.started_at, worker.seq, worker.in_flight = self.clock(), -1, 0
        self._send(worker, self._news())
        worker.task = asyncio.create_task(self._listen(worker, reader))

    async def close(self) -> None:
        """Stop every worker (what is still in flight is cut)."""
        self.stopping = True
        if self._news_task is not None:
            self._news_task.cancel()
        for worker in self.workers:
            if worker.writer is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    worker.writer.write(b'{"stop": true}\n')
        await asyncio.gather(*(self._stopped(w) for w in self.workers))

    async def _stopped(self, worker: _Worker) -> None:
        if worker.process is None:
            return
        try:
            await asyncio.wait_for(worker.process.wait(), STOP_SECONDS)
        except asyncio.TimeoutError:
            worker.process.kill()
            await worker.process.wait()
        if worker.task is not None:
            await asyncio.gather(worker.task, return_exceptions=True)

    # ----- what the workers report -----

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self._count(worker, Report(**json.loads(line)))
        except (ValueError, TypeError, RuntimeError, asyncio.LimitOverrunError) as exc:  # (not one of its reports)
            logger.error("Gateway worker %d sent what is not a report (%s): stopping it", worker.index, exc)
            if worker.process is not None and worker.process.returncode is None:
                worker.process.kill()
        await self._exited(worker)

    def _count(self, worker: _Worker, report: Report) -> None:
        for record in report.request_records():
            self.stats.record(record)
        for answer in report.answers:
            self.stats.count_answer(*answer)
        if self.tracker is not None:
            self.tracker.reported(report.started, report.finished, report.at)
        worker.outstanding += report.started - report.finished
        worker.in_flight, worker.seq = report.in_flight, report.seq
        if report.connections:
            worker.table = tuple(report.connections)
        self._changed.set()

    async def _exited(self, worker: _Worker) -> None:
        assert worker.process is not None
        code = await worker.process.wait()
        self._forget(worker)
        if self.stopping:
            return
        healthy = self.clock() - worker.started_at >= HEALTHY_SECONDS
        worker.restarts = 0 if healthy else worker.restarts + 1
        pause = min(MAX_RESTART_PAUSE_SECONDS, RESTART_PAUSE_SECONDS * 2 ** worker.restarts)
        logger.warning("Gateway worker %d exited (%s): its requests in flight are lost; starting it again in %.1f s",
                       worker.index, code, pause)
        while not self.stopping:
            await asyncio.sleep(pause)
            try:
                return await self._start(worker) if not self.stopping else None
            except (OSError, RuntimeError, asyncio.TimeoutError, ValueError) as exc:
                pause = min(MAX_RESTART_PAUSE_SECONDS, pause * 2)
                logger.error("Gateway worker %d could not start again (%s): trying again in %.1f s", worker.index,
                             exc, pause)

    def _forget(self, worker: _Worker) -> None:
        """A worker that exited: what it had in flight ended with it, for the idle clock and the drain."""
        if self.tracker is not None:
            self.tracker.reported(0, worker.outstanding, self.clock())
        worker.outstanding = worker.in_flight = 0
        self._gone = [a + b for a, b in zip(self._gone, worker.table[1:], strict=True)]  # (its counts so far)
        worker.table = (0, 0, 0)
        worker.writer = None
        self._changed.set()

    def tables(self) -> tuple[int, int, int]:
        """The workers' connection tables together: open now (as last reported), closed to make room, refused."""
        return (sum(w.table[0] for w in self.workers), self._gone[0] + sum(w.table[1] for w in self.workers),
                self._gone[1] + sum(w.table[2] for w in self.workers))

    # ----- what the workers are told -----

    def _news(self) -> News:
        routes = self.control.routes
        return News(self._seq, {name: (str(route.engine.state), route.context_tokens)
                                for name, route in routes.items()}, self.draining)

    def _send(self, worker: _Worker, news: News) -> None:
        if worker.writer is not None and not worker.writer.is_closing():
            worker.writer.write(json.dumps({"news": dataclasses.asdict(news)}).encode() + b"\n")

    def _tell(self) -> None:
        """Every worker, when the news changed."""
        news = self._news()
        told = (news.states, news.draining)
        if told == self._told:
            return
        self._seq += 1
        news.seq, self._told = self._seq, told
        for worker in self.workers:
            self._send(worker, news)

    async def _tell_news(self) -> None:
        while True:
            self._tell()
            await asyncio.sleep(SYNC_SECONDS)

    # ----- the drain -----

    def begin_drain(self) -> None:
        self.draining = True
        self._tell()

    @property
    def in_flight(self) -> int:
        return sum(w.in_flight for w in self.workers)

    async def wait_drained(self, deadline_s: float) -> bool:
        """Until every worker has heard of the drain and has nothing in flight (True), or the deadline."""
        drained_at = self._seq

        def drained() -> bool:
            return all(w.writer is None or (w.seq >= drained_at and not w.in_flight) for w in self.workers)

        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while not drained():
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, end - loop.time()))
            if loop.time() >= end:
                return drained()
        return True


def _listening(host: str, port: int) -> socket.socket:
    """One of the port's listening sockets (`SO_REUSEPORT`: each worker's own accept queue)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)  # (not inheritable: `pass_fds` gives it to its worker alone; uvloop's spawn passes
    # every inheritable descriptor to every child, whatever `pass_fds` says)
    os.set_blocking(sock.fileno(), False)
    return sock


class Front:
    """The endpoint's port: the deployment's gateway alone, or gateway workers in front of it (the gateway then on a
    loopback port of its own, the control plane)."""

    def __init__(self, gateway: Gateway, workers: GatewayWorkers | None):
        self.gateway, self.workers = gateway, workers

    async def start(self, host: str, port: int) -> None:
        if self.workers is None:
            await self.gateway.start(host, port)
            return
        await self.gateway.start("127.0.0.1", 0)
        await self.workers.start(host, port)

    @property
    def port(self) -> int | None:
        return self.workers.port if self.workers is not None else self.gateway.port

    @property
    def in_flight(self) -> int:
        """Requests under way (a worker's count includes what it sent on to the control plane)."""
        return self.gateway.served

    def begin_drain(self) -> None:
        if self.workers is not None:
            self.workers.begin_drain()
        self.gateway.begin_drain()

    async def wait_drained(self, deadline_s: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        if self.workers is not None and not await self.workers.wait_drained(deadline_s):
            return False
        return await self.gateway.wait_drained(max(0.0, end - loop.time()))

    async def close(self) -> None:
        if self.workers is not None:
            await self.workers.close()
        await self.gateway.close()


def worker_setup(keys: list[tuple[str, str, dict]], gateway: Gateway, limits: GatewayLimits, count: int,
                 task_url: str | None) -> Callable[[int], WorkerSetup]:
    """What each worker is told, given the control plane's port: the keys (name, token, limits set), the routes,
    which endpoints the control plane answers whole (models sharing GPUs, adapters on request), the gateway's limits
    (its connection table shared out between the workers)."""
    routes = [{"endpoint": r.endpoint, "url": r.engine.url, "api_key": r.api_key, "adapters": list(r.adapters)}
              for r in gateway.routes.values()]
    always = [r.endpoint for r in gateway.routes.values() if r.residency is not None or r.adapter_loader is not None]
    shared = dataclasses.asdict(limits) | {"max_connections": max(1, limits.max_connections // count)}

    def setup(control_port: int) -> WorkerSetup:
        return WorkerSetup(keys=[(n, t, dict(v)) for n, t, v in keys], routes=routes, always=always,
                           control_port=control_port, quiet_token=gateway.quiet_token, limits=shared,
                           task_url=task_url)

    return setup
