"""What the deployment tells its ClearML task, under the names the dashboard reads (docs/clearml-task.md,
"ClearML: what the task records").

`TaskReporter` turns the deployment's events into task properties (status, status_reason, idle_since, endpoint,
models, curl, and a generated access token), scalars (iteration = seconds since start), the `Deployed Models` and
`Key Usage` tables, and Model Endpoints telemetry; it also logs status changes to the console. It talks to the task
only through `app.clearml.task.DeploymentTask`'s methods, so tests give it a recording stand-in. What it reports
comes as the frozen values of `app.serving.report`, the one part of serving it reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from app.keys import KeyUsage
from app.serving.report import AdapterLoads, BenchmarkResult, Report, StartupSummary, Wakes, table_rows
from app.states import ModelState, Status

logger = logging.getLogger(__name__)

REQUESTS = "Total Number of Requests"
TOKENS = "Tokens per Second"
LATENCY = "Latency (ms)"
IN_FLIGHT = "Requests in Flight"
IDLE_TIME = "Idle Time (hours)"
REPLICA_REQUESTS = "Replica Requests"
WAKEUPS = "Model Wake-ups"
WAKE_LATENCY = "Wake Latency (ms)"
ADAPTER_LOADS = "Adapter Loads"
ADAPTER_LOAD_TIME = "Adapter Load Time (ms)"
# The benchmark at ready: x (the iteration) is the concurrency, one series per model (and percentile).
BENCH_OUTPUT = "Benchmark Output Throughput (tokens/s)"
BENCH_REQUESTS = "Benchmark Request Throughput (requests/s)"
BENCH_TTFT = "Benchmark Time to First Token (ms)"
BENCH_ITL = "Benchmark Inter-Token Latency (ms)"
BENCH_TABLE = "Benchmark"
TABLE = "Deployed Models"
TABLE_HEADER = ["Model", "Endpoint name", "URL", "Status", "Last wake-up"]
# Each key's usage since the start: a figure per kind of count, one series per key (its name), and a table.
USAGE_REQUESTS = "Usage: Requests"
USAGE_ERRORS = "Usage: Errors"
USAGE_RATE_LIMITED = "Usage: Rate-Limited Requests"
USAGE_PROMPT_TOKENS = "Usage: Prompt Tokens"
USAGE_COMPLETION_TOKENS = "Usage: Completion Tokens"
KEY_TABLE = "Key Usage"
KEY_TABLE_HEADER = ["Key", "Requests", "Errors", "Rate-limited", "Prompt tokens", "Completion tokens"]


class TaskReporter:
    def __init__(self, task: Any, *, models: dict[str, str], gateway_route: str = "",
                 wall_clock: Callable[[], float] = time.time):
        self.task = task
        self.models = models  # endpoint name -> what the user asked for (HF name, Model ID, path)
        self.gateway_route = gateway_route
        self.wall_clock = wall_clock
        self._urls: dict[str, str] = {}
        self._states: dict[str, ModelState] = {}
        self._telemetry: dict[str, Any] = {}
        self._fed: dict[str, tuple[int, float]] = {}
        self._idle_since = ""
        self._last_wake: dict[str, float] = {}
        self._adapters: dict[str, str] = {}  # adapters loaded on request -> their state
        self._keys: dict[str, KeyUsage] = {}  # each key's usage, as the Key Usage table last showed it

    # ----- Reporter -----

    def status(self, state: Status, reason: str = "") -> None:
        logger.info("Status: %s%s", state, f" ({reason})" if reason else "")
        self.task.set_properties(status=state, status_reason=reason)

    def preflight(self, findings: list[str]) -> None:
        """Pre-flight's problems and warnings (`preflight`: "ok" when it found none)."""
        self.task.set_properties(preflight="; ".join(findings) or "ok")

    def access_token(self, token: str) -> None:
        # the one place a token may be shown: the task's properties, which only the project's members read
        self.task.set_properties(access_token=token)
        logger.info("No access token was configured: one was generated; it is in this task's properties "
                    "(access_token). Set CLEARML_SGLANG_API_TOKENS or auth.tokens to choose your own.")

    def base_url(self, port: int, local_url: str) -> str:
        """The endpoint's public URL: the App Gateway's where the server has it, else this machine's address."""
        if self.task.can_request_external_endpoint():
            url = self.task.request_external_endpoint(port, self.gateway_route or None)
            if url:
                logger.info("AI Application Gateway endpoint: %s", url)
                return url.rstrip("/")
            logger.warning("The App Gateway assigned no endpoint in time; publishing this machine's address")
        else:
            host_port = self.task.host_port(port)
            if host_port != port:  # the agent published the container's port on another host port
                local_url = local_url.rsplit(":", 1)[0] + f":{host_port}"
            logger.info("No AI Application Gateway here (it needs a ClearML Enterprise server): the endpoint is "
                        "this machine's address, %s", local_url)
        return local_url

    def endpoints(self, base_url: str, models: dict[str, str], curl: str) -> None:
        self._urls = dict(models)
        logger.info("Endpoint: %s", base_url)
        for name, url in models.items():
            logger.info("  model %s: %s", name, url)
        logger.info("Try it:\n%s", curl)
        self.task.set_properties(endpoint=base_url, models=json.dumps(models), curl=curl)
        if self.task.has_serving_api():
            for name, url in models.items():
                self._telemetry[name] = self.task.start_endpoint_stats(name, self.models.get(name, name), url)

    def startup(self, summary: StartupSummary) -> None:
        self.task.set_properties(startup=summary.text(), startup_seconds=f"{summary.total_s:.1f}",
                                 startup_own_seconds=f"{summary.own_s:.1f}")

    def benchmark(self, results: list[BenchmarkResult]) -> None:
        """The benchmark at ready: scalars against concurrency (what ClearML's comparison lines up across clones)
        and the whole table (the deployment prints it on the console)."""
        for r in results:
            for title, series, value in ((BENCH_OUTPUT, r.endpoint, r.output_throughput),
                                         (BENCH_REQUESTS, r.endpoint, r.request_throughput),
                                         (BENCH_TTFT, f"{r.endpoint} p50", r.ttft_p50_ms),
                                         (BENCH_TTFT, f"{r.endpoint} p99", r.ttft_p99_ms),
                                         (BENCH_ITL, f"{r.endpoint} p50", r.itl_p50_ms),
                                         (BENCH_ITL, f"{r.endpoint} p99", r.itl_p99_ms)):
                if value is not None:
                    self.task.report_scalar(title, series, value, r.concurrency)
        self.task.report_table(BENCH_TABLE, "runs", table_rows(results), iteration=0)

    def states(self, states: dict[str, ModelState]) -> None:
        """Each model's state; the table is written again only when one changed."""
        if states != self._states:
            self._states = dict(states)
            self._write_table()

    def _write_table(self) -> None:
        rows = [TABLE_HEADER] + [[self.models.get(name.split("/")[0], name), name, self._urls.get(name, ""), state,
                                  self._wall_iso(self._last_wake[name]) if name in self._last_wake else ""]
                                 for name, state in self._states.items()]
        rows += [[name.split(":", 1)[1], name, self._urls.get(name.split(":", 1)[0], ""), state, ""]
                 for name, state in self._adapters.items()]  # (an adapter's model is the reference it was asked by)
        self.task.report_table(TABLE, "models", rows, iteration=0)

    def report(self, report: Report) -> None:
        iteration = int(report.elapsed_s)
        scalar = self.task.report_scalar
        for name in sorted(report.states):
            if "/" not in name:  # replica servers are counted below, by their router
                scalar(REQUESTS, name, float(report.requests.get(name, 0)), iteration)
        replicas = report.replica_requests or {}
        for name in sorted(replicas):
            scalar(REPLICA_REQUESTS, name, float(replicas[name]), iteration)
        scalar(REQUESTS, "total", float(report.total_requests), iteration)
        for series, rate in (("generation", report.generation_per_s), ("prompt", report.prompt_per_s)):
            if rate is not None:
                scalar(TOKENS, series, rate, iteration)
        window = report.window
        for series, value in (("mean", window.latency_mean_ms), ("p50", window.latency_p50_ms),
                              ("p95", window.latency_p95_ms), ("time to first token p50", window.ttft_p50_ms)):
            if value is not None:  # no request in the window: no point, rather than a false 0
                scalar(LATENCY, series, value, iteration)
        scalar(IN_FLIGHT, "total", float(report.in_flight), iteration)
        scalar(IDLE_TIME, "idle", report.idle_for_s / 3600, iteration)
        idle_since = "" if report.in_flight or report.status == Status.ACTIVE else self._iso(report.idle_for_s)
        if idle_since != self._idle_since:
            self._idle_since = idle_since
            self.task.set_properties(idle_since=idle_since)
        rewrite = report.states == self._states  # (else the table is written below, with the new states)
        if report.wakes is not None:  # models sharing GPUs: how often they woke, and how long waking took
            self._report_wakes(report.wakes, iteration, rewrite)
        if report.adapters is not None:
            self._report_adapters(report.adapters, iteration, rewrite)
        self.states(report.states)
        if report.keys:
            self._report_keys(report.keys, iteration)
        self._feed_telemetry(report)

    def _report_keys(self, keys: dict[str, KeyUsage], iteration: int) -> None:
        """Each key's usage since the start: a series per key in each `Usage: *` figure, and the table when it
        changed."""
        for name in sorted(keys):
            usage = keys[name]
            for title, value in ((USAGE_REQUESTS, usage.requests), (USAGE_ERRORS, usage.errors),
                                 (USAGE_RATE_LIMITED, usage.rate_limited), (USAGE_PROMPT_TOKENS, usage.prompt_tokens),
                                 (USAGE_COMPLETION_TOKENS, usage.completion_tokens)):
                self.task.report_scalar(title, name, float(value), iteration)
        if keys != self._keys:
            self._keys = dict(keys)
            self.task.report_table(KEY_TABLE, "keys", key_rows(keys), iteration=0)

    def _report_wakes(self, wakes: Wakes, iteration: int, rewrite: bool) -> None:
        """Models sharing GPUs: wake-ups per model, wake latency, and each model's last wake-up in the table."""
        self._report_counts(WAKEUPS, wakes.wakeups, WAKE_LATENCY, (wakes.p50_ms, wakes.p95_ms), iteration)
        if wakes.last_wake != self._last_wake:
            self._last_wake = dict(wakes.last_wake)
            if rewrite:
                self._write_table()

    def _report_adapters(self, adapters: AdapterLoads, iteration: int, rewrite: bool) -> None:
        """Adapters loaded on request: loads per model, load time, and their rows in the table."""
        self._report_counts(ADAPTER_LOADS, adapters.loads, ADAPTER_LOAD_TIME, (adapters.p50_ms, adapters.p95_ms),
                            iteration)
        if adapters.states != self._adapters:
            self._adapters = dict(adapters.states)
            if rewrite:
                self._write_table()

    def _report_counts(self, title: str, counts: dict[str, int], latency_title: str,
                       latency_ms: tuple[float | None, float | None], iteration: int) -> None:
        """A count per model (a series each) and the latency's p50 and p95 where there is one."""
        for name in sorted(counts):
            self.task.report_scalar(title, name, float(counts[name]), iteration)
        for series, value in zip(("p50", "p95"), latency_ms, strict=True):
            if value is not None:
                self.task.report_scalar(latency_title, series, value, iteration)

    def close(self) -> None:
        for telemetry in self._telemetry.values():
            telemetry.stop()

    # ----- helpers -----

    def _iso(self, idle_for_s: float) -> str:
        return self._wall_iso(self.wall_clock() - idle_for_s)

    @staticmethod
    def _wall_iso(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="seconds")

    def _feed_telemetry(self, report: Report) -> None:
        for name, telemetry in self._telemetry.items():
            count, latency_s = report.requests.get(name, 0), report.latency_sum_s.get(name, 0.0)
            fed_count, fed_latency = self._fed.get(name, (0, 0.0))
            if count > fed_count:
                telemetry.feed(count - fed_count, (latency_s - fed_latency) * 1000)
            self._fed[name] = (count, latency_s)


def key_rows(keys: dict[str, KeyUsage]) -> list[list[object]]:
    """The `Key Usage` table, header first: a row per key, by name."""
    return [KEY_TABLE_HEADER] + [[name, u.requests, u.errors, u.rate_limited, u.prompt_tokens, u.completion_tokens]
                                 for name, u in sorted(keys.items())]
