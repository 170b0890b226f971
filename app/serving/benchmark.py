"""The deployment benchmarked at ready (`benchmark.enable`): SGLang's own serving benchmark, through the endpoint.

Once every model is ready, `sglang.benchmark.serving` (SGLang's `bench_serving`; no load generator of ours) runs
against each model through the gateway, once per concurrency in `benchmark.concurrencies`: random prompts of
`input_tokens`, `output_tokens` generated each, `rounds` x concurrency requests, at most `max_seconds` per run.
Its requests carry the gateway's own token (`app.gateway.gateway.Gateway.quiet_token`), so the gateway counts them
nowhere and the idle clock runs on. Each run's result (the benchmark's own JSON line) becomes a `BenchmarkResult`
(`app.serving.report`): throughput, time to first token and inter-token latency (p50, p99), which the task reports
as scalars (x = concurrency) and a table, so clones that differ only in SGLang options compare side by side.

`plan_runs` is pure; `run_all` carries the runs out, one at a time.

Example::

    runs = plan_runs(config, "http://127.0.0.1:8000", {"qwen": "/models/qwen"}, out_dir)
    results = await run_all(runs, quiet_token, deadline_s=config.benchmark.max_seconds)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.config.types import DeploymentConfig
from app.gateway.errors import clean_message
from app.serving.report import BenchmarkResult, table_rows
from app.sglang.command import EngineCommand
from app.sglang.launch import engine_environment

logger = logging.getLogger(__name__)

# The benchmark's own module in SGLang 0.5.23 (`sglang.bench_serving` is its deprecated alias).
BENCH_MODULE = "sglang.benchmark.serving"
# Its backend for OpenAI chat completions: the route every model serves, the way users call it.
BENCH_BACKEND = "sglang-oai-chat"
# Past its time limit a run is stopped; it then has this long to go before it is killed.
STOP_GRACE_SECONDS = 5.0
# A line of the benchmark's output that says what went wrong (an exception's, or its own error words).
_ERROR_LINE = re.compile(r"\b\w*(?:Error|Exception)\b|\berror\b|\bfailed\b|Traceback", re.IGNORECASE)
# Longest reason kept in a result's row; longest line of the benchmark's output read whole.
MAX_REASON_CHARS = 200
MAX_LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class BenchmarkRun:
    endpoint: str
    concurrency: int
    argv: tuple[str, ...]
    output_file: str


def table_text(results: list[BenchmarkResult]) -> str:
    """The results as an aligned text table, for the console."""
    rows = [[str(cell) for cell in row] for row in table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def plan_runs(config: DeploymentConfig, base_url: str, tokenizers: Mapping[str, str], out_dir: Path,
              python: str = sys.executable) -> list[BenchmarkRun]:
    """Every run: each model (its tokenizer: the model's own path or name), each concurrency, in order."""
    bench = config.benchmark
    runs = []
    for model in config.models:
        for concurrency in bench.concurrencies:
            output = str(out_dir / f"{model.endpoint}-c{concurrency}.jsonl")
            argv = (python, "-m", BENCH_MODULE, "--backend", BENCH_BACKEND,
                    "--base-url", f"{base_url}/{model.endpoint}", "--model", model.endpoint,
                    "--tokenizer", tokenizers[model.endpoint], "--dataset-name", "random-ids",
                    "--random-input-len", str(bench.input_tokens), "--random-output-len", str(bench.output_tokens),
                    "--random-range-ratio", "1.0", "--num-prompts", str(concurrency * bench.rounds),
                    "--max-concurrency", str(concurrency), "--ready-check-timeout-sec", "0",
                    "--warmup-requests", "1", "--seed", "1", "--disable-tqdm", "--output-file", output)
            runs.append(BenchmarkRun(model.endpoint, concurrency, argv, output))
    return runs


def read_result(run: BenchmarkRun, last_error: str = "") -> BenchmarkResult:
    """The benchmark's JSON line for a run (the last line of its output file), or why there is none (`last_error`:
    the benchmark's own last error line, as its console said it)."""
    try:
        lines = Path(run.output_file).read_text().splitlines()
        data = json.loads(lines[-1])
    except (OSError, IndexError, ValueError):
        why = clean_message(last_error)[:MAX_REASON_CHARS] or "the benchmark printed no error"
        return BenchmarkResult(run.endpoint, run.concurrency, error=f"no result: {why}")
    if not data.get("completed"):
        return BenchmarkResult(run.endpoint, run.concurrency, error="no request completed")

    def value(key: str) -> float | None:
        number = data.get(key)
        return float(number) if isinstance(number, (int, float)) else None

    return BenchmarkResult(run.endpoint, run.concurrency, int(data["completed"]), value("duration"),
                           value("request_throughput"), value("output_throughput"), value("median_ttft_ms"),
                           value("p99_ttft_ms"), value("median_itl_ms"), value("p99_itl_ms"))


class EngineWatch(Protocol):
    """What the benchmark needs to know of the engines (the deployment's supervisor has it): how often a model's
    engines have restarted, and when they serve again."""

    def restarts_of(self, endpoint: str) -> int: ...

    async def serving_again(self, endpoint: str, deadline_s: float) -> bool: ...


async def benchmark_deployment(config: DeploymentConfig, commands: Sequence[EngineCommand], base_url: str,
                               token: str, watch: EngineWatch | None = None) -> list[BenchmarkResult]:
    """Every model's runs, through the endpoint at `base_url`, each model's tokenizer its own files (or name)."""
    tokenizers = {c.endpoint: c.model_path or c.endpoint for c in commands}
    with tempfile.TemporaryDirectory(prefix="clearml-sglang-benchmark-") as out:
        runs = plan_runs(config, base_url, tokenizers, Path(out))
        results = await run_all(runs, token, deadline_s=config.benchmark.max_seconds, watch=watch)
    logger.info("Benchmark at ready (SGLang's %s through the endpoint):\n%s", BENCH_MODULE, table_text(results))
    return results


async def run_all(runs: list[BenchmarkRun], token: str, *, deadline_s: float,
                  environ: Mapping[str, str] | None = None, watch: EngineWatch | None = None) -> list[BenchmarkResult]:
    """Each run in turn; the token reaches the benchmark in its environment (`OPENAI_API_KEY`, which it sends as a
    Bearer token), never on its command line, and no secret of the app's does (`engine_environment`). A run its
    model's engine restarted under is run again, once, when the engine is back."""
    env = engine_environment(environ if environ is not None else os.environ, {"OPENAI_API_KEY": token})
    results = []
    for run in runs:
        logger.info("Benchmark: %s at concurrency %d (%s requests)", run.endpoint, run.concurrency,
                    run.argv[run.argv.index("--num-prompts") + 1])
        restarts = watch.restarts_of(run.endpoint) if watch is not None else 0
        result = await _measure(run, env, deadline_s)
        if watch is not None and watch.restarts_of(run.endpoint) != restarts:
            logger.info("Benchmark: %s restarted during the run at concurrency %d; it runs again once the engine "
                        "is back", run.endpoint, run.concurrency)
            if await watch.serving_again(run.endpoint, deadline_s):
                Path(run.output_file).unlink(missing_ok=True)
                result = await _measure(run, env, deadline_s)
        logger.info("%s", result.line())
        results.append(result)
    return results


async def _measure(run: BenchmarkRun, env: dict[str, str], deadline_s: float) -> BenchmarkResult:
    finished, last_error = await _run_one(run, env, deadline_s)
    if not finished:
        return BenchmarkResult(run.endpoint, run.concurrency, error=f"stopped after its time limit ({deadline_s:g} s)")
    return read_result(run, last_error)


async def _run_one(run: BenchmarkRun, env: dict[str, str], deadline_s: float) -> tuple[bool, str]:
    """Run the benchmark, its output to this process's log at debug level: whether it ended before its deadline,
    and its last error line."""
    process = await asyncio.create_subprocess_exec(*run.argv, env=env, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                                                   limit=MAX_LINE_BYTES)
    assert process.stdout is not None
    last_error = ""

    async def relay() -> None:
        nonlocal last_error
        while True:
            try:
                raw = await process.stdout.readline()  # type: ignore[union-attr]
            except ValueError:  # a line longer than the limit (a progress bar redrawn in place): the rest goes on
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            logger.debug("[benchmark] %s", line)
            if _ERROR_LINE.search(line):
                last_error = line[-MAX_REASON_CHARS * 2:]

    relaying = asyncio.create_task(relay())
    try:
        await asyncio.wait_for(process.wait(), deadline_s)
        await asyncio.wait({relaying}, timeout=STOP_GRACE_SECONDS)  # (its last lines read)
        return True, last_error
    except asyncio.TimeoutError:
        return False, last_error
    finally:  # (also when the deployment stops meanwhile: the benchmark goes with it)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        relaying.cancel()
