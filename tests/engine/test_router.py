"""Replicas in the CPU mode: two real SGLang servers behind the real sglang-router behind our gateway.

One deployment for the module (the tiny model, `replicas: 2`, round robin): requests are spread over both workers
(the router's own metrics say so); a worker killed under load loses no request that had not started on it, and
is replaced (removed from the router when it dies, added back once its restart is ready); the gateway's auth
holds in front of the router; and the idle limit shuts everything down, leaving no process behind.
Skipped where sglang or sglang-router is not installed; CI runs it on the engine install.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
pytest.importorskip("sglang_router")

import psutil  # noqa: E402
import requests  # noqa: E402

from app.config import load_config  # noqa: E402
from app.demo.tiny_model import make_tiny_models  # noqa: E402
from app.serving.deployment import Deployment, RunOptions  # noqa: E402
from app.sglang.router import requests_per_worker  # noqa: E402
from tests.engine.test_real_engine import AUTH, STARTUP_DEADLINE_S, TOKEN, Served  # noqa: E402
from tests.fakes.registry import NoRegistry  # noqa: E402

pytestmark = pytest.mark.engine

IDLE_LIMIT_S = 25


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = make_tiny_models(Path(tmp_path_factory.mktemp("tiny")))
    config = load_config(overrides=[
        f"models.0.model={models.base}", "models.0.endpoint_name=tiny", "models.0.max-total-tokens=8192",
        "models.0.replicas=2", "general.load-balance-method=round_robin", "general.device=cpu",
        f"auth.tokens={TOKEN}", "idle.report_interval_seconds=2", f"idle.time_limit_hours={IDLE_LIMIT_S / 3600}",
    ])
    options = RunOptions(host="127.0.0.1", port=0, public_host="127.0.0.1", startup_deadline_s=STARTUP_DEADLINE_S,
                         drain_deadline_s=60)
    server = Served(Deployment(config, NoRegistry(), options=options))
    server.start()
    yield server
    server.stop()
    assert not psutil.Process().children(recursive=True)


def complete(served: Served, max_tokens: int = 4, timeout: float = 120) -> requests.Response:
    return requests.post(served.base + "/v1/completions", headers=AUTH, timeout=timeout,
                         json={"model": "tiny", "prompt": "import os", "max_tokens": max_tokens, "temperature": 0})


def router_selections(served: Served) -> dict[str, float]:
    metrics_url = served.deployment.routed["tiny"].metrics_url
    return requests_per_worker(requests.get(metrics_url + "/metrics", timeout=10).text)


def workers(served: Served):
    return served.deployment.routed["tiny"].servers


def test_requests_are_spread_over_both_workers(served):
    before = router_selections(served)
    answers = [complete(served) for _ in range(10)]
    assert all(a.status_code == 200 and a.json()["choices"][0]["text"] for a in answers)
    after = router_selections(served)
    spread = {w: after.get(w, 0) - before.get(w, 0) for w in after}
    assert sorted(spread) == sorted(w.url for w in workers(served))
    assert all(count >= 3 for count in spread.values()), spread  # round robin: about 5 each
    assert served.deployment.states() == {"tiny": "resident", "tiny/0": "resident", "tiny/1": "resident"}


def test_the_gateway_still_guards_the_router(served):
    response = requests.post(served.base + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                             headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=30)
    assert response.status_code == 401
    assert requests.post(served.base + "/tiny/workers", json={"url": "http://evil:1"}, headers=AUTH,
                         timeout=30).status_code == 404  # the router's control API is not exposed


def test_a_killed_worker_loses_no_request_that_had_not_started_on_it_and_is_replaced(served):
    results: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = complete(served, max_tokens=8, timeout=60).status_code
            except requests.RequestException:
                status = 0
            results.append((sent, time.monotonic(), status))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for thread in clients:
        thread.start()
    victim = workers(served)[0]
    deadline = time.monotonic() + 30
    while len(results) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline and not _serving_again(served, victim):
            time.sleep(0.5)
        assert _serving_again(served, victim), "the killed worker was not replaced"
    finally:
        stop.set()
        for thread in clients:
            thread.join(120)
    after_kill = [r for r in results if r[0] > killed_at]
    assert len(after_kill) >= 10
    assert all(status == 200 for _, _, status in after_kill), [s for _, _, s in after_kill if s != 200]
    failed = [r for r in results if r[2] != 200]
    assert all(sent <= killed_at <= answered for sent, answered, _ in failed)  # only those under way on it
    assert len(failed) <= 3


def _serving_again(served: Served, victim) -> bool:
    if victim.restarts < 1 or victim.state != "resident":
        return False
    before = router_selections(served).get(victim.url, 0)
    for _ in range(4):
        complete(served)
    return router_selections(served).get(victim.url, 0) > before


def test_idle_shutdown_stops_router_and_workers(served):
    processes = [psutil.Process(e.pid) for e in [*workers(served), served.deployment.routed["tiny"].router]]
    served.thread.join(IDLE_LIMIT_S + 60)
    assert served.exit_code == 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes)
