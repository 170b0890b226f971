"""What a deployment tells its reporters, as frozen values: serving makes them, the reporters read them.

`Report` is one report interval's snapshot (`app.serving.readings.Readings` takes it off the deployment's parts);
`StartupSummary` is how long starting took (`app.serving.startup`); `BenchmarkResult` is one run of the benchmark
at ready (`app.serving.benchmark`). A reporter (`app.serving.lifecycle.Reporter`: the ClearML task's,
`app.clearml.reporting.TaskReporter`, or the console's) needs nothing else of serving, so this module imports none
of it: the values are plain, their types here or in the base modules, and a report is a copy, which a reporter reads
on its own thread while the deployment goes on counting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.keys import KeyUsage
from app.states import AdapterState, ModelState, Status
from app.statistics import WindowSummary


@dataclass(frozen=True)
class Wakes:
    """Models sharing GPUs: how often each woke, when it last did (wall clock), and how long waking took."""

    wakeups: dict[str, int]
    last_wake: dict[str, float]
    p50_ms: float | None
    p95_ms: float | None


@dataclass(frozen=True)
class AdapterLoads:
    """Adapters loaded on request: the loads so far of each model that loads them, how long a load took, and each
    adapter loaded or loading now (`<endpoint>:<reference>` -> its state)."""

    loads: dict[str, int]
    p50_ms: float | None
    p95_ms: float | None
    states: dict[str, AdapterState]


@dataclass(frozen=True)
class Report:
    """One report interval: the idle policy's decision, the requests so far and in the window, each model's state,
    each key's usage so far, and what the deployment has of token rates, wake-ups, replica servers and adapters on
    request (None: nothing of that kind here, or no reading yet)."""

    elapsed_s: float  # since the deployment began: the scalars' iteration
    status: Status  # the idle policy's: active or idle
    in_flight: int
    idle_for_s: float
    states: dict[str, ModelState]  # each model's, replica server's and node's (`app.serving.readings.model_states`)
    requests: dict[str, int]  # requests answered so far, by endpoint
    latency_sum_s: dict[str, float]  # their latencies summed, by endpoint
    window: WindowSummary  # the requests since the previous report
    generation_per_s: float | None = None  # tokens/s, as SGLang's own counters say
    prompt_per_s: float | None = None
    wakes: Wakes | None = None
    replica_requests: dict[str, float] | None = None  # each replica server's, as its router counts them
    adapters: AdapterLoads | None = None
    keys: dict[str, KeyUsage] = field(default_factory=dict)  # each key's usage since the start, by name

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


@dataclass(frozen=True)
class Span:
    """One phase and how long it took."""

    name: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.name} {self.seconds:.1f} s"


@dataclass(frozen=True)
class StartupSummary:
    """What the console prints at ready, and the task keeps (`startup`, `startup_seconds`, `startup_own_seconds`)."""

    total_s: float
    own_s: float
    app: list[Span]
    engines: dict[str, list[Span]]
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per model: what its plan chose (pool, parsers)

    def lines(self) -> list[str]:
        lines = [f"Ready in {self.total_s:.1f} s, of which the app's own {self.own_s:.1f} s:"]
        lines += [f"  {span}" for span in self.app]
        lines += [f"  {name}: " + ", ".join(str(s) for s in spans) for name, spans in self.engines.items()]
        lines += [f"  {name}: {note}" for name, notes in self.notes.items() for note in notes]
        return lines

    def text(self) -> str:
        """One line, for a task property."""
        parts = [str(s) for s in self.app] + [f"{name}: " + ", ".join(str(s) for s in spans)
                                               for name, spans in self.engines.items()]
        return "; ".join(parts + [f"ours {self.own_s:.1f} s"])


@dataclass(frozen=True)
class BenchmarkResult:
    """One run, as the benchmark measured it (None: it did not finish)."""

    endpoint: str
    concurrency: int
    completed: int = 0
    duration_s: float | None = None
    request_throughput: float | None = None  # requests/s
    output_throughput: float | None = None  # generated tokens/s
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    error: str = ""

    def line(self) -> str:
        if self.error:
            return f"Benchmark {self.endpoint} at concurrency {self.concurrency}: {self.error}"
        return (f"Benchmark {self.endpoint} at concurrency {self.concurrency}: {self.output_throughput:.1f} output "
                f"tokens/s, {self.request_throughput:.2f} requests/s; time to first token p50 {self.ttft_p50_ms:.0f} "
                f"ms, p99 {self.ttft_p99_ms:.0f} ms; inter-token latency p50 {self.itl_p50_ms:.1f} ms, p99 "
                f"{self.itl_p99_ms:.1f} ms ({self.completed} requests in {self.duration_s:.1f} s)")


BENCHMARK_HEADER = ["Model", "Concurrency", "Requests", "Duration (s)", "Requests/s", "Output tokens/s",
                    "TTFT p50 (ms)", "TTFT p99 (ms)", "ITL p50 (ms)", "ITL p99 (ms)", "Note"]


def table_rows(results: list[BenchmarkResult]) -> list[list[object]]:
    """The benchmark's table, header first: the task's `Benchmark` table and the console's."""

    def number(value: float | None, digits: int) -> object:
        return "" if value is None else round(value, digits)

    return [BENCHMARK_HEADER] + [[r.endpoint, r.concurrency, r.completed, number(r.duration_s, 1),
                                  number(r.request_throughput, 2), number(r.output_throughput, 1),
                                  number(r.ttft_p50_ms, 1), number(r.ttft_p99_ms, 1), number(r.itl_p50_ms, 2),
                                  number(r.itl_p99_ms, 2), r.error] for r in results]
