"""A gateway worker: one of the processes that share the endpoint's port when `general.gateway_workers` is above one.

    python -m app.gateway.worker CHANNEL_FD SOCKET_FD

The deployment process (the control plane, `app.serving.gateway_workers`) binds the port once per worker
(`SO_REUSEPORT`: the kernel spreads new connections over them) and starts each worker with its listening socket and
one end of a socket pair, its channel, on which it reads its setup first (the keys' tokens travel there, never in
argv or the environment). A worker serves what it can answer alone and sends every other request on to the control
plane (`app.gateway.forward`). What the control plane owns reaches a worker as news, and a worker's requests reach
the control plane as reports, each at most `SYNC_SECONDS` late:

- control plane to worker (`News`): each model's engine state and context length, and whether the deployment drains;
- worker to control plane (`Report`): its requests in flight, those that began and ended (the idle clock), every
  request it answered (`RequestRecord`) and every response it sent (the counters), since its previous report.

Lines of JSON both ways. A worker ends when the control plane says so, when its channel closes (the control plane is
gone), on SIGTERM, or with its parent (PR_SET_PDEATHSIG): it never serves on alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from app.gateway.forward import ControlPlane
from app.gateway.gateway import Gateway, GatewayLimits
from app.gateway.keys import KeyRing
from app.gateway.messages import Request
from app.gateway.model_routes import ModelRoute
from app.gateway.stats import RequestRecord, RequestStats, answer_of
from app.keys import KeyLimits
from app.states import EngineState

logger = logging.getLogger(__name__)

# A worker's report, and the control plane's news, are at most this late: the staleness bound of every state the
# control plane owns (engine states, draining) as a worker sees it, and of its counts as the control plane sees them.
SYNC_SECONDS = 0.1
# A worker with nothing to report says so this often (its in-flight count, for the drain).
HEARTBEAT_SECONDS = 1.0
# Longest line either side sends (a report of 0.1 s of a busy worker's requests is well under it).
MAX_LINE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is told when it starts: as JSON, on its channel."""

    keys: list[tuple[str, str, dict[str, Any]]]  # name, token, the limits set
    routes: list[dict[str, Any]]  # endpoint, url, api_key, adapters
    always: list[str]  # the endpoints the control plane answers every request of
    control_port: int
    quiet_token: str
    limits: dict[str, Any] = field(default_factory=dict)  # GatewayLimits' fields
    task_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerSetup:
        return cls(**data)


def limits_of(values: dict[str, Any]) -> KeyLimits:
    """A key's limits from the values a config file writes (a list where `KeyLimits` holds a tuple)."""
    return KeyLimits(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


class SyncedEngine:
    """An engine as a worker knows it: its URL, and its state as the control plane last said."""

    def __init__(self, url: str):
        self.url = url
        self.state = EngineState.LOADING
        self._changed = asyncio.Event()

    def set(self, state: EngineState) -> None:
        if state != self.state:
            self.state = state
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_serving(self, deadline_s: float) -> bool:
        """Until the control plane says it serves (True), that it failed or stopped, or the deadline."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while self.state not in (EngineState.RESIDENT, EngineState.FAILED, EngineState.STOPPED):
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, end - loop.time()))
            if loop.time() >= end:
                break
        return self.state == EngineState.RESIDENT


class WorkerStats(RequestStats):
    """A worker's counters: what it recorded since its last report, for the control plane to count (a record is a
    tuple: written to the report as it is)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[RequestRecord] = []
        self.answers: list[tuple[int, bool, str | None, bool]] = []

    def record(self, record: RequestRecord) -> None:
        self.records.append(record)

    def count_response(self, status: int, request: Request) -> None:
        self.answers.append(answer_of(status, request))


class ActivityLog:
    """The idle clock's news: requests that began and ended since the last report, and when the latest did."""

    def __init__(self) -> None:
        self.started = self.finished = 0
        self.at = 0.0

    def request_started(self, now: float) -> None:
        self.started += 1
        self.at = max(self.at, now)

    def request_finished(self, now: float) -> None:
        self.finished += 1
        self.at = max(self.at, now)


@dataclass
class Report:
    """A worker's report: `seq`, the latest news it has applied; what it did since its previous report."""

    seq: int
    in_flight: int
    started: int = 0
    finished: int = 0
    at: float = 0.0
    records: list[list[Any]] = field(default_factory=list)
    answers: list[list[Any]] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)  # its table: open now, closed to make room, refused

    @property
    def empty(self) -> bool:
        return not (self.started or self.finished or self.records or self.answers)

    def request_records(self) -> list[RequestRecord]:
        return [RequestRecord(*values) for values in self.records]

    def line(self) -> bytes:
        """As the channel carries it (its fields as they are: `dataclasses.asdict` would copy every record)."""
        return json.dumps(vars(self)).encode() + b"\n"


@dataclass
class News:
    """The control plane's news: each model's engine state and context length, whether it drains; `seq` counts."""

    seq: int
    states: dict[str, tuple[str, int | None]]
    draining: bool = False


class Worker:
    """One worker's gateway and its exchange with the control plane."""

    def __init__(self, setup: WorkerSetup):
        self.engines = {r["endpoint"]: SyncedEngine(r["url"]) for r in setup.routes}
        routes = [ModelRoute(r["endpoint"], self.engines[r["endpoint"]], api_key=r["api_key"],
                             adapters=tuple(r["adapters"])) for r in setup.routes]
        self.stats, self.activity = WorkerStats(), ActivityLog()
        self.gateway = Gateway(routes, KeyRing((n, t, limits_of(v)) for n, t, v in setup.keys), self.stats,
                               activity=self.activity, limits=GatewayLimits(**setup.limits), task_url=setup.task_url,
                               control=ControlPlane(setup.control_port, setup.always, setup.quiet_token))
        self.seq = 0

    def apply(self, news: News) -> None:
        for endpoint, (state, context) in news.states.items():
            if endpoint in self.engines:
                self.engines[endpoint].set(EngineState(state))
                self.gateway.routes[endpoint].context_tokens = context
        if news.draining and not self.gateway.draining:
            self.gateway.begin_drain()
        self.seq = news.seq

    def report(self) -> Report:
        """What happened since the previous report (and starts the next)."""
        stats, activity = self.stats, self.activity
        report = Report(self.seq, self.gateway.in_flight, activity.started, activity.finished, activity.at,
                        stats.records, stats.answers, list(self.gateway.connections.counts()))  # type: ignore[arg-type]
        stats.records, stats.answers = [], []
        activity.started = activity.finished = 0
        return report


async def serve(channel: socket.socket, listening: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=channel, limit=MAX_LINE_BYTES)
    first = json.loads(await reader.readline())
    worker = Worker(WorkerSetup.from_json(first["setup"]))
    await worker.gateway.start(sock=listening)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    writer.write(json.dumps({"ready": True}).encode() + b"\n")

    async def listen() -> None:
        while line := await reader.readline():
            message = json.loads(line)
            if message.get("stop"):
                break
            worker.apply(News(**message["news"]))
        stop.set()  # (told to stop, or the control plane is gone)

    async def tell() -> None:
        told, quiet = (-1, -1), 0.0  # (the news and in-flight count last told)
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            report = worker.report()
            quiet = quiet + SYNC_SECONDS if report.empty else 0.0
            if report.empty and (report.seq, report.in_flight) == told and quiet < HEARTBEAT_SECONDS:
                continue
            told, quiet = (report.seq, report.in_flight), 0.0
            writer.write(report.line())
            await writer.drain()

    tasks = [asyncio.create_task(listen()), asyncio.create_task(tell())]
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await worker.gateway.close()
        with contextlib.suppress(OSError):
            writer.write(worker.report().line())
            await writer.drain()
        writer.close()


def _die_with_parent() -> None:
    """SIGTERM when the control plane's process ends, however it ends (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    _die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s gateway worker: %(message)s")
    channel = socket.socket(fileno=int(argv[0]))
    listening = socket.socket(fileno=int(argv[1]))
    try:
        import uvloop

        uvloop.run(serve(channel, listening))
    except ImportError:
        asyncio.run(serve(channel, listening))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
