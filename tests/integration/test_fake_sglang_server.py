"""The fake SGLang server (tests/fakes/fake_sglang_server.py) behaves like the real one where tests rely on it.

Each test runs the fake as a real subprocess on a free loopback port, waits for readiness by polling /health
(bounded deadline), and always ends the process. No fixed sleeps are used for synchronisation.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "fakes" / "fake_sglang_server.py"
READY_LINE = "The server is fired up and ready to roll!"
API_KEY = "sk-fake-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY_DEADLINE_S = 20.0
HTTP_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FakeServer:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    health_seen: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, deadline_s: float = READY_DEADLINE_S) -> None:
        """Poll /health until 200, recording every status seen; fail if the process dies or time runs out."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"fake server exited with {self.proc.returncode} before ready:\n{self.log()}")
            try:
                status = requests.get(f"{self.url}/health", timeout=1).status_code
            except requests.ConnectionError:
                status = 0  # not listening yet
            if status:
                self.health_seen.append(status)
            if status == 200:
                return
            time.sleep(0.02)  # polling interval, not synchronisation
        pytest.fail(f"fake server not ready within {deadline_s}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_SGLANG_")}
    env.update(extra)
    return env


def _launch(log_dir: Path, args: list[str], env: dict[str, str] | None = None) -> FakeServer:
    port = free_port()
    log_path = log_dir / f"fake-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--model-path", "tiny", "--port", str(port), *args],
            cwd=ROOT, env=_env(env or {}), stdout=log, stderr=subprocess.STDOUT,
        )
    return FakeServer(proc, port, log_path)


@pytest.fixture
def start_fake(tmp_path: Path) -> Iterator[Callable[..., FakeServer]]:
    """Start fake servers (ready, unless wait=False); every one is ended when the test ends."""
    servers: list[FakeServer] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> FakeServer:
        server = _launch(tmp_path, list(args), env)
        servers.append(server)
        if wait:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def shared_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeServer]:
    """One ready server with an API key, a LoRA adapter and metrics, for the tests that only send requests."""
    server = _launch(
        tmp_path_factory.mktemp("fake"),
        ["--served-model-name", "chat", "--lora-paths", "lora_a=/adapters/a", "--api-key", API_KEY,
         "--enable-metrics"],
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def sse_payloads(lines: Iterator[bytes]) -> list[dict | str]:
    """The `data:` payloads of an SSE stream, JSON-decoded except the final `[DONE]`."""
    payloads: list[dict | str] = []
    for line in lines:
        if not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):].decode()
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def scrape(server: FakeServer) -> dict[str, float]:
    """Samples of /metrics as {'name{labels}': value}."""
    response = requests.get(f"{server.url}/metrics", timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 200
    samples = {}
    for line in response.text.splitlines():
        match = re.fullmatch(r"(\S+\{.*\}|\S+) (\S+)", line)
        if match and not line.startswith("#"):
            samples[match.group(1)] = float(match.group(2))
    return samples


def test_health_is_503_until_ready_then_200_and_sigterm_exits_0(start_fake):
    server = start_fake(env={"FAKE_SGLANG_STARTUP_SECONDS": "1.0"})
    assert server.health_seen[0] == 503 and server.health_seen[-1] == 200
    assert READY_LINE in server.log()
    assert requests.get(f"{server.url}/ready", timeout=HTTP_TIMEOUT_S).status_code == 200
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=5) == 0


def test_auth_guards_every_route_but_health_and_metrics(shared_fake):
    url = shared_fake.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = requests.get(f"{url}/v1/models", headers=headers, timeout=HTTP_TIMEOUT_S)
        assert response.status_code == 401
        assert response.json() == {"error": "Unauthorized"}
    for open_path in ("/health", "/health_generate", "/ready", "/metrics"):
        assert requests.get(f"{url}{open_path}", timeout=HTTP_TIMEOUT_S).status_code == 200
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=HTTP_TIMEOUT_S).json()
    assert models["object"] == "list"
    base, adapter = models["data"]
    assert base["id"] == "chat" and base["root"] == "tiny" and base["max_model_len"] == 2048
    assert base["owned_by"] == "sglang"
    assert adapter["id"] == "lora_a" and adapter["root"] == "/adapters/a" and adapter["parent"] == "chat"


def test_unknown_adapter_is_sglangs_400(shared_fake):
    response = requests.post(f"{shared_fake.url}/v1/chat/completions", headers=AUTH, timeout=HTTP_TIMEOUT_S,
                             json={"model": "chat:nope", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert response.json()["message"].startswith("Got LoRA adapter that has never been loaded: nope")


def test_streamed_chat_completion_with_usage(shared_fake):
    body = {
        "model": "chat:lora_a", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say five words"}],
    }
    with requests.post(f"{shared_fake.url}/v1/chat/completions", json=body, headers=AUTH, stream=True,
                       timeout=HTTP_TIMEOUT_S) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers.get("Transfer-Encoding") == "chunked"
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [p for p in payloads[:-1] if isinstance(p, dict)]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "chat:lora_a" for c in chunks)
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(tokens) == 5
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_metrics_counters_advance_with_tokens_served(shared_fake):
    def key(name: str, streaming: str) -> str:
        return f'{name}{{engine_type="unified",is_streaming="{streaming}",model_name="chat"}}'

    before = scrape(shared_fake)
    url = shared_fake.url
    plain = requests.post(f"{url}/v1/completions", headers=AUTH, timeout=HTTP_TIMEOUT_S,
                          json={"model": "chat", "prompt": "one two three", "max_tokens": 4})
    assert plain.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    streamed = requests.post(f"{url}/generate", headers=AUTH, timeout=HTTP_TIMEOUT_S,
                             json={"text": "a b", "sampling_params": {"max_new_tokens": 6}, "stream": True})
    assert sse_payloads(streamed.iter_lines())[-2]["meta_info"]["completion_tokens"] == 6
    after = scrape(shared_fake)

    def delta(name: str, streaming: str) -> float:
        return after[key(name, streaming)] - before.get(key(name, streaming), 0.0)

    assert delta("sglang:prompt_tokens_total", "false") == 3
    assert delta("sglang:generation_tokens_total", "false") == 4
    assert delta("sglang:num_requests_total", "false") == 1
    assert delta("sglang:prompt_tokens_total", "true") == 2
    assert delta("sglang:generation_tokens_total", "true") == 6
    assert delta("sglang:num_requests_total", "true") == 1
    ttft = 'sglang:time_to_first_token_seconds_count{engine_type="unified",is_streaming="true",model_name="chat"}'
    assert after[ttft] >= 1
    text = requests.get(f"{url}/metrics", timeout=HTTP_TIMEOUT_S).text
    assert "# TYPE sglang:generation_tokens_total counter" in text
    assert "# TYPE sglang:num_running_reqs gauge" in text
    assert "# TYPE sglang:time_to_first_token_seconds histogram" in text


def test_crash_after_tokens_cuts_the_stream_and_exits(start_fake):
    server = start_fake(env={"FAKE_SGLANG_CRASH_AFTER_TOKENS": "3"})
    payloads: list[dict | str] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with requests.post(f"{server.url}/v1/completions", stream=True, timeout=HTTP_TIMEOUT_S,
                           json={"prompt": "hello", "max_tokens": 10, "stream": True}) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                payloads.extend(sse_payloads(iter([line])))
    assert [p["choices"][0]["text"] for p in payloads] == ["the", " quick", " brown"]
    assert server.proc.wait(timeout=10) == 1
    assert "crashed after 3 tokens" in server.log()


def test_hang_keeps_health_and_logs_the_client_disconnect(start_fake, tmp_path):
    request_log = tmp_path / "requests.jsonl"
    server = start_fake(env={"FAKE_SGLANG_HANG_AFTER_TOKENS": "2", "FAKE_SGLANG_REQUEST_LOG": str(request_log)})
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                     body=json.dumps({"model": "tiny", "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]}))
        response = conn.getresponse()
        events = 0
        while events < 2:
            if response.readline().startswith(b"data: "):
                events += 1
        assert requests.get(f"{server.url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
    finally:
        conn.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in request_log.read_text().splitlines()]
        if any(r["event"] == "disconnect" for r in records):
            break
        time.sleep(0.02)
    assert records[0] == {"event": "request", "path": "/v1/chat/completions", "model": "tiny", "stream": True,
                          "authorized": True}
    assert {"event": "disconnect", "path": "/v1/chat/completions", "model": "tiny", "stream": True,
            "tokens_sent": 2} in records
    assert server.proc.poll() is None


def test_status_fault_answers_every_inference_route(start_fake):
    server = start_fake(env={"FAKE_SGLANG_STATUS": "503"})
    response = requests.post(f"{server.url}/v1/completions", json={"prompt": "x"}, timeout=HTTP_TIMEOUT_S)
    assert response.status_code == 503
    assert response.json()["object"] == "error" and response.json()["code"] == 503


def test_crash_at_startup_prints_the_message_last_and_exits_1(start_fake):
    message = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    server = start_fake(env={"FAKE_SGLANG_CRASH_AT_STARTUP": message}, wait=False)
    assert server.proc.wait(timeout=READY_DEADLINE_S) == 1
    assert server.log().rstrip().splitlines()[-1].endswith(message)
    assert READY_LINE not in server.log()


@pytest.mark.parametrize("how", ["script", "module"])
def test_cli_rejects_an_unknown_flag_with_exit_2(how):
    launcher = [str(SCRIPT)] if how == "script" else ["-m", "tests.fakes.fake_sglang_server"]
    result = subprocess.run(
        [sys.executable, *launcher, "--model-path", "tiny", "--no-such-flag", "1"],
        cwd=ROOT, env=_env({}), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "sglang serve: error:" in result.stderr and "--no-such-flag" in result.stderr
