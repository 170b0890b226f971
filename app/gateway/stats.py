"""Per-request statistics of the gateway: cumulative counts, and windows of latencies for the dashboard.

`record` is called once per proxied request, when it ends (for a stream: after its last chunk). `take_window`
returns what happened since the previous call and starts a new window: each report takes one, every report interval
(`app.serving.readings`). Pure bookkeeping: no clock, no I/O; the statistics themselves are `app.statistics`'.
"""

from __future__ import annotations

import collections
import random
from typing import NamedTuple

from app.gateway.messages import Request
from app.gateway.routes import OPEN
from app.keys import KeyUsage
from app.states import ModelState
from app.statistics import WindowSummary, percentile

# Most requests a window keeps for its percentiles; beyond that the window samples (every request still counts).
MAX_WINDOW_SAMPLES = 100_000
# The latest requests of each endpoint the page's live percentiles are taken over.
RECENT_PER_ENDPOINT = 256


class RequestRecord(NamedTuple):
    """One proxied request as it ended (a tuple: built once per request, on the hot path, and sent as it is in a
    gateway worker's report)."""

    endpoint: str
    status: int
    latency_s: float  # from the request's arrival to the end of its response
    ttft_s: float | None = None  # streams: arrival to the first chunk
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    stream: bool = False
    key: str | None = None  # the name of the key it came with
    cut: bool = False  # its answer had begun well, and failed (an SSE error event, or a body cut short)
    sent_status: int = 200  # where it was cut: the status its head went out with


def answer_of(status: int, request: Request) -> tuple[int, bool, str | None, bool]:
    """What the counters read of a response: its status, whether the window counts it, the key of an inference
    request, whether its key's rate limits refused it."""
    key, route = request.key, request.route
    counted_key = key.name if key is not None and route is not None and route.kind == "relay" else None
    return status, request.path not in OPEN, counted_key, request.rate_limited


class KeyCounters:
    """One key's usage so far (`app.keys.KeyUsage`), as it is counted."""

    __slots__ = ("requests", "errors", "rate_limited", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.requests = self.errors = self.rate_limited = self.prompt_tokens = self.completion_tokens = 0

    def usage(self) -> KeyUsage:
        return KeyUsage(self.requests, self.errors, self.rate_limited, self.prompt_tokens, self.completion_tokens)


class RequestStats:
    def __init__(self) -> None:
        self.requests = collections.Counter[str]()
        self.responses = collections.Counter[tuple[str, int]]()
        self.prompt_tokens = collections.Counter[str]()
        self.completion_tokens = collections.Counter[str]()
        self.latency_sum_s = collections.Counter[str]()
        self.answered = collections.Counter[int]()  # every response the endpoint sent, by status
        self._window: list[RequestRecord] = []
        self._window_answers = collections.Counter[int]()
        self._recent: dict[str, collections.deque[RequestRecord]] = {}
        self._window_count = 0
        self._sampler = random.Random(0)
        self.keys: dict[str, KeyCounters] = {}  # by key name: every key's, from the start (zeros included)

    def add_keys(self, names: list[str]) -> None:
        """The keys whose usage is counted (each reported from the start, zeros included)."""
        for name in names:
            self.keys.setdefault(name, KeyCounters())

    def _key(self, name: str) -> KeyCounters:
        """A key's counters (a key not added yet: from zero)."""
        counters = self.keys.get(name)
        if counters is None:  # (not setdefault: that would build counters for every request)
            counters = self.keys[name] = KeyCounters()
        return counters

    def key_answered(self, name: str, status: int, rate_limited: bool = False) -> None:
        """A key's inference request was answered (its head went out): counted, and as an error or a refusal of its
        rate limits."""
        counters = self._key(name)
        counters.requests += 1
        if rate_limited:
            counters.rate_limited += 1
        elif status >= 400:
            counters.errors += 1

    def key_usage(self) -> dict[str, KeyUsage]:
        """Every key's usage so far, by name (a copy)."""
        return {name: counters.usage() for name, counters in self.keys.items()}

    def record(self, record: RequestRecord) -> None:
        self.requests[record.endpoint] += 1
        self.responses[(record.endpoint, record.status)] += 1
        self.latency_sum_s[record.endpoint] += record.latency_s
        if record.prompt_tokens:
            self.prompt_tokens[record.endpoint] += record.prompt_tokens
        if record.completion_tokens:
            self.completion_tokens[record.endpoint] += record.completion_tokens
        if record.key is not None:
            counters = self._key(record.key)
            counters.prompt_tokens += record.prompt_tokens or 0
            counters.completion_tokens += record.completion_tokens or 0
            counters.errors += record.cut
        if record.cut:  # an answer that went out as a success and failed: the endpoint's count says what it became
            self.answered[record.sent_status] -= 1
            self.answered[record.status] += 1
            self._window_answers[record.status] += 1  # (its head was counted in the window it went out in)
        self._window_count += 1
        recent = self._recent.get(record.endpoint)
        if recent is None:  # (not setdefault: that would build a deque for every request)
            recent = self._recent[record.endpoint] = collections.deque(maxlen=RECENT_PER_ENDPOINT)
        recent.append(record)
        if len(self._window) < MAX_WINDOW_SAMPLES:
            self._window.append(record)
        else:  # keep a uniform sample of the window (reservoir sampling)
            slot = self._sampler.randrange(self._window_count)
            if slot < MAX_WINDOW_SAMPLES:
                self._window[slot] = record

    def count_response(self, status: int, request: Request) -> None:
        """Every response the endpoint sends: its own (401, 404, 503, ...) and those relayed from engines."""
        self.count_answer(*answer_of(status, request))

    def count_answer(self, status: int, windowed: bool, key: str | None, rate_limited: bool) -> None:
        """A response (`answer_of`): the window's count leaves out the health and readiness checks (a 503 from
        `/readyz` is news, not an error); an inference request's answer counts for its key."""
        self.answered[status] += 1
        if windowed:
            self._window_answers[status] += 1
        if key is not None:
            self.key_answered(key, status, rate_limited)

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def live(self, endpoint: str) -> dict[str, float | int | None]:
        """An endpoint's counters as the page shows them: totals, and percentiles over its latest requests."""
        recent = self._recent.get(endpoint, ())
        latencies = [r.latency_s * 1000 for r in recent]
        return {"requests": self.requests[endpoint], "completion_tokens": self.completion_tokens[endpoint],
                "errors": sum(n for (e, status), n in self.responses.items() if e == endpoint and status >= 400),
                "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
                "ttft_p50_ms": percentile([r.ttft_s * 1000 for r in recent if r.ttft_s is not None], 50)}

    def take_window(self) -> WindowSummary:
        window, count, answers = self._window, self._window_count, self._window_answers
        self._window, self._window_count, self._window_answers = [], 0, collections.Counter()
        latencies = [r.latency_s * 1000 for r in window]
        ttfts = [r.ttft_s * 1000 for r in window if r.ttft_s is not None]
        return WindowSummary(
            requests=count,
            errors=sum(1 for r in window if r.status >= 500),
            latency_mean_ms=sum(latencies) / len(latencies) if latencies else None,
            latency_p50_ms=percentile(latencies, 50),
            latency_p95_ms=percentile(latencies, 95),
            ttft_p50_ms=percentile(ttfts, 50),
            prompt_tokens=sum(r.prompt_tokens or 0 for r in window),
            completion_tokens=sum(r.completion_tokens or 0 for r in window),
            answers=dict(answers),
        )

    def prometheus(self, in_flight: int, states: dict[str, ModelState], *, keys: set[str] | None = None,
                   endpoints: set[str] | None = None) -> str:
        """The gateway's own metrics in Prometheus text format: of the `endpoints` and `keys` given (None: all)."""
        def shown(endpoint: str) -> bool:
            return endpoints is None or endpoint in endpoints

        lines = [
            "# HELP clearml_sglang_responses_total Every response the endpoint sent, its own and relayed, by status.",
            "# TYPE clearml_sglang_responses_total counter",
        ]
        if endpoints is None:
            lines += [f'clearml_sglang_responses_total{{status="{s}"}} {n}' for s, n in sorted(self.answered.items())]
        lines += [
            "# HELP clearml_sglang_requests_total Requests proxied to an engine, by endpoint and status.",
            "# TYPE clearml_sglang_requests_total counter",
        ]
        lines += [f'clearml_sglang_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.responses.items()) if shown(e)]
        lines += ["# HELP clearml_sglang_request_duration_seconds_sum Time spent serving requests, by endpoint.",
                  "# TYPE clearml_sglang_request_duration_seconds_sum counter"]
        lines += [f'clearml_sglang_request_duration_seconds_sum{{endpoint="{e}"}} {v:.6f}'
                  for e, v in sorted(self.latency_sum_s.items()) if shown(e)]
        for name, counter in (("prompt", self.prompt_tokens), ("completion", self.completion_tokens)):
            lines += [f"# HELP clearml_sglang_{name}_tokens_total {name.title()} tokens reported in usage.",
                      f"# TYPE clearml_sglang_{name}_tokens_total counter"]
            lines += [f'clearml_sglang_{name}_tokens_total{{endpoint="{e}"}} {n}'
                      for e, n in sorted(counter.items()) if shown(e)]
        lines += self._key_lines(keys)
        if endpoints is None:  # (the whole endpoint's)
            lines += ["# HELP clearml_sglang_requests_in_flight Requests being served now.",
                      "# TYPE clearml_sglang_requests_in_flight gauge",
                      f"clearml_sglang_requests_in_flight {in_flight}"]
        lines += ["# HELP clearml_sglang_model_state 1 for each model's current state.",
                  "# TYPE clearml_sglang_model_state gauge"]
        lines += [f'clearml_sglang_model_state{{endpoint="{e}",state="{s}"}} 1' for e, s in sorted(states.items())]
        return "\n".join(lines) + "\n"

    def _key_lines(self, keys: set[str] | None) -> list[str]:
        """Each key's usage, labelled by its name (never its token)."""
        lines = []
        for metric, what, field in KEY_METRICS:
            lines += [f"# HELP clearml_sglang_key_{metric}_total {what}, by key.",
                      f"# TYPE clearml_sglang_key_{metric}_total counter"]
            lines += [f'clearml_sglang_key_{metric}_total{{key="{name}"}} {getattr(counters, field)}'
                      for name, counters in sorted(self.keys.items()) if keys is None or name in keys]
        return lines


# The per-key metrics: (metric name, help, KeyCounters field).
KEY_METRICS = (("requests", "Inference requests answered", "requests"),
               ("errors", "Inference requests answered with an error (its rate limits apart)", "errors"),
               ("rate_limited_requests", "Inference requests refused by the key's rate limits", "rate_limited"),
               ("prompt_tokens", "Prompt tokens reported in usage", "prompt_tokens"),
               ("completion_tokens", "Completion tokens reported in usage", "completion_tokens"))
