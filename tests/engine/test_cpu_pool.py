"""The CPU pool sized from the model, with the real SGLang on this CPU: two deployments of the tiny model side by side,
each benchmarked at concurrency 8 (`clearml-sglang bench`, bench/cpu_pool.py's run), and neither engine's processes
hold more than the startup summary said they would (+20%). With SGLang's own sizing one such deployment held 21.7 GiB
(bench/results/cpu_pool.json)."""

from __future__ import annotations

import importlib.util
import threading

import pytest

pytest.importorskip("sglang")

from app.demo.tiny_model import make_tiny_models  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from tests.integration.test_clearml_offline import no_process_left  # noqa: E402

pytestmark = pytest.mark.engine

spec = importlib.util.spec_from_file_location("cpu_pool_bench", ROOT / "bench" / "cpu_pool.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    base = tmp_path_factory.mktemp("pool")
    model = make_tiny_models(base / "tiny").base
    results = [{}, {}]
    threads = [threading.Thread(target=bench.run_one, args=(i, base, model, 8, 2, ["benchmark.input_tokens=256",
                                                                                "benchmark.output_tokens=32"],
                                                           results[i])) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    yield results
    no_process_left()


def test_neither_engine_holds_more_than_its_summary_said(side_by_side):
    for result in side_by_side:
        assert result["exit"] == 0 and not result["oom"], result
        assert "KV pool 16,384 tokens (8 contexts of 2,048 tokens)" in result["pool"]
        assert result["benchmark"] and "at concurrency 8:" in result["benchmark"][0]  # (it ran, not "no result")
        assert 0 < result["peak_rss_gib"] <= result["expected_gib"] * 1.2, result
