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
import time
from pathlib import Path

import psutil

from tests.harness import (
    AUTH,
    DEADLINE_S,
    TOKEN,
    Running,
    _ready,
    _until,
    gateway_idle,
    requests_logged,
    run_async,
    running,
)

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
            await _until(lambda: gateway_idle(run), "the last request to be recorded", 5)
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

            async def told_idle() -> bool:  # (the reporter is called on its own thread: "idle" can come just after)
                return "idle" in [s for s, _ in run.reporter.statuses]

            await _until(told_idle, "the idle status")
            states = [s for s, _ in run.reporter.statuses]
            assert set(states[:states.index("idle")]) == {"loading"}  # loading, phase by phase, then idle
            reasons = [r for s, r in run.reporter.statuses if s == "loading"]
            assert reasons.index("m: starting SGLang") < reasons.index("m: loading weights") < reasons.index(
                "m: ready")  # (the stand-in prints SGLang's lines for these)
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
            assert json.loads(events[-1][6:])["error"]["code"] == "engine_crashed"
            # at once, maybe before the crash is noticed: held through the restart, not refused (it was 502 when
            # the engine's port refused the connection first)
            after = await run.chat(max_tokens=2)
            assert after.status == 200, await after.text()
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
            assert (await response.json())["error"]["code"] == "engine_timeout"
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
            await _until(lambda: gateway_idle(run), "the gateway to forget the request", 5)
    run_async(scenario())


async def _logged(log: Path, event: str) -> bool:
    return any(r.get("event") == event for r in requests_logged(log))


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

    keys = []

    async def scenario():
        async with running(f"general.hf_token={hf}") as run:
            await run.chat()
            await run.chat(headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxx"})
            engine = run.deployment.supervisor.engines[0]
            keys.append(engine.command.api_key)
            # the engine's key is not on any command line of its processes (every user can read those)
            launcher = psutil.Process(engine.pid)
            processes = [launcher, *launcher.children(recursive=True)]
            assert len(processes) >= 2 and not any(keys[0] in " ".join(p.cmdline()) for p in processes)
    run_async(scenario())
    assert keys[0] and len(keys[0]) >= 40
    assert TOKEN not in caplog.text and hf not in caplog.text and keys[0] not in caplog.text
    assert "api key: set" in caplog.text  # (the engine got its key nevertheless)


def test_an_app_killed_outright_leaves_no_engine_running(tmp_path):
    from tests.integration.test_clearml_offline import start, wait_ready

    process, base = start(tmp_path, "models.0.model=org/m", "models.0.endpoint_name=m", "general.device=cpu",
                          f"auth.tokens={TOKEN}")
    children: list[psutil.Process] = []
    try:
        wait_ready(process, base)
        children = psutil.Process(process.pid).children(recursive=True)
        engines = [p for p in children  # (ClearML's SDK forks a helper of its own, which outlives a SIGKILL)
                   if p.name().startswith("sglang::") or "app.sglang.launch" in p.cmdline()]
        assert len(engines) == 2  # the engine's launcher and its scheduler
        process.kill()  # no drain, no stop: the app is simply gone
        process.wait(10)
        gone, alive = psutil.wait_procs(engines, timeout=10)
        assert not alive, [p.pid for p in alive]
    finally:
        if process.poll() is None:
            process.kill()
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()


def test_the_benchmarks_requests_are_served_but_counted_nowhere_and_are_no_activity():
    async def scenario():
        async with running("benchmark.enable=true", "benchmark.concurrencies=1", "benchmark.max_seconds=10") as run:
            deployment = run.deployment
            quiet = {"Authorization": f"Bearer {deployment.gateway.quiet_token}"}
            answered = dict(deployment.stats.answered)  # (the readiness polls: /readyz is counted)
            response = await run.chat(headers=quiet)
            assert response.status == 200 and (await response.json())["usage"]["completion_tokens"] == 4
            missing = await run.chat(model="nope", headers=quiet)
            assert missing.status == 404
            assert deployment.stats.total_requests == 0 and deployment.stats.answered == answered
            assert deployment.built.tracker.decide(time.monotonic()).state == "idle"
            counted = await run.chat()  # the same request with a user's token counts, and is activity
            assert counted.status == 200 and deployment.stats.total_requests == 1
            assert deployment.built.tracker.decide(time.monotonic()).state == "active"
    run_async(scenario())
