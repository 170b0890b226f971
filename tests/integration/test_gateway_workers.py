"""The endpoint served by two gateway worker processes (`general.gateway_workers=2`), through a whole deployment
(stand-in engines): both take connections on the one port; tokens, adapters, keys' limits, the counters, the idle
clock, a worker's crash and the drain behave as with one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal

import aiohttp
import psutil

from tests.harness import AUTH, DEADLINE_S, TOKEN, _until, run_async, running

WORKERS = "general.gateway_workers=2"
ALICE = "alice-token-" + "a" * 20


def workers(run) -> list[psutil.Process]:
    """The worker processes alive (a killed one may linger a moment as a zombie, not yet reaped)."""
    alive = []
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if process.status() != psutil.STATUS_ZOMBIE and "app.gateway.worker" in " ".join(process.cmdline()):
                alive.append(process)
    return alive


async def counted(run, endpoint: str, count: int) -> bool:
    return run.deployment.stats.requests[endpoint] >= count


def test_two_workers_share_the_port_and_the_counters_add_up():
    async def scenario():
        async with running(WORKERS, "models.0.lora.enable=true", "models.0.lora.modules=sql=org/sql-lora",
                           "models.0.lora.max_lora_rank=8") as run:
            assert len(workers(run)) == 2
            assert (await run.chat(headers={})).status == 401
            # 16 connections open at once: the kernel spreads them over both workers' sockets
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            async with aiohttp.ClientSession(connector=connector) as session:
                async def chat():
                    async with session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}) as r:
                        assert r.status == 200, await r.text()
                        return (await r.json())["usage"]["completion_tokens"]
                tokens = await asyncio.gather(*(chat() for _ in range(16)))
                held = {p.pid: [c for c in p.net_connections() if c.status == psutil.CONN_ESTABLISHED
                                and c.laddr.port == int(run.base.rsplit(":", 1)[1])] for p in workers(run)}
                assert all(held.values()), f"connections per worker: {held}"
                # (the workers' tables, not the control plane's, whose connections are the workers')
                await _until(lambda: _metric_at_least(run, "connections_open", 16), "the workers' tables on /metrics")
            async with run.session.post(run.url("/m/v1/completions"), headers=AUTH,
                                        json={"model": "m:sql", "prompt": "x", "max_tokens": 3}) as r:
                assert r.status == 200  # (an adapter: served by a worker)
            await _until(lambda: counted(run, "m", 17), "the workers' reports")
            stats = run.deployment.stats
            assert stats.requests["m"] == 17 and stats.completion_tokens["m"] == sum(tokens) + 3
            assert stats.answered[401] == 1
            async with run.session.get(run.url("/metrics"), headers=AUTH) as r:  # (the control plane's answer)
                assert 'clearml_sglang_requests_total{endpoint="m",status="200"} 17' in await r.text()
            async with run.session.get(run.url("/v1/models"), headers=AUTH) as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["m", "m:sql"]
    run_async(scenario())


def test_a_keys_rate_limits_hold_across_workers():
    async def scenario():
        async with running(WORKERS, f"auth.tokens={TOKEN},alice={ALICE}",
                           "auth.limits=" + json.dumps({"alice": {"rpm": 3}})) as run:
            statuses = []
            for _ in range(5):  # (a connection each: whichever worker takes it)
                async with aiohttp.ClientSession() as session:
                    async with session.post(run.url("/v1/chat/completions"), headers={
                            "Authorization": f"Bearer {ALICE}"}, json={
                            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as r:
                        statuses.append(r.status)
                        if r.status == 429:
                            assert r.headers["Retry-After"] and r.headers["x-ratelimit-remaining-requests"] == "0"
            assert statuses == [200, 200, 200, 429, 429]
            assert run.deployment.stats.key_usage()["alice"].rate_limited == 2
    run_async(scenario())


def test_a_worker_that_dies_is_started_again_and_the_endpoint_serves_on(caplog):
    async def scenario():
        async with running(WORKERS) as run:
            victim = workers(run)[0]
            victim.send_signal(signal.SIGKILL)
            await _until(lambda: _replaced(run, victim.pid), "the worker to be started again")
            for _ in range(8):  # (new connections: both workers' sockets)
                async with aiohttp.ClientSession() as session:
                    async with session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as r:
                        assert r.status == 200
            await _until(lambda: counted(run, "m", 8), "the workers' reports")
        assert "Gateway worker" in caplog.text and "starting it again" in caplog.text
    run_async(scenario())


async def _metric_at_least(run, name: str, count: int) -> bool:
    async with run.session.get(run.url("/metrics"), headers=AUTH) as r:
        text = await r.text()
    return int(re.search(rf"^clearml_sglang_{name} (\d+)$", text, re.M).group(1)) >= count


async def _replaced(run, pid: int) -> bool:
    alive = workers(run)
    return len(alive) == 2 and pid not in [p.pid for p in alive]


def test_idle_shutdown_waits_for_a_stream_on_a_worker():
    async def scenario():
        async with running(WORKERS, "idle.time_limit_hours=0.000556", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.2") as run:
            response = await run.chat(stream=True, max_tokens=20)  # 4 s, past the 2 s idle limit
            text = await response.text()
            assert text.rstrip().endswith("data: [DONE]")
            assert await asyncio.wait_for(run.task, DEADLINE_S) == 0
            assert run.reporter.statuses[-1] == ("stopped", "idle time limit reached")
            assert run.deployment.stats.requests["m"] == 1
        assert not workers(None)
    run_async(scenario())


def test_sigterm_drains_the_workers_streams_then_stops():
    async def scenario():
        async with running(WORKERS, "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            streams = [await run.chat(stream=True, max_tokens=20) for _ in range(4)]
            await _until(lambda: _metric_at_least(run, "requests_in_flight", 4), "/metrics to count the workers'")
            run.deployment.request_stop(15)
            await _until(lambda: _draining(run), "the drain to begin", 5)
            async with aiohttp.ClientSession() as session:  # (a new connection: whichever worker takes it)
                async with session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as late:
                    assert late.status == 503 and late.headers["Retry-After"]
            bodies = await asyncio.gather(*(s.text() for s in streams))
            assert all(b.rstrip().endswith("data: [DONE]") for b in bodies)
            assert await asyncio.wait_for(run.task, DEADLINE_S) == 128 + 15
            assert run.deployment.stats.requests["m"] == 4
        assert not workers(None)
    run_async(scenario())


async def _draining(run) -> bool:
    return run.deployment.built.workers is not None and run.deployment.built.workers.draining


def test_tokens_reach_workers_by_their_channel_only():
    async def scenario():
        async with running(WORKERS, f"auth.tokens={TOKEN},alice={ALICE}") as run:
            for process in workers(run):
                seen = " ".join(process.cmdline()) + open(f"/proc/{process.pid}/environ", "rb").read().decode(
                    errors="replace")
                assert TOKEN not in seen and ALICE not in seen
    run_async(scenario())


def test_an_engine_crash_ends_a_workers_stream_and_the_next_request_waits_for_the_restart():
    async def scenario():
        async with running(WORKERS, "env.FAKE_SGLANG_CRASH_AFTER_TOKENS=3",
                           "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            response = await run.chat(stream=True, max_tokens=50)
            text = await asyncio.wait_for(response.text(), 5)
            events = [line for line in text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-1][6:])["error"]["code"] == "engine_crashed"
            # at once, before anyone has said the engine is down: held until it serves again, not refused
            after = await run.chat(max_tokens=2)
            assert after.status == 200, await after.text()
            assert run.deployment.supervisor.engines[0].restarts == 1
    run_async(scenario())


def test_each_worker_holds_its_own_socket_only_and_a_restarted_one_serves_every_connection():
    """Under uvloop, as `clearml-sglang run` serves: a child inherits every inheritable descriptor whatever
    `pass_fds` says, so a worker once held its sibling's listening socket too. When the sibling died, that copy
    stayed in the port's group unaccepted, and a third of new connections hung."""
    import uvloop

    async def scenario():
        async with running(WORKERS) as run:
            port = int(run.base.rsplit(":", 1)[1])

            def listening() -> dict[int, int]:
                held = {}
                for p in [psutil.Process(), *workers(run)]:
                    with contextlib.suppress(psutil.Error):  # (a worker that ended since it was listed)
                        held[p.pid] = sum(1 for c in p.net_connections() if c.status == psutil.CONN_LISTEN
                                          and c.laddr.port == port)
                return held
            assert sorted(listening().values()) == [0, 1, 1]  # (the control plane listens on its own port only)
            victim = workers(run)[0]
            victim.send_signal(signal.SIGKILL)
            await _until(lambda: _replaced(run, victim.pid), "the worker to be started again")

            async def one_each() -> bool:  # (the new socket is the new worker's once its spawn has returned)
                return sorted(listening().values()) == [0, 1, 1]
            await _until(one_each, "one listening socket in each worker, none in the control plane")
            for _ in range(12):  # fresh connections: each lands on one of the port's sockets
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                    async with session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                            "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) as r:
                        assert r.status == 200
    uvloop.run(scenario())
