"""The endpoint's edge, as a client (or an attacker) meets it: the real gateway in front of the stand-in engine.

Each test reproduces one finding of a security review of the endpoint (raw sockets where the bytes matter) and
asserts what the client sees and what reached the engine. The stand-in engine logs every request it receives, with
its header names (FAKE_SGLANG_HTTP_LOG); a request the gateway relays carries the engine's key, so `relayed(log)`
is what got through.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import psutil

from tests.harness import AUTH, TOKEN, Running, _until, at_least, gateway_idle, requests_logged, run_async, running
from tests.unit.test_routes import METHODS, SGLANG_ROUTES, concrete

BEARER = f"Authorization: Bearer {TOKEN}\r\n".encode()


def relayed(log) -> list[dict]:
    """The requests the gateway relayed to the engine (they carry the engine's key; the app's own probes do not, but
    for its one question at ready, the context length, on `GET /v1/models`: a client's is the gateway's to answer)."""
    return [r for r in requests_logged(log) if "authorization" in r["headers"]
            and (r["method"], r["path"]) != ("GET", "/v1/models")]


async def exchange(port: int, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes and read what comes back until the gateway closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        chunks = []
        end = time.monotonic() + timeout_s
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(0.01, end - time.monotonic()))
            except ConnectionError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        writer.close()


def responses(raw: bytes, heads_only: set[int] = frozenset()) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in `raw`, in order: (status, headers, body). Responses numbered in `heads_only` (to HEAD
    requests) have no body whatever their content-length says."""
    out = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"an incomplete response head: {head[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        body = b""
        if status == 100:
            out.append((status, headers, body))
            continue
        if len(out) not in heads_only:
            if "content-length" in headers:
                length = int(headers["content-length"])
                body, raw = raw[:length], raw[length:]
            elif headers.get("transfer-encoding") == "chunked":
                while True:
                    size_line, _, raw = raw.partition(b"\r\n")
                    size = int(size_line, 16)
                    body, raw = body + raw[:size], raw[size + 2:]
                    if size == 0:
                        break
        out.append((status, headers, body))
    return out


def assert_error_shape(body: bytes, status: int) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str), error
    assert "/work" not in error["message"] and "Traceback" not in error["message"]
    return error


# ----- default deny -----


def test_only_inference_routes_reach_the_engine_whatever_the_method_or_prefix(tmp_path):
    log = tmp_path / "http.jsonl"
    sent: dict[tuple[str, str], int] = {}

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}") as run:
            for path in SGLANG_ROUTES:
                for prefix in ("/m", ""):
                    for method in METHODS:
                        body = None if method in ("GET", "HEAD", "OPTIONS") else json.dumps({"model": "m"})
                        headers = {**AUTH, "Content-Type": "application/json"}
                        async with run.session.request(method, run.url(prefix + concrete(path)), data=body,
                                                       headers=headers) as r:
                            await r.read()
                            sent[(method, prefix + concrete(path))] = r.status
                            if r.status >= 400 and method != "HEAD":
                                assert_error_shape(await r.read(), r.status)
    run_async(scenario())
    from app.gateway.routes import BY_MODEL_FIELD, INFERENCE
    expected = {(m, concrete(p)) for p, ms in INFERENCE.items() for prefix in ("/m", "") for m in ms
                if prefix or p in BY_MODEL_FIELD}
    reached = {(r["method"], r["path"]) for r in relayed(log)}
    assert reached == expected
    own = {"/v1/models", "/v1/models/m", "/m/v1/models", "/m/v1/models/m", "/metrics", "/"}  # the gateway answers these
    # (`/`: its own page, not SGLang's)
    for (method, target), status in sent.items():
        if (method, target.removeprefix("/m")) not in expected:
            assert status in (404, 405) or (target in own and status == 200), (method, target, status)
    assert sent[("GET", "/m/server_info")] == 404 and sent[("GET", "/m/get_server_info")] == 404
    assert sent[("GET", "/m/start_expert_distribution_record")] == 404
    assert sent[("GET", "/m/generate")] == 405


def test_malformed_targets_and_engine_paths_without_a_route_stay_with_the_gateway(tmp_path):
    log = tmp_path / "http.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}") as run:
            port = run.deployment.gateway.port
            for target in (b"/m", b"/m/", b"/m/%73erver_info", b"/m/v1/../server_info", b"//m/v1/models",
                           b"/m/v1/chat/completions/", b"/v1/foo", b"/v1/chat/completions%2F..%2Fserver_info"):
                raw = await exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + BEARER + b"\r\n")
                ((status, _, body),) = responses(raw)
                assert status in (404, 405), target
                assert_error_shape(body, status)
    run_async(scenario())
    assert relayed(log) == []


def test_model_cards_are_the_gateways_own_with_adapters_and_no_paths(tmp_path):
    log = tmp_path / "http.jsonl"
    adapter = tmp_path / "adapters" / "sql-lora"
    adapter.mkdir(parents=True)

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}", "models.0.lora.enable=true",
                           f"models.0.lora.modules=sql={adapter}", "models.0.lora.max_lora_rank=8") as run:
            for path in ("/v1/models", "/m/v1/models"):
                async with run.session.get(run.url(path), headers=AUTH) as r:
                    text = await r.text()
                    assert r.status == 200 and [c["id"] for c in json.loads(text)["data"]] == ["m", "m:sql"]
                    assert str(adapter) not in text and "root" not in text
            for path in ("/v1/models/m:sql", "/v1/models/m%3Asql", "/m/v1/models/sql", "/m/v1/models/m:sql"):
                async with run.session.get(run.url(path), headers=AUTH) as r:
                    card = await r.json()
                    assert r.status == 200 and card["id"] == "m:sql" and card["parent"] == "m", path
            async with run.session.get(run.url("/v1/models/m:nope"), headers=AUTH) as r:
                assert r.status == 404 and assert_error_shape(await r.read(), 404)["code"] == "model_not_found"
    run_async(scenario())
    assert relayed(log) == []


# ----- what a request costs before it is authenticated -----


def test_an_unauthenticated_body_is_never_read(tmp_path):
    log = tmp_path / "http.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}") as run:
            port = run.deployment.gateway.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 31457280\r\n\r\n" + b"x" * 65536)
            status_line = await asyncio.wait_for(reader.readline(), 5)
            assert status_line.startswith(b"HTTP/1.1 401")
            rest = await asyncio.wait_for(reader.read(), 5)  # then the gateway closes: no more of it is read
            assert b"connection: close" in rest.lower()
            writer.close()
    run_async(scenario())
    assert relayed(log) == []


def test_expect_100_continue_only_after_the_token_is_checked():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: %d\r\n" % len(body))
            raw = await exchange(port, head + b"\r\n")  # no token: no invitation to send the body
            assert [s for s, _, _ in responses(raw)] == [401]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + BEARER + b"\r\n")
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 100")
            assert await asyncio.wait_for(reader.readline(), 5) == b"\r\n"
            writer.write(body.encode())
            status = await asyncio.wait_for(reader.readline(), 5)
            assert status.startswith(b"HTTP/1.1 200"), status
            writer.close()
    run_async(scenario())


def test_head_answers_carry_no_body_so_the_next_answer_is_read_right():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            raw = await exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n" + BEARER + b"\r\n"
                                       b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            (s1, h1, b1), (s2, h2, b2), (s3, _, b3) = responses(raw, heads_only={0, 1})
            assert (s1, s2, s3) == (200, 200, 200) and b1 == b2 == b"" and json.loads(b3) == {"status": "ok"}
            assert int(h1["content-length"]) > 0 and int(h2["content-length"]) > 0
            raw = await exchange(port, b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                       b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            ((status, headers, _),) = responses(raw, heads_only={0})
            assert status == 401 and headers["connection"] == "close"
    run_async(scenario())


def test_an_upgrade_request_gets_one_answer_and_the_connection_closes():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            upgrade = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            raw = await exchange(port, upgrade + b"\r\n\x81\x85not-http")
            assert raw.count(b"HTTP/1.1 ") == 1 and [s for s, _, _ in responses(raw)] == [401]
            raw = await exchange(port, upgrade + BEARER + b"\r\n\x81\x85not-http")
            assert raw.count(b"HTTP/1.1 ") == 1 and [s for s, _, _ in responses(raw)] == [200]
    run_async(scenario())


def test_trailer_fields_are_neither_a_token_nor_forwarded(tmp_path):
    log = tmp_path / "http.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}") as run:
            port = run.deployment.gateway.port
            body = b'{"text": "hi", "sampling_params": {"max_new_tokens": 2}}'
            chunked = b"%x\r\n%s\r\n0\r\n" % (len(body), body)
            head = b"POST /m/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
                   b"Transfer-Encoding: chunked\r\n"
            raw = await exchange(port, head + b"\r\n" + chunked + BEARER + b"\r\n")
            assert [s for s, _, _ in responses(raw)] == [401]
            raw = await exchange(port, head + BEARER + b"Connection: close\r\n\r\n" + chunked
                                 + b"X-Smuggled: 1\r\n\r\n")
            assert [s for s, _, _ in responses(raw)] == [200]
    run_async(scenario())
    (reached,) = relayed(log)
    assert reached["path"] == "/generate" and "x-smuggled" not in reached["headers"]


def test_the_engines_server_header_does_not_leak():
    async def scenario():
        async with running() as run:
            response = await run.chat()
            assert response.status == 200 and "Server" not in response.headers
    run_async(scenario())


def test_a_partial_request_behind_a_busy_one_keeps_its_deadline():
    async def scenario():
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.1", request_receive_timeout_s=1.0) as run:
            port = run.deployment.gateway.port
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
                               "stream": True}).encode()
            stream = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + BEARER + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            partial = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + BEARER + b"Content-Length: 100\r\n\r\n{"
            started = time.monotonic()
            raw = await exchange(port, stream + partial, timeout_s=30)
            took = time.monotonic() - started
            (s1, _, b1), (s2, _, b2) = responses(raw)
            assert s1 == 200 and b1.rstrip().endswith(b"data: [DONE]")
            assert s2 == 408 and assert_error_shape(b2, 408)["code"] == "request_timeout"
            assert took < 6, took  # the 3 s stream, then the 408 at once: not another 30 s
    run_async(scenario())


# ----- one error shape -----


def test_engine_errors_are_reshaped_without_paths(tmp_path):
    async def scenario():
        async with running("env.FAKE_SGLANG_STATUS=400") as run:
            response = await run.chat()
            error = assert_error_shape(await response.read(), 400)
            assert response.status == 400 and error["type"] == "invalid_request_error"
            assert error["message"] == "messages: Fault injected by FAKE_SGLANG_STATUS=400"
    run_async(scenario())


def test_bodies_that_are_not_a_json_object_are_refused_at_the_gateway(tmp_path):
    log = tmp_path / "http.jsonl"

    async def scenario():
        async with running(f"env.FAKE_SGLANG_HTTP_LOG={log}") as run:
            for body in (b"[1, 2]", b'"text"', b"", b"null"):
                for path in ("/v1/chat/completions", "/m/v1/chat/completions", "/m/generate"):
                    async with run.session.post(run.url(path), data=body, headers={
                            **AUTH, "Content-Type": "application/json"}) as r:
                        assert r.status == 400, (path, body)
                        assert assert_error_shape(await r.read(), 400)["code"] == "invalid_json"
    run_async(scenario())
    assert relayed(log) == []


def test_metrics_count_every_answer_the_gateway_gave():
    async def scenario():
        async with running() as run:
            port = run.deployment.gateway.port
            before = await answered(run)
            await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # 401
            await exchange(port, b"GET /m/server_info HTTP/1.1\r\nHost: x\r\n" + BEARER + b"\r\n")  # 404
            await exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + BEARER
                           + b"Content-Length: 999999999\r\n\r\n")  # 413
            assert (await run.chat()).status == 200
            run.deployment.gateway.begin_drain()
            assert (await run.chat()).status == 503
            after = await answered(run)
            assert {s: after[s] - before.get(s, 0) for s in (401, 404, 413, 503)} == {401: 1, 404: 1, 413: 1, 503: 1}
            assert after[200] > before[200]
    run_async(scenario())


async def answered(run: Running) -> dict[int, int]:
    """The gateway's count of its responses, by status, from its /metrics."""
    async with run.session.get(run.url("/metrics"), headers=AUTH) as r:
        text = await r.text()
    prefix = 'clearml_sglang_responses_total{status="'
    return {int(line[len(prefix):].split('"')[0]): int(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


# ----- crashes -----


def scheduler_of(run: Running) -> psutil.Process:
    engine = run.deployment.supervisor.engines[0]
    (scheduler,) = [p for p in psutil.Process(engine.pid).children() if p.name().startswith("sglang::")]
    return scheduler


def test_a_dead_scheduler_is_felt_at_once_and_held_requests_ride_through_the_restart(caplog):
    begun: list[int] = []  # streams whose 200 has reached their client

    async def stream(run: Running) -> tuple[bytes, float | None]:
        async with run.session.post(run.url("/v1/chat/completions"), headers=AUTH, json={
                "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                "max_tokens": 500}) as response:
            assert response.status == 200
            begun.append(response.status)
            body = await asyncio.wait_for(response.read(), 20)
        return body, time.monotonic()

    async def scenario():
        # the stand-in's launcher, like SGLang's, notices a dead scheduler only after a pause (here 5 s)
        async with running("env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05", "env.FAKE_SGLANG_STARTUP_SECONDS=1.5") as run:
            streams = [asyncio.create_task(stream(run)) for _ in range(3)]
            await _until(lambda: at_least(begun, 3), "3 streams to be open", 30)  # (in flight is not begun)
            scheduler_of(run).kill()
            killed = time.monotonic()
            for body, ended in await asyncio.gather(*streams):
                event = json.loads(body.rstrip().split(b"\n")[-1][6:])
                assert event["error"]["code"] == "engine_crashed"
                assert ended - killed < 1.0, ended - killed
            async with run.session.get(run.url("/readyz")) as r:
                assert r.status == 503 and (await r.json())["models"]["m"] == "restarting"
                assert r.headers["Retry-After"] == "5"
            before = await held_seconds(run)
            sent = time.monotonic()
            held = await run.chat(max_tokens=3)  # arrives during the restart: held, then served
            waited = time.monotonic() - sent
            assert held.status == 200 and (await held.json())["usage"]["completion_tokens"] == 3
            assert time.monotonic() - killed > 1.0  # (it was held through the restart's 1.5 s start)
            assert run.deployment.supervisor.engines[0].restarts == 1
            assert await held_seconds(run) - before >= waited - 0.05  # its latency counts from its arrival
            metrics = await metrics_text(run)  # the three streams cut by the crash: errors, not successes
            assert 'clearml_sglang_responses_total{status="502"} 3' in metrics
            assert 'clearml_sglang_requests_total{endpoint="m",status="502"} 3' in metrics
            reason = "restarting m (restart 1 of 5 in the last 60 min)"
            await _until(lambda: said(run, ("loading", reason)), "the dashboard to say the restart", 5)
            await _until(lambda: said(run, ("idle", "")), "the dashboard to say it serves again", 5)
            await _until(lambda: reported_answers(run, 502, 3), "a report to count the cut streams", 5)
    run_async(scenario())
    crash = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Engine m crashed")]
    assert crash and "sglang::schedul" in crash[0] and "memory?" not in crash[0]  # (the kernel keeps 15 bytes)
    assert crash[0].endswith("(restart 1 of 5 in the last 60 min; 4 left)")


async def metrics_text(run: Running) -> str:
    async with run.session.get(run.url("/metrics"), headers=AUTH) as response:
        return await response.text()


async def held_seconds(run: Running) -> float:
    """The endpoint's time spent serving requests so far, as /metrics says."""
    line = next(line for line in (await metrics_text(run)).splitlines()
                if line.startswith('clearml_sglang_request_duration_seconds_sum{endpoint="m"}'))
    return float(line.rsplit(" ", 1)[1])


async def said(run: Running, status: tuple[str, str]) -> bool:
    return status in run.reporter.statuses


async def reported_answers(run: Running, status: int, count: int) -> bool:
    """Whether the reports' windows (the console's Traffic line) have counted `count` answers of `status`."""
    return sum(report.window.answers.get(status, 0) for report in run.reporter.reports) == count


def test_a_request_its_engine_failed_before_answering_is_sent_again_to_the_restarted_engine(tmp_path):
    async def scenario():
        async with running("env.FAKE_SGLANG_CRASH_AFTER_TOKENS=2", f"env.FAKE_SGLANG_CRASH_ONCE={tmp_path / 'once'}",
                           "env.FAKE_SGLANG_TOKEN_DELAY_SECONDS=0.05", "env.FAKE_SGLANG_STARTUP_SECONDS=1.5") as run:
            sent = time.monotonic()
            answer = await run.chat(max_tokens=5)  # not streamed: the engine dies before its first byte
            assert answer.status == 200 and (await answer.json())["usage"]["completion_tokens"] == 5
            assert time.monotonic() - sent > 1.5  # (answered by the restarted engine)
            assert run.deployment.supervisor.engines[0].restarts == 1
            assert 'clearml_sglang_responses_total{status="502"}' not in await metrics_text(run)
    run_async(scenario())


def test_past_the_hold_a_restarting_model_answers_503_with_retry_after():
    async def scenario():
        async with running("general.restart_hold_seconds=0", "env.FAKE_SGLANG_STARTUP_SECONDS=3") as run:
            engine = run.deployment.supervisor.engines[0]
            os.killpg(engine.pid, signal.SIGKILL)
            await _until(lambda: _state_is(run, "restarting"), "the engine to be restarting", 5)
            response = await run.chat()
            assert response.status == 503 and response.headers["Retry-After"] == "5"
            assert assert_error_shape(await response.read(), 503)["code"] == "restarting"
            await _until(lambda: gateway_idle(run), "the gateway to be idle", 5)
    run_async(scenario())


async def _state_is(run: Running, state: str) -> bool:
    return run.deployment.gateway.states()["m"] == state


def test_the_openai_sdk_with_its_defaults_rides_through_a_restart():
    import pytest

    openai = pytest.importorskip("openai")

    async def scenario():
        async with running("env.FAKE_SGLANG_STARTUP_SECONDS=12") as run:  # longer than the SDK's retries last
            client = openai.AsyncOpenAI(base_url=run.url("/v1"), api_key=TOKEN)
            engine = run.deployment.supervisor.engines[0]
            os.killpg(engine.pid, signal.SIGKILL)
            await _until(lambda: _state_is(run, "restarting"), "the engine to be restarting", 5)
            started = time.monotonic()
            answer = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                          max_tokens=3)
            assert answer.usage.completion_tokens == 3 and time.monotonic() - started > 10
            await client.close()
    run_async(scenario())
