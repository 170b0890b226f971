"""The real SGLang server on this CPU (development mode), behind the real gateway: what a user of `run` gets.

One deployment for the module: the tiny Llama model with two LoRA adapters, made offline by `app.demo.tiny_model`.
Skipped where sglang is not installed; CI runs it on the engine install.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")

import psutil  # noqa: E402
import requests  # noqa: E402

from app.cli import CONSOLE_FORMAT  # noqa: E402
from app.config import load_config  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from app.serving.deployment import Deployment, RunOptions  # noqa: E402
from app.sglang.logs import Phase  # noqa: E402
from tests.fakes.registry import NoRegistry  # noqa: E402

pytestmark = pytest.mark.engine

TOKEN = "engine-tier-token-" + "z" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The deployment's own startup deadline. A start takes 40-80 s here; CI's shared two cores have taken longer.
STARTUP_DEADLINE_S = 600
# How long a test waits: past the deployment's deadline, so that a start that fails ends with the app's own
# failure (its classification and the engine's last lines), not with the test giving up first.
STARTUP_WAIT_S = STARTUP_DEADLINE_S + 60



def readyz(base: str) -> int | None:
    """`/readyz`'s status, or None where it did not answer in time: on CI's two cores, busy with SGLang servers
    loading, a poll can wait its turn for the CPU; the startup deadline, not one poll, decides."""
    try:
        return requests.get(base + "/readyz", timeout=10).status_code
    except requests.Timeout:
        return None


class Served:
    """A deployment running on its own event loop in a thread, for synchronous HTTP clients."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.loop = asyncio.new_event_loop()
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.readyz_codes: list[int] = []

    def _run(self) -> None:
        self.exit_code = self.loop.run_until_complete(self.deployment.run())

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.deployment.gateway.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + STARTUP_WAIT_S
        while time.monotonic() < deadline and self.thread.is_alive():
            gateway = self.deployment.gateway
            code = readyz(self.base) if gateway is not None and gateway.port else None
            if code is not None:
                if not self.readyz_codes or self.readyz_codes[-1] != code:
                    self.readyz_codes.append(code)
                if code == 200:
                    return
            time.sleep(0.25)
        # read before stopping: the stop changes every state
        ended = f"still not after {STARTUP_WAIT_S} s" if self.exit_code is None else f"it exited with {self.exit_code}"
        where = self.engines_at()
        self.stop()
        raise AssertionError(f"not ready: {ended}; {where}")

    def engines_at(self) -> str:
        """Where each engine's startup got to and its last console lines: the one line of a failed start that a
        CI log's summary keeps."""
        supervisor = self.deployment.supervisor
        if supervisor is None:
            return "no engine was started"
        return "; ".join(
            f"{e.endpoint}: {e.state}, phase {e.phases.current.value if e.phases.current else 'none'}, "
            f"restarts {e.restarts}, last lines {e.tail[-3:]!r}" for e in supervisor.engines)

    @classmethod
    @contextlib.contextmanager
    def serving(cls, config):
        """A started deployment of `config` on the CPU, stopped afterwards, leaving no process behind."""
        options = RunOptions(host="127.0.0.1", port=0, public_host="127.0.0.1",
                             startup_deadline_s=STARTUP_DEADLINE_S, drain_deadline_s=120)
        server = cls(Deployment(config, NoRegistry(), options=options))
        server.start()  # (stops the deployment itself when it fails)
        try:
            yield server
        finally:
            server.stop()
        assert not psutil.Process().children(recursive=True)

    def stop(self, signum: int = 15) -> int | None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.deployment.request_stop, signum)
            self.thread.join(120)
        return self.exit_code


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = make_tiny_models(Path(tmp_path_factory.mktemp("tiny")))
    config = load_config(overrides=[
        f"models.0.model={models.base}", "models.0.endpoint_name=tiny", "models.0.max-total-tokens=65536",
        "models.0.lora.enable=true", f"models.0.lora.modules=a={models.adapters[0]},b={models.adapters[1]}",
        "models.0.lora.max_loras=2", "models.0.lora.max_lora_rank=8",
        "general.device=cpu", f"auth.tokens={TOKEN}", "idle.report_interval_seconds=2",
    ])
    console = StartupConsole()
    with console.capturing(), Served.serving(config) as server:
        server.startup_console = console.lines
        console.close()
        yield server


class StartupConsole(logging.Handler):
    """The console's lines at info level as the app writes them (`app.cli`), from the start until ready."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(CONSOLE_FORMAT))
        self.lines: list[str] = []
        self.open = True

    def emit(self, record: logging.LogRecord) -> None:
        if self.open:
            self.lines += self.format(record).splitlines()

    def close(self) -> None:
        self.open = False
        super().close()

    @contextlib.contextmanager
    def capturing(self):
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.INFO)
        root.addHandler(self)
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(level)


def chat(served: Served, model: str, stream: bool = False, max_tokens: int = 12, headers_extra=None,
         **extra) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say something."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, **extra}
    return requests.post(served.base + "/v1/chat/completions", json=body, headers={**AUTH, **(headers_extra or {})},
                         timeout=120, stream=stream)


def test_readiness_goes_from_503_to_200(served):
    assert served.readyz_codes[-1] == 200
    assert served.readyz_codes == [503, 200]  # the gateway listens (and says "loading") while the engine loads
    assert requests.get(served.base + "/readyz", timeout=30).json()["models"] == {"tiny": "resident"}


def test_startup_phases_are_read_from_sglangs_own_lines_and_its_probes_stay_out_of_the_console(served):
    engine = served.deployment.supervisor.engines[0]
    assert [phase for phase, _ in engine.phases.began] == [
        Phase.STARTING, Phase.LOADING_WEIGHTS, Phase.PREPARING, Phase.WARMING_UP, Phase.READY]
    deadline = time.monotonic() + 30
    while served.deployment.timeline.serving is None and time.monotonic() < deadline:  # (announced just after ready)
        time.sleep(0.05)
    summary = served.deployment.timeline.summary()
    assert [s.name for s in summary.engines["tiny"]] == ["starting SGLang", "loading weights", "allocating memory",
                                                         "warming up"]
    assert summary.own_s < summary.total_s
    # the app has probed /health and scraped /metrics every 2 s since: SGLang printed no access line for either
    requests.get(served.base + "/metrics", headers=AUTH, timeout=30)
    assert not [line for line in engine.tail if '"GET /health' in line or '"GET /metrics' in line]


def test_the_console_from_start_to_ready_is_short_and_its_lines_fit_a_screen(served):
    lines = served.startup_console
    assert any("Starting engine tiny on port" in line for line in lines)  # (captured from the start)
    assert len(lines) <= 40, "\n".join(lines)
    assert max(map(len, lines)) <= 300, max(lines, key=len)
    assert not [line for line in lines if "server_args=" in line or "Warning:" in line]


def test_models_lists_the_model_and_its_adapters(served):
    ids = [m["id"] for m in requests.get(served.base + "/v1/models", headers=AUTH, timeout=10).json()["data"]]
    assert ids == ["tiny", "tiny:a", "tiny:b"]


def test_chat_base_and_adapters_give_their_own_greedy_answers(served):
    answers = {}
    for model in ("tiny", "tiny:a", "tiny:b"):
        response = chat(served, model)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] > 0
        answers[model] = body["choices"][0]["message"]["content"]
    assert len(set(answers.values())) == 3, answers
    assert chat(served, "tiny:a").json()["choices"][0]["message"]["content"] == answers["tiny:a"]  # deterministic


def test_completion_by_path_prefix_and_native_generate(served):
    response = requests.post(served.base + "/tiny/v1/completions", headers=AUTH, timeout=60,
                             json={"model": "tiny", "prompt": "import os", "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
    response = requests.post(served.base + "/tiny/generate", headers=AUTH, timeout=60,
                             json={"text": "import os", "sampling_params": {"max_new_tokens": 4, "temperature": 0},
                                   "lora_path": "b"})
    assert response.status_code == 200 and response.json()["meta_info"]["completion_tokens"] == 4


def test_streams_pass_chunk_by_chunk_and_their_tokens_are_counted(served):
    before = served.deployment.stats.completion_tokens["tiny"]
    response = chat(served, "tiny:b", stream=True, max_tokens=10, stream_options={"include_usage": True})
    assert response.status_code == 200
    events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 10
    assert len(events) > 5  # token by token, not one buffered blob
    deadline = time.monotonic() + 10
    while served.deployment.gateway.in_flight and time.monotonic() < deadline:  # the gateway records at the end
        time.sleep(0.02)
    assert served.deployment.stats.completion_tokens["tiny"] - before == 10


def test_wrong_token_is_refused_before_the_engine(served):
    response = requests.post(served.base + "/v1/chat/completions", timeout=10,
                             headers={"Authorization": "Bearer not-the-token-at-all"}, json={"model": "tiny"})
    assert response.status_code == 401


def test_the_engines_operator_routes_are_not_reachable(served):
    engine = served.deployment.supervisor.engines[0]
    for path in ("/tiny/server_info", "/tiny/get_server_info", "/tiny/start_expert_distribution_record",
                 "/tiny/flush_cache", "/v1/loads", "/tiny/openapi.json", "/tiny/metrics"):
        response = requests.get(served.base + path, headers=AUTH, timeout=10)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = requests.post(served.base + "/tiny/unload_lora_adapter", headers=AUTH, json={"lora_name": "a"},
                             timeout=10)
    assert response.status_code == 404
    assert chat(served, "tiny:a").status_code == 200 and engine.restarts == 0  # adapter loaded, engine never hit


def test_the_engines_key_is_on_no_command_line_yet_the_engine_requires_it(served):
    engine = served.deployment.supervisor.engines[0]
    key = engine.command.api_key
    launcher = psutil.Process(engine.pid)
    processes = [launcher, *launcher.children(recursive=True)]
    assert len(processes) >= 3  # the launcher, its scheduler and detokenizer
    assert not any(key in " ".join(p.cmdline()) for p in processes)
    assert requests.get(engine.url + "/v1/models", timeout=10).status_code == 401
    assert requests.get(engine.url + "/v1/models", timeout=10, headers={"Authorization": f"Bearer {key}"}).ok


def test_sglangs_own_errors_come_back_in_the_one_shape_without_paths(served):
    response = requests.post(served.base + "/tiny/v1/chat/completions", headers=AUTH, timeout=30,
                             json={"model": "tiny", "messages": 3})
    error = response.json()["error"]
    assert response.status_code == 400 and set(error) == {"message", "type", "param", "code"}
    assert "messages" in error["message"] and ".py" not in error["message"] and "/" not in error["message"]
    response = requests.post(served.base + "/v1/chat/completions", headers=AUTH, timeout=30, data="[1, 2]")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    models = requests.get(served.base + "/tiny/v1/models", headers=AUTH, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == ["tiny", "tiny:a", "tiny:b"] and "/" not in models.text


def test_the_engines_identity_and_cors_grants_are_not_relayed(served):
    # SGLang answers any Origin with access-control-allow-origin and credentials, and uvicorn names itself
    response = chat(served, "tiny", max_tokens=2, headers_extra={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in response.headers)
    assert "server" not in {h.lower() for h in response.headers}


def test_the_endpoints_page_plays_with_the_real_engine(served):
    """The page's playground against real SGLang (the browser tier covers the page with the stand-in)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on this machine")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(served.base + "/")
        page.get_by_label("Token", exact=True).fill(TOKEN)
        page.get_by_label("Token", exact=True).press("Enter")
        sync_api.expect(page.locator("#models tbody tr")).to_have_count(3)  # tiny, tiny:a, tiny:b
        page.get_by_label("Model", exact=True).select_option("tiny:a")
        page.get_by_label("Max tokens", exact=True).fill("16")
        page.get_by_role("button", name="Send").click()
        sync_api.expect(page.locator("#answer-stats")).to_contain_text("tokens/s", timeout=60_000)
        sync_api.expect(page.locator("#send")).to_be_enabled(timeout=60_000)  # the stream ended
        assert page.locator("#chat .turn span").nth(1).inner_text()  # the model's (random) words
        assert not page.locator("#play-error").is_visible()
        browser.close()


def test_a_dead_scheduler_ends_streams_at_once_and_held_requests_are_served_after_the_restart(served, caplog):
    engine = served.deployment.supervisor.engines[0]
    response = chat(served, "tiny", stream=True, max_tokens=2000, ignore_eos=True)
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith(b"data: "))  # the stream is under way
    (scheduler,) = [p for p in psutil.Process(engine.pid).children(recursive=True)
                    if p.name().startswith("sglang::scheduler")]
    scheduler.kill()
    killed = time.monotonic()
    last = [line for line in lines if line.startswith(b"data: ")][-1]
    assert time.monotonic() - killed < 1.0
    assert json.loads(last[6:])["error"]["code"] == "engine_crashed"
    assert requests.get(served.base + "/readyz", timeout=30).json()["models"]["tiny"] == "restarting"
    held = chat(served, "tiny:a", max_tokens=4)  # held while SGLang restarts (tens of seconds here), then served
    assert held.status_code == 200 and held.json()["usage"]["completion_tokens"] == 4
    assert time.monotonic() - killed > 5 and engine.restarts == 1 and engine.state == "resident"
    crashed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Engine tiny crashed")]
    assert crashed and "sglang::scheduler" in crashed[0] and "memory?" not in crashed[0]


def test_sigterm_during_20_open_streams_lets_all_finish(served):
    def one_stream(i: int) -> tuple[int, bytes]:
        response = chat(served, "tiny" if i % 2 else "tiny:a", stream=True, max_tokens=200, ignore_eos=True)
        body = b"".join(response.iter_content(None))
        return response.status_code, body

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(one_stream, i) for i in range(20)]
        deadline = time.monotonic() + 60
        while served.deployment.gateway.in_flight < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.deployment.gateway.in_flight == 20
        exit_code = served.stop(15)
        results = [f.result(timeout=120) for f in futures]
    assert exit_code == 128 + 15
    assert all(status == 200 for status, _ in results)
    assert all(body.rstrip().endswith(b"data: [DONE]") for _, body in results)
