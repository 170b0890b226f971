"""Statistics over what was measured, in one place the gateway and serving both import: the percentile every figure
on the dashboard is (request latencies, time to first token, wake-ups, adapter loads), and a window of requests
summed up (`WindowSummary`, what the gateway's `app.gateway.stats.RequestStats.take_window` returns and a report
carries), and each key's usage in a window (`usage_since`, between two of the gateway's cumulative snapshots). Pure:
values in, values out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import astuple, dataclass, field

from app.keys import KeyUsage


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of unsorted values, one of the values itself; None when empty. Every
    percentile the dashboard shows (latencies, time to first token, wake-ups) is this one."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class WindowSummary:
    """The requests of one report interval: how many, their errors, latencies and tokens."""

    requests: int
    errors: int
    latency_mean_ms: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    ttft_p50_ms: float | None
    prompt_tokens: int
    completion_tokens: int
    answers: dict[int, int] = field(default_factory=dict)  # every response sent in the window, by status

    def console_line(self, generated_per_s: float | None = None,
                     keys: dict[str, KeyUsage] | None = None) -> str | None:
        """The window in one console line (None when nothing was answered): what replaces a line per request.
        `keys`: each key's usage in the window (`usage_since`); those with requests get a part, by name."""
        errors = {status: n for status, n in sorted(self.answers.items()) if status >= 400}
        by_key = key_part(keys or {})
        if not self.requests and not errors and not by_key:
            return None  # (health checks and metric scrapes alone say nothing worth a line)
        parts = [f"{self.requests} request(s) served",
                 "errors: " + ", ".join(f"{n} × {status}" for status, n in errors.items()) if errors else ""]
        if generated_per_s is not None:
            parts.append(f"{generated_per_s:.1f} tokens/s generated")
        if self.latency_p50_ms is not None and self.latency_p95_ms is not None:
            parts.append(f"latency p50 {self.latency_p50_ms:.0f} ms, p95 {self.latency_p95_ms:.0f} ms")
        return "Traffic: " + "; ".join(p for p in [*parts, by_key] if p)


def usage_since(previous: dict[str, KeyUsage], current: dict[str, KeyUsage]) -> dict[str, KeyUsage]:
    """Each key's usage between two snapshots of every key's cumulative usage (a key not in `previous` from zero)."""
    return {name: KeyUsage(*(n - p for n, p in zip(astuple(now), astuple(previous.get(name, KeyUsage())),
                                                    strict=True)))
            for name, now in current.items()}


def key_part(usage: dict[str, KeyUsage]) -> str:
    """`by key: alice 12 (2 rate-limited, 1 error), token-2 3`: each key with requests, by name; "" when none."""
    entries = []
    for name, u in sorted(usage.items()):
        if u.requests:
            notes = ", ".join(note for count, note in ((u.rate_limited, f"{u.rate_limited} rate-limited"),
                                                       (u.errors, f"{u.errors} error{'s' * (u.errors != 1)}"))
                              if count)
            entries.append(f"{name} {u.requests}" + (f" ({notes})" if notes else ""))
    return "by key: " + ", ".join(entries) if entries else ""
