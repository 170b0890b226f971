"""The deployment end to end against the stand-in SGLang server: real subprocesses, the real gateway on a port.

Each test starts `Deployment.run()` (what `clearml-sglang run` does) with engines launched from
`tests/fakes/fake_sglang_server.py`, talks to the gateway over HTTP as a client would, and checks that no process
is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil

from app.config import load_config
from app.deployment import Deployment, RunOptions
from app.gpus import Gpu
from tests.fakes.registry import NoRegistry

FAKE = Path(__file__).resolve().parent.parent / "fakes" / "fake_sglang_server.py"
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

    def status(self, state: str, reason: str = "") -> None:
        self.statuses.append((state, reason))

    def endpoints(self, base_url, models, curl) -> None:
        self.announced = {"base": base_url, "models": models, "curl": curl}

    def access_token(self, token: str) -> None:
        self.tokens.append(token)

    def report(self, elapsed_s, decision, window, stats, states, tokens=None) -> None:
        self.reports.append((elapsed_s, decision, window, states, tokens))

    def base_url(self, port, local_url) -> str:
        return local_url

    def states(self, states) -> None:
        self.model_states.append(dict(states))

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
    async with aiohttp.ClientSession() as session:
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
        return deployment.gateway is not None and deployment.gateway.port is not None
    await _until(check, "the gateway to listen")
    if task.done() and deployment.gateway is None:
        task.result()
    return f"http://127.0.0.1:{deployment.gateway.port}"


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


# ----------------------------------------------------------------------------------------------------------


def test_serves_chat_streams_and_models_through_the_gateway():
    async def scenario():
        async with running("models.0.lora.enable=true", "models.0.lora.modules=sql=org/sql-lora",
                           "models.0.lora.max_lora_rank=8") as run:
            response = await run.chat()
            assert response.status == 200
            body = await response.json()
            assert body["usage"]["completion_tokens"] == 4
            async with run.session.post(run.url("/m/v1/completions"), headers=AUTH,
                                        json={"model": "m:sql", "prompt": "x", "max_tokens": 3}) as r:
                assert r.status == 200
            response = await run.chat(stream=True, stream_options={"include_usage": True})
            text = await response.text()
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert text.rstrip().endswith("data: [DONE]")
            async with run.session.get(run.url("/v1/models"), headers=AUTH) as r:
                ids = [m["id"] for m in (await r.json())["data"]]
            assert ids == ["m", "m:sql"]
            await _until(lambda: _gateway_idle(run), "the last request to be recorded", 5)
            stats = run.deployment.stats  # cumulative: the reporter takes the windows
            assert stats.requests["m"] == 3 and stats.completion_tokens["m"] == 4 + 3 + 4
            assert run.reporter.announced["models"] == {"m": f"{run.base}/m/v1"}
            assert "/m/v1/chat/completions" in run.reporter.announced["curl"]
    run_async(scenario())


def test_requests_without_a_valid_token_never_reach_the_engine(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_REQUEST_LOG={log}") as run:
            for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"}, {"Authorization": TOKEN}):
                response = await run.chat(headers=headers)
                assert response.status == 401
                assert (await response.json())["error"]["code"] == "invalid_api_key"
            async with run.session.get(run.url("/m/v1/models")) as r:
                assert r.status == 401
            async with run.session.get(run.url("/metrics")) as r:
                assert r.status == 401
            async with run.session.get(run.url("/healthz")) as r:
                assert r.status == 200
    run_async(scenario())
    assert requests_logged(log) == []


def test_unknown_model_is_404_and_large_bodies_413():
    async def scenario():
        async with running() as run:
            response = await run.chat(model="nope")
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "model_not_found"
            async with run.session.post(run.url("/nope/v1/chat/completions"), headers=AUTH, json={}) as r:
                assert r.status == 404
            run.deployment.gateway.max_body_bytes = 1024
            response = await run.chat(messages=[{"role": "user", "content": "x" * 4096}])
            assert response.status == 413
            assert (await response.json())["error"]["type"] == "invalid_request_error"
    run_async(scenario())


def test_slow_start_answers_503_then_serves():
    async def scenario():
        async with running("env.FAKE_SGLANG_STARTUP_SECONDS=1.5", wait_ready=False) as run:
            async with run.session.get(run.url("/readyz")) as r:
                assert r.status == 503
                assert (await r.json())["models"] == {"m": "loading"}
            response = await run.chat()
            assert response.status == 503 and response.headers["Retry-After"]
            await _until(lambda: _ready(run), "readiness")
            assert (await run.chat()).status == 200
            assert [s for s, _ in run.reporter.statuses][:3] == ["loading", "loading", "idle"]
    run_async(scenario())


def test_crash_during_startup_fails_with_the_cause_and_the_log_tail(caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        async with running("env.FAKE_SGLANG_CRASH_AT_STARTUP=torch.OutOfMemoryError: CUDA out of memory.",
                           wait_ready=False) as run:
            assert await asyncio.wait_for(run.task, DEADLINE_S) == 3
            state, reason = run.reporter.statuses[-1]
            assert state == "failed" and "out_of_memory" in reason and "more GPUs" in reason
    run_async(scenario())
    assert "last log lines" in caplog.text and "CUDA out of memory" in caplog.text


def test_crash_mid_stream_ends_the_stream_with_an_error_event_then_restarts():
    async def scenario():
        async with running("env.FAKE_SGLANG_CRASH_AFTER_TOKENS=3", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            response = await run.chat(stream=True, max_tokens=50)
            started = time.monotonic()
            text = await asyncio.wait_for(response.text(), 5)
            assert time.monotonic() - started < 1.0
            events = [line for line in text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-1][6:])["error"]["code"] == 502
            engine = run.deployment.supervisor.engines[0]

            async def restarted_and_ready() -> bool:
                return engine.restarts == 1 and await _ready(run)
            await _until(restarted_and_ready, "the engine to be restarted")
            response = await run.chat(max_tokens=2)  # fewer tokens than the crash point
            assert response.status == 200
    run_async(scenario())


def test_an_engine_that_hangs_gets_504():
    async def scenario():
        async with running("env.FAKE_SGLANG_HANG_AFTER_TOKENS=0", upstream_read_timeout_s=1.0) as run:
            started = time.monotonic()
            response = await run.chat()
            assert response.status == 504
            assert (await response.json())["error"]["type"] == "engine_timeout"
            assert time.monotonic() - started < 5
    run_async(scenario())


def test_client_disconnect_aborts_the_upstream_request(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_REQUEST_LOG={log}", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.1") as run:
            response = await run.chat(stream=True, max_tokens=200)
            await response.content.readline()
            response.close()  # the client goes away mid-stream
            await _until(lambda: _logged(log, "disconnect"), "the engine to see the disconnect", 5)
            await _until(lambda: _gateway_idle(run), "the gateway to forget the request", 5)
    run_async(scenario())


async def _logged(log: Path, event: str) -> bool:
    return any(r.get("event") == event for r in requests_logged(log))


async def _gateway_idle(run: Running) -> bool:
    return run.deployment.gateway.in_flight == 0


def test_stream_chunks_reach_the_client_as_the_engine_produces_them():
    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.2") as run:
            response = await run.chat(stream=True, max_tokens=5)
            started = time.monotonic()
            arrivals = []
            async for line in response.content:
                if line.startswith(b"data: ") and b'"content"' in line:
                    arrivals.append(time.monotonic() - started)
            assert len(arrivals) == 5
            assert arrivals[0] < 0.15  # the first token did not wait for the rest
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
            assert all(0.1 < gap < 0.4 for gap in gaps), gaps
    run_async(scenario())


def test_idle_shutdown_waits_for_an_open_stream_then_exits_0():
    async def scenario():
        # 2 s idle limit; a 4 s stream started right away must finish before the shutdown
        async with running("idle.time_limit_hours=0.000556", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.2") as run:
            response = await run.chat(stream=True, max_tokens=20)
            text = await response.text()
            assert text.rstrip().endswith("data: [DONE]")
            code = await asyncio.wait_for(run.task, DEADLINE_S)
            assert code == 0
            assert run.reporter.statuses[-1] == ("stopped", "idle time limit reached")
            assert run.deployment.stats.requests["m"] == 1
    run_async(scenario())


def test_requests_during_drain_get_503_and_open_streams_finish():
    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            streams = [await run.chat(stream=True, max_tokens=20) for _ in range(5)]
            run.deployment.request_stop(15)
            await _until(lambda: _draining(run), "the drain to begin", 5)
            late = await run.chat()
            assert late.status == 503 and late.headers["Retry-After"]
            bodies = await asyncio.gather(*(s.text() for s in streams))
            assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
            assert await asyncio.wait_for(run.task, DEADLINE_S) == 128 + 15
    run_async(scenario())


async def _draining(run: Running) -> bool:
    return run.deployment.gateway.draining


def test_two_models_route_by_name_and_by_path():
    async def scenario():
        async with running(models=2, gpus=1) as run:
            for model in ("m", "m1"):
                response = await run.chat(model=model)
                assert response.status == 200
                assert (await response.json())["model"] == model
            async with run.session.post(run.url("/m1/generate"), headers=AUTH,
                                        json={"text": "hi", "sampling_params": {"max_new_tokens": 2}}) as r:
                assert r.status == 200
            engines = run.deployment.supervisor.engines
            assert [e.command.env["CUDA_VISIBLE_DEVICES"] for e in engines] == ["0", "0"]
            assert all("--mem-fraction-static" in e.command.argv for e in engines)
    run_async(scenario())


def test_tokens_never_reach_the_log(caplog):
    caplog.set_level(logging.DEBUG)
    hf = "hf_" + "Q" * 34

    async def scenario():
        async with running(f"general.hf_token={hf}") as run:
            await run.chat()
            await run.chat(headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})
    run_async(scenario())
    assert TOKEN not in caplog.text and hf not in caplog.text
    assert "--api-key '***'" in caplog.text  # the engine's own key is masked where its command is logged
