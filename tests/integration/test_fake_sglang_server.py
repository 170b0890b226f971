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
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from app.serving.network import free_ports
from tests.conftest import ROOT
from tests.fakes.ledger import events as ledger_events
from tests.fakes.ledger import peak_gib, read_ledger, reclaim_dead, resident_ports

SCRIPT = ROOT / "tests" / "fakes" / "fake_sglang_server.py"
READY_LINE = "The server is fired up and ready to roll!"
API_KEY = "sk-fake-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
READY_DEADLINE_S = 20.0
HTTP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port for the app under test, below the range outgoing connections take theirs from (`free_ports`)."""
    return free_ports(1)[0]


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
                          "authorized": True, "messages": [{"role": "user", "content": "hi"}]}
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


# ----- memory saver and the shared device ledger -----

IDLE_ASSERTION = "AssertionError: release_memory_occupation should be called only when server is idle."
SCHEDULER_CRASH = "Scheduler hit an exception"
RELEASED = "memory is released: call /resume_memory_occupation first"
WEIGHTS_LOST = "weights were released without a CPU backup and not reloaded"
SCHEDULER_LABELS = 'engine_type="unified",model_name="tiny",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
SAVER = "--enable-memory-saver"


def memory_env(ledger: Path | None = None, *, device: float = 8.0, weights: float = 3.0, kv: float = 2.0,
               graph: float = 0.0, **extra: str) -> dict[str, str]:
    env = {"FAKE_SGLANG_DEVICE_GIB": str(device), "FAKE_SGLANG_WEIGHTS_GIB": str(weights),
           "FAKE_SGLANG_KV_GIB": str(kv), "FAKE_SGLANG_GRAPH_GIB": str(graph), **extra}
    if ledger is not None:
        env["FAKE_SGLANG_DEVICE_LEDGER"] = str(ledger)
    return env


def admin(server: FakeServer, path: str, body: dict | None = None, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=HTTP_TIMEOUT_S)


def release(server: FakeServer, tags: list[str] | None = None, headers: dict | None = None) -> requests.Response:
    return admin(server, "/release_memory_occupation", {"tags": tags}, headers)


def resume(server: FakeServer, tags: list[str] | None = None, headers: dict | None = None) -> requests.Response:
    return admin(server, "/resume_memory_occupation", {"tags": tags}, headers)


def reload_weights(server: FakeServer, headers: dict | None = None) -> requests.Response:
    return admin(server, "/update_weights_from_disk", {"model_path": "tiny"}, headers)


def chat(server: FakeServer, headers: dict | None = None) -> requests.Response:
    return requests.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=HTTP_TIMEOUT_S,
                         json={"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})


def wait_for(condition: Callable[[], bool], what: str, deadline_s: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after the deadline."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation


def gauge(server: FakeServer, name: str) -> float:
    return scrape(server)[f"{name}{{{SCHEDULER_LABELS}}}"]


def resident(ledger: Path, port: int) -> dict[str, float]:
    return read_ledger(ledger)["used"][str(port)]


def test_memory_gauges_have_sglangs_names_and_stay_static(start_fake):
    server = start_fake("--enable-metrics", SAVER, env=memory_env(weights=2.5, kv=1.5, graph=0.25))
    expected = {
        f"sglang:weight_memory_usage_gb{{{SCHEDULER_LABELS}}}": 2.5,
        f"sglang:kv_cache_memory_usage_gb{{{SCHEDULER_LABELS}}}": 1.5,
        f'sglang:graph_memory_usage_gb{{{SCHEDULER_LABELS},phase="decode"}}': 0.25,
        f"sglang:num_running_reqs{{{SCHEDULER_LABELS}}}": 0.0,
        f"sglang:num_queue_reqs{{{SCHEDULER_LABELS}}}": 0.0,
    }
    assert expected.items() <= scrape(server).items()
    text = requests.get(f"{server.url}/metrics", timeout=HTTP_TIMEOUT_S).text
    for help_line in ("# HELP sglang:weight_memory_usage_gb Memory used by model weights in GB.",
                      "# HELP sglang:kv_cache_memory_usage_gb Memory used by the KV cache pools in GB.",
                      "# HELP sglang:graph_memory_usage_gb Memory used by captured device graphs in GB.",
                      "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.",
                      "# TYPE sglang:weight_memory_usage_gb gauge", "# TYPE sglang:num_queue_reqs gauge"):
        assert help_line in text.splitlines()
    assert release(server).status_code == 200
    assert expected.items() <= scrape(server).items()  # emitted once at startup, as SGLang does

    sized = start_fake("--enable-metrics", "--mem-fraction-static", "0.5",
                       env=memory_env(device=10.0, weights=2.5, kv=9.0, graph=0.25))
    assert gauge(sized, "sglang:kv_cache_memory_usage_gb") == 2.25  # 0.5 * 10 - 2.5 - 0.25


def test_a_second_fake_that_does_not_fit_the_device_is_an_oom_at_startup(start_fake, tmp_path):
    ledger = tmp_path / "gpu0.json"
    first = start_fake(env=memory_env(ledger, device=8.0, weights=3.0, kv=2.0))
    book = read_ledger(ledger)
    assert book["capacity_gib"] == 8.0 and book["used_gib"] == 5.0
    assert book["used"] == {str(first.port): {"weights": 3.0, "kv_cache": 2.0, "cuda_graph": 0.0}}
    assert resident_ports(ledger) == [first.port]

    second = start_fake(env=memory_env(ledger, device=8.0, weights=3.0, kv=2.0), wait=False)
    assert second.proc.wait(timeout=READY_DEADLINE_S) == 1
    last = second.log().rstrip().splitlines()[-1]
    assert last.endswith("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 5.00 GiB (GPU 0; 8.00 GiB "
                         "total capacity; 5.00 GiB already allocated; 3.00 GiB free)")
    assert READY_LINE not in second.log()
    assert resident_ports(ledger) == [first.port]
    assert [e["gib"] for e in ledger_events(ledger, port=second.port)] == [5.0]
    assert ledger_events(ledger, port=second.port)[0]["event"] == "oom"

    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=5) == 0
    assert resident_ports(ledger) == [] and read_ledger(ledger)["used_gib"] == 0.0
    assert [e["event"] for e in ledger_events(ledger, port=first.port)] == ["allocate", "free"]
    assert peak_gib(ledger) == 5.0


def test_release_frees_the_tags_and_resume_books_them_again(start_fake, tmp_path):
    ledger = tmp_path / "gpu0.json"
    request_log = tmp_path / "requests.jsonl"
    server = start_fake(SAVER, "--enable-weights-cpu-backup",
                        env=memory_env(ledger, weights=3.0, kv=2.0, graph=0.5,
                                       FAKE_SGLANG_REQUEST_LOG=str(request_log)))
    assert read_ledger(ledger)["used_gib"] == 5.5

    response = release(server, ["kv_cache"])
    assert response.status_code == 200 and response.content == b""
    assert resident(ledger, server.port) == {"weights": 3.0, "kv_cache": 0.0, "cuda_graph": 0.5}
    assert read_ledger(ledger)["used_gib"] == 3.5
    refused = chat(server)
    assert refused.status_code == 500
    assert refused.json()["object"] == "error" and refused.json()["message"] == RELEASED

    assert resume(server, ["kv_cache"]).status_code == 200
    assert resident(ledger, server.port) == {"weights": 3.0, "kv_cache": 2.0, "cuda_graph": 0.5}
    assert chat(server).json()["choices"][0]["message"]["content"] == "the quick brown"

    assert release(server, None).status_code == 200  # null: all three
    assert read_ledger(ledger)["used_gib"] == 0.0 and resident_ports(ledger) == []
    assert admin(server, "/release_memory_occupation", {"tags": []}).status_code == 200  # already released
    assert resume(server, []).status_code == 200
    assert read_ledger(ledger)["used_gib"] == 5.5 and resident_ports(ledger) == [server.port]
    assert chat(server).status_code == 200  # the CPU backup kept the weights

    assert [(e["event"], e["gib"]) for e in ledger_events(ledger, port=server.port)] == [
        ("allocate", 5.5), ("release", 2.0), ("resume", 2.0), ("release", 5.5), ("resume", 5.5)]
    assert peak_gib(ledger) == 5.5
    logged = [json.loads(line) for line in request_log.read_text().splitlines()]
    assert [r for r in logged if r["event"] != "request"] == [
        {"event": "release", "model": "tiny", "tags": ["kv_cache"], "model_path": None},
        {"event": "resume", "model": "tiny", "tags": ["kv_cache"], "model_path": None},
        {"event": "release", "model": "tiny", "tags": ["weights", "kv_cache", "cuda_graph"], "model_path": None},
        {"event": "release", "model": "tiny", "tags": ["weights", "kv_cache", "cuda_graph"], "model_path": None},
        {"event": "resume", "model": "tiny", "tags": ["weights", "kv_cache", "cuda_graph"], "model_path": None},
    ]


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "not-streamed"])
def test_release_while_a_request_is_in_progress_kills_the_server(start_fake, tmp_path, stream):
    ledger = tmp_path / "gpu0.json"
    server = start_fake("--enable-metrics", SAVER,
                        env=memory_env(ledger, FAKE_SGLANG_HANG_AFTER_TOKENS="2"))
    body = {"model": "tiny", "stream": stream, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        if stream:
            response = conn.getresponse()
            events = 0
            while events < 2:
                if response.readline().startswith(b"data: "):
                    events += 1
        wait_for(lambda: gauge(server, "sglang:num_running_reqs") == 1, "the request to be running")
        with pytest.raises(requests.ConnectionError):
            release(server, ["kv_cache"])
        assert server.proc.wait(timeout=10) == 1
    finally:
        conn.close()
    lines = server.log().splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(IDLE_ASSERTION))
    assert lines[at + 1].endswith(SCHEDULER_CRASH)
    assert resident_ports(ledger) == []  # a dead process's memory comes back
    assert [e["event"] for e in ledger_events(ledger, port=server.port)] == ["allocate", "free"]


def test_resume_beyond_the_device_capacity_is_an_oom_exit(start_fake, tmp_path):
    ledger = tmp_path / "gpu0.json"
    sleeper = start_fake(SAVER, env=memory_env(ledger, device=8.0, weights=3.0, kv=2.0))
    assert release(sleeper).status_code == 200
    assert resident_ports(ledger) == []
    other = start_fake(env=memory_env(ledger, device=8.0, weights=3.0, kv=2.0))  # fits now that memory is free
    assert resident_ports(ledger) == [other.port]

    with pytest.raises(requests.ConnectionError):
        resume(sleeper)
    assert sleeper.proc.wait(timeout=10) == 1
    lines = sleeper.log().splitlines()
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 5.00 GiB (GPU 0; 8.00 GiB total capacity; " \
          "5.00 GiB already allocated; 3.00 GiB free)"
    at = next(i for i, line in enumerate(lines) if line.endswith(oom))
    assert lines[at + 1].endswith(SCHEDULER_CRASH)
    assert resident_ports(ledger) == [other.port]
    assert [e["event"] for e in ledger_events(ledger, port=sleeper.port)] == ["allocate", "release", "oom", "free"]
    assert peak_gib(ledger) == 5.0 and chat(other).status_code == 200


def test_weights_released_without_a_cpu_backup_are_lost_until_reloaded(start_fake, tmp_path):
    request_log = tmp_path / "requests.jsonl"
    server = start_fake(SAVER, env={"FAKE_SGLANG_REQUEST_LOG": str(request_log)})
    assert release(server, ["weights"]).status_code == 200
    assert chat(server).json()["message"] == RELEASED

    refused = reload_weights(server)
    assert refused.status_code == 400
    assert refused.json()["success"] is False and "/resume_memory_occupation" in refused.json()["message"]

    assert resume(server, ["weights"]).status_code == 200
    lost = chat(server)
    assert lost.status_code == 500 and lost.json()["message"] == WEIGHTS_LOST

    reloaded = reload_weights(server)
    assert reloaded.status_code == 200
    assert reloaded.json() == {"success": True, "message": "Succeeded to update model weights.",
                               "num_paused_requests": 0}
    assert chat(server).status_code == 200
    logged = [json.loads(line) for line in request_log.read_text().splitlines()]
    assert {"event": "update_weights", "model": "tiny", "tags": None, "model_path": "tiny"} in logged


def test_weights_with_a_cpu_backup_survive_release_and_resume(start_fake):
    server = start_fake(SAVER, "--enable-weights-cpu-backup")
    assert release(server).status_code == 200
    assert resume(server).status_code == 200
    assert chat(server).json()["choices"][0]["message"]["content"] == "the quick brown"


def test_requests_wait_while_the_engine_resumes(start_fake):
    server = start_fake("--enable-metrics", SAVER, "--enable-weights-cpu-backup",
                        env={"FAKE_SGLANG_RESUME_SECONDS": "3"})
    assert release(server).status_code == 200
    with ThreadPoolExecutor(max_workers=2) as pool:
        resuming = pool.submit(resume, server)
        wait_for(lambda: "Resume memory occupation" in server.log(), "the resume to start")
        answer = pool.submit(chat, server)
        wait_for(lambda: gauge(server, "sglang:num_queue_reqs") == 1, "the request to be queued")
        assert resuming.result().status_code == 200
        assert answer.result().status_code == 200  # it ran once the memory was back
    assert gauge(server, "sglang:num_queue_reqs") == 0


def test_update_weights_waits_for_the_requests_in_progress(start_fake):
    server = start_fake("--enable-metrics", env={"FAKE_SGLANG_TOKEN_DELAY_SECONDS": "0.5",
                                                 "FAKE_SGLANG_RELOAD_SECONDS": "0.3"})
    body = {"prompt": "hi", "max_tokens": 4, "stream": True}
    with requests.post(f"{server.url}/v1/completions", json=body, stream=True, timeout=HTTP_TIMEOUT_S) as streamed:
        lines = streamed.iter_lines()
        first = next(line for line in lines if line.startswith(b"data: "))
        with ThreadPoolExecutor(max_workers=1) as pool:
            reloading = pool.submit(reload_weights, server)
            wait_for(lambda: "Start update_weights" in server.log(), "the reload to start")
            assert gauge(server, "sglang:num_running_reqs") == 1  # the stream is still in progress
            rest = sse_payloads(lines)
            assert rest[-1] == "[DONE]"  # the reload did not cut it
            assert reloading.result().json()["success"] is True
    assert json.loads(first[len(b"data: "):])["choices"][0]["text"] == "the"
    assert [p["choices"][0]["text"] for p in rest[:-1]] == [" quick", " brown", " fox", ""]
    log = server.log()
    assert log.index('"POST /v1/completions HTTP/1.1" 200') < log.index("Succeeded to update model weights.")


def test_a_killed_fakes_memory_is_reclaimed(start_fake, tmp_path):
    ledger = tmp_path / "gpu0.json"
    server = start_fake(env=memory_env(ledger))
    server.proc.kill()
    server.proc.wait(timeout=5)
    assert resident_ports(ledger) == [server.port]  # nothing ran at exit: the entry is stale
    assert reclaim_dead(ledger) == [server.port]
    assert resident_ports(ledger) == [] and read_ledger(ledger)["used_gib"] == 0.0
    assert ledger_events(ledger, port=server.port)[-1]["reason"] == "process gone"


def test_memory_routes_follow_sglangs_admin_optional_auth(start_fake, tmp_path):
    unauthorized = {"error": "Unauthorized"}
    api_only = start_fake(SAVER, "--enable-weights-cpu-backup", "--api-key", API_KEY)
    for call in (release, resume, reload_weights):
        response = call(api_only)
        assert response.status_code == 401 and response.json() == unauthorized
        assert call(api_only, headers=AUTH).status_code == 200

    admin_key = {"Authorization": "Bearer sk-admin"}
    both = start_fake(SAVER, "--enable-weights-cpu-backup", "--api-key", API_KEY, "--admin-api-key", "sk-admin")
    for call in (release, resume, reload_weights):
        for headers in (None, AUTH):  # the API key is not accepted where the admin key is set
            response = call(both, headers=headers)
            assert response.status_code == 401 and response.json() == unauthorized
        assert call(both, headers=admin_key).status_code == 200
    assert chat(both, headers=AUTH).status_code == 200

    ledger = tmp_path / "gpu0.json"
    open_server = start_fake(env=memory_env(ledger))  # no key, no memory saver: open, and release is a no-op
    assert release(open_server).status_code == 200
    assert resident(ledger, open_server.port) == {"weights": 3.0, "kv_cache": 2.0, "cuda_graph": 0.0}
    assert chat(open_server).status_code == 200
    assert resume(open_server).status_code == 200 and reload_weights(open_server).status_code == 200


@pytest.mark.parametrize("name, value", [("FAKE_SGLANG_WEIGHTS_GIB", "lots"), ("FAKE_SGLANG_DEVICE_GIB", "0"),
                                         ("FAKE_SGLANG_RESUME_SECONDS", "-1")])
def test_memory_env_is_validated_with_exit_2(name, value):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model-path", "tiny"],
        cwd=ROOT, env=_env({name: value}), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "sglang serve: error:" in result.stderr and name in result.stderr
