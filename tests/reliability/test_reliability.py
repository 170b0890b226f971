"""Load and faults, bounded to a few minutes: nothing is lost, nothing leaks, nothing hangs.

Each scenario runs a whole deployment (the real gateway and supervisor) against the stand-in SGLang server and
asserts what the clients saw: complete answers where the engine answered, an error response or SSE error event
where it could not, and 4xx for hostile input that never reached an engine without a valid token.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import psutil

from tests.harness import AUTH, TOKEN, Running, _ready, _until, gateway_idle, requests_logged, run_async, running

STREAM = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "stream": True}


async def stream_events(run: Running, max_tokens: int, timeout_s: float = 30.0) -> list[bytes]:
    """The data lines of one streamed chat completion, read to its end."""
    async with run.session.post(run.url("/v1/chat/completions"), headers=AUTH,
                                json={**STREAM, "max_tokens": max_tokens}) as response:
        assert response.status == 200
        body = await asyncio.wait_for(response.read(), timeout_s)
    return [line for line in body.split(b"\n") if line.startswith(b"data: ")]


def content_events(events: list[bytes]) -> int:
    return sum(1 for e in events if b'"content"' in e and b'"delta"' in e)


def test_1000_requests_with_a_fifth_of_clients_leaving_mid_stream(tmp_path):
    log = tmp_path / "requests.jsonl"
    rng = random.Random(20261129)
    leaving = {i for i in range(1000) if rng.random() < 0.2}

    async def one(run: Running, i: int, gate: asyncio.Semaphore) -> str:
        async with gate:
            # a leaver asks for a long answer (4 s): it is surely still running upstream when the client goes,
            # however late this busy loop gets round to closing it
            response = await run.session.post(run.url("/v1/chat/completions"), headers=AUTH,
                                              json={**STREAM, "max_tokens": 800 if i in leaving else 20})
            if i in leaving:
                await response.content.readline()
                response.close()  # gone mid-stream
                return "left"
            events = [line for line in (await response.read()).split(b"\n") if line.startswith(b"data: ")]
            assert response.status == 200 and events[-1] == b"data: [DONE]" and content_events(events) == 20
            return "done"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_REQUEST_LOG={log}", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.005") as run:
            process = psutil.Process()
            await stream_events(run, 2)
            fds_before = process.num_fds()
            gate = asyncio.Semaphore(50)
            outcomes = await asyncio.gather(*(one(run, i, gate) for i in range(1000)))
            assert outcomes.count("done") == 1000 - len(leaving) and outcomes.count("left") == len(leaving)
            await _until(lambda: gateway_idle(run), "every request to end", 20)
            upstream = run.deployment.gateway.routes["m"].upstream
            assert upstream.open == len(upstream.idle)  # no connection to the engine is left busy
            await run.session.close()  # the client's own keep-alive sockets
            await _until(lambda: _fds_at_most(process, fds_before + len(upstream.idle)),
                         "file descriptors to be released", 10)
            await _until(lambda: _disconnects_seen(log, len(leaving)), "the engine to see every departure", 10)
    run_async(scenario())


async def _fds_at_most(process: psutil.Process, limit: int) -> bool:
    return process.num_fds() <= limit


async def _disconnects_seen(log, count: int) -> bool:
    return sum(1 for r in requests_logged(log) if r.get("event") == "disconnect") >= count


def test_engine_killed_under_load_every_client_hears_and_it_comes_back():
    async def client(run: Running) -> str:
        try:
            async with run.session.post(run.url("/v1/chat/completions"), headers=AUTH,
                                        json={**STREAM, "max_tokens": 200}) as response:
                if response.status != 200:
                    return f"status {response.status}"
                body = await asyncio.wait_for(response.read(), 15)
        except asyncio.TimeoutError:
            return "hung"
        return "error event" if b'"error"' in body else "complete" if b"[DONE]" in body else "cut"

    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05") as run:
            clients = [asyncio.create_task(client(run)) for _ in range(30)]
            await _until(lambda: _in_flight(run, 30), "30 streams to be open", 10)
            engine = run.deployment.supervisor.engines[0]
            os.killpg(engine.pid, signal.SIGKILL)
            outcomes = await asyncio.gather(*clients)
            assert outcomes == ["error event"] * 30, outcomes
            await _until(lambda: _restarted(run, engine), "the engine to be back", 30)
            assert content_events(await stream_events(run, 3)) == 3
    run_async(scenario())


async def _in_flight(run: Running, count: int) -> bool:
    return run.deployment.gateway.in_flight >= count


async def _restarted(run: Running, engine) -> bool:
    return engine.restarts == 1 and await _ready(run)


def test_sigterm_with_200_streams_open_lets_all_finish():
    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.02") as run:
            streams = [asyncio.create_task(stream_events(run, 100)) for _ in range(200)]
            await _until(lambda: _in_flight(run, 200), "200 streams to be open", 15)
            run.deployment.request_stop(signal.SIGTERM)
            results = await asyncio.gather(*streams)
            assert all(r[-1] == b"data: [DONE]" and content_events(r) == 100 for r in results)
            assert await asyncio.wait_for(run.task, 30) == 128 + signal.SIGTERM
    run_async(scenario())


def test_idle_limit_reached_while_a_30s_stream_runs_waits_for_it():
    async def scenario():
        # a 3 s idle limit; one stream of 300 tokens at 0.1 s
        async with running("idle.time_limit_hours=0.00083", "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.1") as run:
            started = time.monotonic()
            events = await stream_events(run, 300, timeout_s=60)
            finished = time.monotonic()
            assert events[-1] == b"data: [DONE]" and content_events(events) == 300
            assert finished - started >= 29
            assert await asyncio.wait_for(run.task, 30) == 0  # then the idle shutdown, cleanly
            assert run.reporter.statuses[-1] == ("stopped", "idle time limit reached")
    run_async(scenario())


# ----- hostile input -----

def hostile_requests(port: int) -> list[tuple[str, bytes, int]]:
    """(what, raw request bytes, expected status)."""
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    host = f"Host: 127.0.0.1:{port}\r\n".encode()

    def post(path: bytes, body: bytes, headers: bytes = auth) -> bytes:
        return (b"POST " + path + b" HTTP/1.1\r\n" + host + headers + b"Content-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body) + body)

    cases = [
        ("no token", post(b"/v1/chat/completions", b'{"model": "m"}', b""), 401),
        ("empty bearer", post(b"/v1/chat/completions", b'{"model": "m"}', b"Authorization: Bearer\r\n"), 401),
        ("basic auth", post(b"/v1/chat/completions", b"{}", b"Authorization: Basic dXNlcjpwYXNz\r\n"), 401),
        ("token without scheme", post(b"/v1/chat/completions", b"{}",
                                      f"Authorization: {TOKEN}\r\n".encode()), 401),
        ("lowercase scheme", post(b"/v1/chat/completions", b"{}",
                                  f"Authorization: bearer {TOKEN}\r\n".encode()), 401),
        ("token with a control character", post(b"/v1/chat/completions", b"{}",
                                                f"Authorization: Bearer {TOKEN}\x01\r\n".encode()), (400, 401)),
        ("wrong token, invalid UTF-8", post(b"/v1/chat/completions", b"{}",
                                            b"Authorization: Bearer \xff\xfe\xfd\r\n"), 401),
        ("unauthenticated engine path", post(b"/m/generate", b'{"text": "x"}', b""), 401),
        ("unauthenticated traversal", post(b"/m/../../etc/passwd", b"{}", b""), 401),
        ("traversal with a token", b"GET /m/../../etc/passwd HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("encoded traversal", b"GET /m/%2e%2e/%2e%2e/etc HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("engine admin route with a token", post(b"/m/release_memory_occupation", b"{}", auth), 403),
        ("encoded admin route", post(b"/m/%72elease_memory_occupation", b"{}", auth), 403),
        ("router control API", post(b"/m/workers", b'{"url": "http://evil:1"}', auth), 403),
        ("unknown endpoint", b"GET /nope/v1/models HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("unknown model", post(b"/v1/chat/completions", b'{"model": "nope"}'), 404),
        ("bad JSON", post(b"/v1/chat/completions", b'{"model": "m", "messages": [}'), 400),
        ("invalid UTF-8 body", post(b"/v1/chat/completions", b'{"model": "m\xff\xfe"}'), 404),
        ("invalid UTF-8 path", b"GET /\xff\xfe/v1/models HTTP/1.1\r\n" + host + auth + b"\r\n", 400),
        ("huge header", b"GET /healthz HTTP/1.1\r\n" + host + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
        ("many headers", b"GET /healthz HTTP/1.1\r\n" + host + b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100)
                                                                        for i in range(1000)) + b"\r\n", 431),
        ("garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n", 400),
        ("bad method line", b"GET\r\n\r\n", 400),
        ("body too large", post(b"/v1/chat/completions", b"x" * 64, auth).replace(
            b"Content-Length: 64", b"Content-Length: 999999999"), 413),
        ("upgrade ignored", b"GET /v1/models HTTP/1.1\r\n" + host
         + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 401),
    ]
    return cases


def _statuses(expected: int | tuple[int, ...]) -> tuple[int, ...]:
    return expected if isinstance(expected, tuple) else (expected,)


async def send_raw(port: int, data: bytes, timeout_s: float = 10.0) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    finally:
        writer.close()


async def trickle(port: int) -> int:
    """A slow-loris client: headers, then a body one byte at a time, slower than the server waits."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        for _ in range(20):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.2)
            if reader.at_eof() or reader._buffer:  # noqa: SLF001 - an answer arrived
                break
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1]) if line.startswith(b"HTTP/1.1 ") else 0
    finally:
        writer.close()


def test_2000_hostile_requests_get_4xx_and_never_reach_an_engine_unauthenticated(tmp_path):
    log = tmp_path / "requests.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_REQUEST_LOG={log}", request_receive_timeout_s=1.0) as run:
            port = run.deployment.gateway.port
            cases = hostile_requests(port)
            process = psutil.Process()
            for what, data, expected in cases:  # once each first: the status each one gets
                assert await send_raw(port, data) in _statuses(expected), what
            rss_before = process.memory_info().rss
            gate = asyncio.Semaphore(40)

            async def one(i: int) -> tuple[str, int, int]:
                what, data, expected = cases[i % len(cases)]
                async with gate:
                    return what, expected, await send_raw(port, data)

            results = await asyncio.gather(*(one(i) for i in range(2000)))
            wrong = [(what, expected, got) for what, expected, got in results if got not in _statuses(expected)]
            assert not wrong, wrong[:5]
            assert all(400 <= got < 500 for _, _, got in results)
            assert set(await asyncio.gather(*(trickle(port) for _ in range(5)))) == {408}
            await _until(lambda: gateway_idle(run), "the gateway to be idle", 10)
            assert process.memory_info().rss - rss_before < 30 * 2**20  # flat, give or take the allocator
            bad_json = 1 + sum(1 for i in range(2000) if cases[i % len(cases)][0] == "bad JSON")
        reached = [r for r in requests_logged(log) if r.get("event") == "request"]
        # only the authenticated bad JSON is the engine's to judge (its own 400): nothing else got there
        assert len(reached) == bad_json and all(r["authorized"] for r in reached)
    run_async(scenario())
