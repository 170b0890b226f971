"""The harness for tests that run a whole deployment in-process against stand-in SGLang engines.

`running(...)` starts `Deployment.run()` (what `clearml-sglang run` does) with engines launched from
`tests/fakes/fake_sglang_server.py` and the real gateway on a free port, yields a `Running` handle with an HTTP
session, and on the way out stops the deployment and checks that no process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from app.config import load_config
from app.serving.deployment import Deployment, RunOptions
from app.serving.gpus import Gpu
from tests.fakes.registry import NoRegistry

FAKE = Path(__file__).resolve().parent / "fakes" / "fake_sglang_server.py"
TOKEN = "test-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEADLINE_S = 20.0



@dataclass
class RecordingReporter:
    statuses: list[tuple[str, str]] = field(default_factory=list)
    announced: dict = field(default_factory=dict)
    reports: list = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    model_states: list[dict] = field(default_factory=list)
    closed: bool = False
    wakes: list = field(default_factory=list)  # (wake-ups per model, p50 ms, p95 ms) at each report
    startups: list = field(default_factory=list)  # the startup summary, once ready
    benchmarks: list = field(default_factory=list)  # each benchmark at ready's results
    preflights: list = field(default_factory=list)  # pre-flight's findings, as told

    def status(self, state: str, reason: str = "") -> None:
        self.statuses.append((state, reason))

    def endpoints(self, base_url, models, curl) -> None:
        self.announced = {"base": base_url, "models": models, "curl": curl}

    def access_token(self, token: str) -> None:
        self.tokens.append(token)

    def preflight(self, findings) -> None:
        self.preflights.append(findings)

    def report(self, report) -> None:
        self.reports.append(report)
        if report.wakes is not None:
            self.wakes.append((dict(report.wakes.wakeups), report.wakes.p50_ms, report.wakes.p95_ms))

    def benchmark(self, results) -> None:
        self.benchmarks.append(results)

    def base_url(self, port, local_url) -> str:
        return local_url

    def states(self, states) -> None:
        self.model_states.append(dict(states))

    def startup(self, summary) -> None:
        self.startups.append(summary)

    def close(self) -> None:
        self.closed = True


@dataclass
class Running:
    deployment: Deployment
    task: asyncio.Task
    base: str
    session: aiohttp.ClientSession
    reporter: RecordingReporter

    def url(self, path: str) -> str:
        return self.base + path

    async def chat(self, model: str = "m", stream: bool = False, max_tokens: int = 4, headers=None, **extra):
        body = {"model": model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": max_tokens,
                "stream": stream, **extra}
        return await self.session.post(self.url("/v1/chat/completions"), json=body,
                                       headers=AUTH if headers is None else headers)


def config_for(*overrides: str, models: int = 1):
    base = [f"auth.tokens={TOKEN}", "idle.report_interval_seconds=1"]
    for i in range(models):
        base += [f"models.{i}.model=org/m{i}", f"models.{i}.endpoint_name={'m' if i == 0 else f'm{i}'}"]
    return load_config(overrides=[*base, *overrides])


@contextlib.asynccontextmanager
async def running(*overrides: str, models: int = 1, wait_ready: bool = True, gpus: int = 1, **options):
    config = config_for(*overrides, models=models)
    reporter = RecordingReporter()
    opts = RunOptions(host="127.0.0.1", port=0, public_host="127.0.0.1", launcher=(sys.executable, str(FAKE)),
                      startup_deadline_s=options.pop("startup_deadline_s", DEADLINE_S),
                      drain_deadline_s=options.pop("drain_deadline_s", 10.0), engine_stop_grace_s=5.0, **options)
    deployment = Deployment(config, NoRegistry(), options=opts, reporter=reporter,
                            detect=lambda: [Gpu(i, "fake", 80.0) for i in range(gpus)])
    task = asyncio.create_task(deployment.run())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            base = await _bound(deployment, task)
            run = Running(deployment, task, base, session, reporter)
            if wait_ready:
                await _until(lambda: _ready(run), "the deployment to be ready")
            yield run
        finally:
            if not task.done():
                deployment.request_stop(15)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), DEADLINE_S)
    await _until(_no_children, "every engine process to be gone")


async def _bound(deployment: Deployment, task: asyncio.Task) -> str:
    async def check():
        if task.done():
            return True
        return deployment.built is not None and deployment.built.front.port is not None
    await _until(check, "the gateway to listen")
    if task.done() and deployment.gateway is None:
        task.result()
    return f"http://127.0.0.1:{deployment.built.front.port}"


async def _ready(run: Running) -> bool:
    if run.task.done():
        raise AssertionError(f"the deployment ended with {run.task.result()}")
    async with run.session.get(run.url("/readyz")) as response:
        return response.status == 200


async def _no_children() -> bool:
    return not psutil.Process().children(recursive=True)


async def _until(check, what: str, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def requests_logged(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_async(coro):
    return asyncio.run(coro)


async def gateway_idle(run: Running) -> bool:
    return run.deployment.gateway.in_flight == 0


async def in_flight(run: Running, count: int) -> bool:
    """At least `count` requests taken by the gateway (answered by the engine or not yet)."""
    return run.deployment.gateway.in_flight >= count


async def at_least(items: list, count: int) -> bool:
    return len(items) >= count
