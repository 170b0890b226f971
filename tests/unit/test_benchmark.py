"""The benchmark at ready: its runs (SGLang's own benchmark, planned pure, the token never on a command line), their
results read from the benchmark's JSON line, and the table. The real benchmark runs in
tests/engine/test_benchmark_at_ready.py; its requests' quietness is in tests/integration/test_deployment.py."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from app.config import load_config
from app.serving.benchmark import BenchmarkResult, BenchmarkRun, plan_runs, read_result, run_all, table_rows, table_text

CONFIG = load_config(overrides=["models.0.model=org/a", "models.0.endpoint_name=a", "models.1.model=/models/b",
                                "models.1.endpoint_name=b", "benchmark.enable=true", "benchmark.concurrencies=8,1",
                                "benchmark.input_tokens=64", "benchmark.output_tokens=16", "benchmark.rounds=3"])


def test_each_model_is_benchmarked_at_each_concurrency_through_the_endpoint(tmp_path):
    runs = plan_runs(CONFIG, "http://127.0.0.1:8000", {"a": "org/a", "b": "/models/b"}, tmp_path, python="py")
    assert [(r.endpoint, r.concurrency) for r in runs] == [("a", 1), ("a", 8), ("b", 1), ("b", 8)]
    argv = runs[1].argv
    assert argv[:3] == ("py", "-m", "sglang.benchmark.serving")

    def option(name: str) -> str:
        return argv[argv.index(name) + 1]

    assert option("--base-url") == "http://127.0.0.1:8000/a" and option("--model") == "a"
    assert option("--backend") == "sglang-oai-chat" and option("--dataset-name") == "random-ids"
    assert (option("--random-input-len"), option("--random-output-len")) == ("64", "16")
    assert (option("--num-prompts"), option("--max-concurrency")) == ("24", "8")  # rounds x concurrency
    assert option("--tokenizer") == "org/a" and runs[2].argv[runs[2].argv.index("--tokenizer") + 1] == "/models/b"
    assert option("--output-file") == str(tmp_path / "a-c8.jsonl")
    assert not any("token" in a.lower() and "tokenizer" not in a for a in argv if a.startswith("--"))


def test_a_result_is_the_benchmarks_last_json_line_and_a_missing_one_says_so(tmp_path):
    run = BenchmarkRun("a", 8, (), str(tmp_path / "a-c8.jsonl"))
    assert read_result(run).error == "no result: the benchmark printed no error"
    said = "aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected (/usr/lib/x.py)"
    assert read_result(run, said).error == ("no result: aiohttp.client_exceptions.ServerDisconnectedError: Server "
                                            "disconnected (<path>)")
    line = {"completed": 24, "duration": 3.5, "request_throughput": 6.86, "output_throughput": 109.7,
            "median_ttft_ms": 31.7, "p99_ttft_ms": 55.9, "median_itl_ms": 11.8, "p99_itl_ms": 43.0}
    Path(run.output_file).write_text(json.dumps({"completed": 1}) + "\n" + json.dumps(line) + "\n")
    result = read_result(run)
    assert result == BenchmarkResult("a", 8, 24, 3.5, 6.86, 109.7, 31.7, 55.9, 11.8, 43.0)
    assert result.line() == ("Benchmark a at concurrency 8: 109.7 output tokens/s, 6.86 requests/s; time to first "
                             "token p50 32 ms, p99 56 ms; inter-token latency p50 11.8 ms, p99 43.0 ms (24 requests "
                             "in 3.5 s)")
    Path(run.output_file).write_text(json.dumps({**line, "completed": 0}) + "\n")
    assert read_result(run).error == "no request completed"


def test_the_table_has_a_row_per_run_and_says_why_one_has_no_figures():
    results = [BenchmarkResult("a", 1, 4, 2.0, 2.0, 30.0, 10.0, 20.0, 5.0, 9.0),
               BenchmarkResult("a", 8, error="stopped after its time limit (300 s)")]
    rows = table_rows(results)
    assert rows[1] == ["a", 1, 4, 2.0, 2.0, 30.0, 10.0, 20.0, 5.0, 9.0, ""]
    assert rows[2][:3] == ["a", 8, 0] and rows[2][3:10] == [""] * 7 and rows[2][10].startswith("stopped after")
    text = table_text(results).splitlines()
    assert text[0].startswith("Model  Concurrency  Requests") and len(text) == 3


# A benchmark that fails as SGLang's does when the engine dies under it, the first time; then succeeds.
FLAKY = """
import json, pathlib, sys
out, marker = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if not marker.exists():
    marker.touch()
    print("#" * (3 << 20))  # (a line longer than any the benchmark's output is read by: skipped, not fatal)
    print("Traceback (most recent call last):")
    print("aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected")
    sys.exit(1)
out.write_text(json.dumps({"completed": 4, "duration": 1.0, "request_throughput": 4.0, "output_throughput": 64.0,
                          "median_ttft_ms": 9.0, "p99_ttft_ms": 12.0, "median_itl_ms": 3.0, "p99_itl_ms": 5.0}))
"""


class Restarted:
    """The engines as the benchmark sees them: restarted once the first run has failed, serving again at once."""

    def __init__(self, marker: Path):
        self.marker = marker

    def restarts_of(self, endpoint: str) -> int:
        return int(self.marker.exists())

    async def serving_again(self, endpoint: str, deadline_s: float) -> bool:
        return True


def test_a_run_its_engine_restarted_under_runs_again_and_one_that_fails_says_why(tmp_path):
    marker, out = tmp_path / "crashed", tmp_path / "a-c1.jsonl"
    run = BenchmarkRun("a", 1, (sys.executable, "-c", FLAKY, str(out), str(marker), "--num-prompts", "4"), str(out))
    (again,) = asyncio.run(run_all([run], "token", deadline_s=30, watch=Restarted(marker)))
    assert again.completed == 4 and again.output_throughput == 64.0
    marker.unlink()
    out.unlink()
    (failed,) = asyncio.run(run_all([run], "token", deadline_s=30))  # (no engine restarted: not run again)
    assert failed.error == "no result: aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected"
