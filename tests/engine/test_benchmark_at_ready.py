"""The benchmark at ready, with the real SGLang on this CPU: `clearml-sglang bench` deploys the tiny model, runs
SGLang's own `sglang.benchmark.serving` through the endpoint at two concurrencies, reports it, and stops; what it
reported is read back from ClearML's offline session. Its traffic counts in no request counter and never makes the
deployment active."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sglang")

from app.demo.tiny_model import make_tiny_models  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.integration.test_clearml_offline import (  # noqa: E402
    console,
    events,
    free_port,
    no_process_left,
    scalars,
    session,
)

pytestmark = pytest.mark.engine

TOKEN = "bench-tier-token-" + "q" * 16


@pytest.fixture(scope="module")
def benched(tmp_path_factory):
    root = Path(tmp_path_factory.mktemp("bench"))
    models = make_tiny_models(root / "tiny")
    cache = root / "clearml"
    argv = [sys.executable, "-m", "app", "bench", "--offline", "--port", str(free_port())]
    for setting in (f"models.0.model={models.base}", "models.0.endpoint_name=tiny", "models.0.max-total-tokens=65536",
                    "general.device=cpu", "idle.report_interval_seconds=1", "benchmark.concurrencies=1,2",
                    "benchmark.input_tokens=16", "benchmark.output_tokens=4", "benchmark.rounds=2",
                    "benchmark.max_seconds=240"):
        argv += ["--set", setting]
    env = {**os.environ, "CLEARML_CACHE_DIR": str(cache), "CLEARML_OFFLINE_MODE": "1", "HOME": str(root / "home"),
           "CLEARML_SGLANG_API_TOKENS": TOKEN}
    env.pop("CLEARML_TASK_ID", None)
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    yield done, session(cache)
    no_process_left()


def test_bench_stops_by_itself_with_exit_0_once_reported(benched):
    done, folder = benched
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Benchmark at ready (SGLang's sglang.benchmark.serving through the endpoint):" in console(folder)


def test_its_scalars_are_read_back_from_the_offline_session_against_concurrency(benched):
    _, folder = benched
    recorded = scalars(folder)
    throughput = dict(recorded[("Benchmark Output Throughput (tokens/s)", "tiny")])
    assert set(throughput) == {1, 2} and all(v > 0 for v in throughput.values())
    assert set(dict(recorded[("Benchmark Request Throughput (requests/s)", "tiny")])) == {1, 2}
    for title in ("Benchmark Time to First Token (ms)", "Benchmark Inter-Token Latency (ms)"):
        p50, p99 = dict(recorded[(title, "tiny p50")]), dict(recorded[(title, "tiny p99")])
        assert set(p50) == {1, 2} and all(0 < p50[c] <= p99[c] for c in (1, 2)), title
    (table,) = [json.loads(e["plot_str"]) for e in events(folder, "metrics.jsonl")
                if e["type"] == "plot" and e.get("metric") == "Benchmark"]
    columns = table["data"][0]["cells"]["values"]
    assert columns[0] == ["tiny", "tiny"] and columns[1] == [1, 2] and columns[2] == [2, 4]  # requests: 2 rounds


def test_its_requests_are_counted_nowhere_and_never_make_the_deployment_active(benched):
    _, folder = benched
    recorded = scalars(folder)
    assert recorded[("Total Number of Requests", "total")] and all(
        value == 0 for _, value in recorded[("Total Number of Requests", "total")])
    assert "Status: active" not in console(folder)
    idle = [value for _, value in recorded[("Idle Time (hours)", "idle")]]
    assert idle == sorted(idle) and idle[-1] > 0  # the idle clock ran on through the benchmark
