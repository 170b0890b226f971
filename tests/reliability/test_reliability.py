"""Load and faults, bounded to a few minutes: nothing is lost, nothing leaks, nothing hangs.

Each scenario runs a whole deployment (the real gateway and supervisor) against the stand-in SGLang server and
asserts what the clients saw: complete answers where the engine answered, an error response or SSE error event
where it could not, and 4xx for hostile input that never reached an engine without a valid token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import socket
import time

import psutil

from tests.harness import (
    AUTH,
    TOKEN,
    Running,
    _ready,
    _until,
    at_least,
    gateway_idle,
    in_flight,
    requests_logged,
    run_async,
    running,
)

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


def test_engine_killed_under_load_every_client_hears_at_once_and_held_requests_ride_through():
    streaming: list[int] = []  # clients whose stream has begun (status 200 and its headers received)

    async def client(run: Running) -> tuple[str, float]:
        try:
            async with run.session.post(run.url("/v1/chat/completions"), headers=AUTH,
                                        json={**STREAM, "max_tokens": 200}) as response:
                if response.status != 200:
                    return f"status {response.status}", time.monotonic()
                streaming.append(response.status)
                body = await asyncio.wait_for(response.read(), 15)
        except asyncio.TimeoutError:
            return "hung", time.monotonic()
        outcome = "error event" if b'"error"' in body else "complete" if b"[DONE]" in body else "cut"
        return outcome, time.monotonic()

    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05", "env.FAKE_SGLANG_STARTUP_SECONDS=1") as run:
            clients = [asyncio.create_task(client(run)) for _ in range(30)]
            # the gateway counts a request as in flight before SGLang has answered it; the scenario is streams
            # already begun, so it waits for every client to hold its 200 (a slow machine can lag a long way)
            await _until(lambda: at_least(streaming, 30), "30 streams to be open", 30)
            engine = run.deployment.supervisor.engines[0]
            # SGLang's scheduler dies; its launcher would notice a second later and then pause before tearing down
            scheduler = [p for p in psutil.Process(engine.pid).children() if p.name().startswith("sglang::")]
            scheduler[0].kill()
            killed = time.monotonic()
            await _until(lambda: _restarting(run), "the gateway to see the crash", 1)
            held = asyncio.create_task(stream_events(run, 3))  # sent during the restart: held, then served
            outcomes = await asyncio.gather(*clients)
            assert [o for o, _ in outcomes] == ["error event"] * 30, outcomes
            assert max(t for _, t in outcomes) - killed < 1.0
            assert content_events(await held) == 3 and engine.restarts == 1
            await _until(lambda: _restarted(run, engine), "the engine to be back", 30)
            assert content_events(await stream_events(run, 3)) == 3
    run_async(scenario())


async def _restarting(run: Running) -> bool:
    return run.deployment.gateway.states()["m"] == "restarting"


async def _restarted(run: Running, engine) -> bool:
    return engine.restarts == 1 and await _ready(run)


def test_sigterm_with_200_streams_open_lets_all_finish():
    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.02") as run:
            streams = [asyncio.create_task(stream_events(run, 100)) for _ in range(200)]
            await _until(lambda: in_flight(run, 200), "200 streams to be open", 15)
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
        ("lowercase scheme, wrong token", post(b"/v1/chat/completions", b"{}",
                                               f"Authorization: bearer x{TOKEN}\r\n".encode()), 401),
        ("token with a control character", post(b"/v1/chat/completions", b"{}",
                                                f"Authorization: Bearer {TOKEN}\x01\r\n".encode()), (400, 401)),
        ("wrong token, invalid UTF-8", post(b"/v1/chat/completions", b"{}",
                                            b"Authorization: Bearer \xff\xfe\xfd\r\n"), 401),
        ("unauthenticated engine path", post(b"/m/generate", b'{"text": "x"}', b""), 401),
        ("unauthenticated traversal", post(b"/m/../../etc/passwd", b"{}", b""), 401),
        ("traversal with a token", b"GET /m/../../etc/passwd HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("encoded traversal", b"GET /m/%2e%2e/%2e%2e/etc HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("engine admin route with a token", post(b"/m/release_memory_occupation", b"{}", auth), 404),
        ("encoded admin route", post(b"/m/%72elease_memory_occupation", b"{}", auth), 404),
        ("router control API", post(b"/m/workers", b'{"url": "http://evil:1"}', auth), 404),
        ("engine's key and command line", b"GET /m/server_info HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("a GET that crashed SGLang's scheduler",
         b"GET /m/start_expert_distribution_record HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("an engine route under /v1/", b"GET /v1/loads HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("a JSON array body", post(b"/v1/chat/completions", b"[1, 2]"), 400),
        ("an unauthenticated HEAD", b"HEAD /v1/models HTTP/1.1\r\n" + host + b"\r\n", 401),
        ("unknown endpoint", b"GET /nope/v1/models HTTP/1.1\r\n" + host + auth + b"\r\n", 404),
        ("unknown model", post(b"/v1/chat/completions", b'{"model": "nope"}'), 404),
        ("bad JSON", post(b"/v1/chat/completions", b'{"model": "m", "messages": [}'), 400),
        ("token only in a trailer", b"POST /m/generate HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
         b"2\r\n{}\r\n0\r\n" + auth + b"\r\n", 401),
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
    """The status of the answer to raw request bytes; an error's body must be in the one error shape."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        if not line.startswith(b"HTTP/1.1 "):
            return 0
        status = int(line.split()[1])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")),
                      0)
        body = await asyncio.wait_for(reader.readexactly(length), timeout_s) if not data.startswith(b"HEAD") else b""
        if status >= 400 and body:
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str), error
        return status
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


# ----- what strangers can make the gateway hold -----

RSS_BOUND = 64 * 2**20


class PeakRss:
    """The gateway's (this process's) resident memory: the most it reached while sampled, above where it began."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> PeakRss:
        async def sample() -> None:
            while True:
                self.peak = max(self.peak, self.process.memory_info().rss)
                await asyncio.sleep(0.05)
        self._task = asyncio.create_task(sample())
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def flood(port: int, request: bytes, seconds: float) -> tuple[int, bool]:
    """Write `request` over and over on one connection for `seconds`, never reading: (bytes the gateway accepted,
    whether it closed the connection)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(0.5)
        batch = request * max(1, 65536 // len(request))
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sent += sock.send(batch)
            except TimeoutError:
                continue  # the gateway reads no more for now
            except OSError:
                return sent, True
    return sent, False


def test_a_pipelining_client_that_never_reads_costs_bounded_memory():
    async def scenario():
        async with running(write_timeout_s=2.0) as run:
            port = run.deployment.gateway.port
            stranger = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
            member = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode() + b"\r\n\r\n"
            async with PeakRss() as rss:
                sent, closed = await asyncio.to_thread(flood, port, stranger, 5)
                assert closed  # one 401, then the connection is closed
                # a token holder that pipelines and never reads its answers: read no further, cut off at the deadline
                sent, closed = await asyncio.to_thread(flood, port, member, 8)
                assert closed and sent < 64 * 2**20
            assert rss.growth < RSS_BOUND, rss.growth / 2**20
            assert (await run.chat()).status == 200  # and the gateway serves on
    run_async(scenario())


def test_unauthenticated_bodies_are_never_buffered():
    def big_post(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(5)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 31457280\r\n\r\n")
            chunk = b"x" * 65536
            with contextlib.suppress(OSError):
                for _ in range(480):  # the whole 30 MiB, as fast as the gateway takes it
                    sock.sendall(chunk)
            with contextlib.suppress(OSError):
                return sock.recv(12)
            return b""

    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            async with PeakRss() as rss:
                answers = await asyncio.gather(*(asyncio.to_thread(big_post, port) for _ in range(30)))
            assert rss.growth < RSS_BOUND, rss.growth / 2**20
            assert all(a in (b"HTTP/1.1 401", b"") for a in answers) and answers.count(b"HTTP/1.1 401") >= 1
            assert (await run.chat()).status == 200
    run_async(scenario())
