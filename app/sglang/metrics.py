"""SGLang's Prometheus metrics: parsing the text format, and turning token counters into rates (pure).

The dashboard's "Tokens per Second" comes from SGLang's own counters, `sglang:generation_tokens_total` and
`sglang:prompt_tokens_total` (every engine runs with `--enable-metrics`), summed over their label sets and over
every engine, then differentiated between two scrapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

GENERATION_TOKENS = "sglang:generation_tokens_total"
PROMPT_TOKENS = "sglang:prompt_tokens_total"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)")


def _samples(text: str) -> Iterator[tuple[str, str, float]]:
    """(metric name, label text, value) of every finite sample line; comments and malformed lines skipped."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            yield match.group(1), match.group(2) or "", value


def parse_prometheus(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels folded): {"sglang:prompt_tokens_total": 41.0, ...}."""
    totals: dict[str, float] = {}
    for name, _, value in _samples(text):
        totals[name] = totals.get(name, 0.0) + value
    return totals


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample with its labels: {"sglang:kv_cache_memory_usage_gb": [({"tp_rank": "0", ...}, 35.2)], ...}."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for name, labels, value in _samples(text):
        samples.setdefault(name, []).append((dict(_LABEL.findall(labels)), value))
    return samples


@dataclass(frozen=True)
class TokenTotals:
    generation: float
    prompt: float

    def __add__(self, other: TokenTotals) -> TokenTotals:
        return TokenTotals(self.generation + other.generation, self.prompt + other.prompt)

    @classmethod
    def from_metrics(cls, metrics: dict[str, float]) -> TokenTotals:
        return cls(metrics.get(GENERATION_TOKENS, 0.0), metrics.get(PROMPT_TOKENS, 0.0))


ZERO = TokenTotals(0.0, 0.0)


class TokenRate:
    """Tokens per second between successive readings of the (summed) counters.

    A counter that goes down means an engine restarted and its counters began again: the new value counts from 0.
    """

    def __init__(self) -> None:
        self._last: tuple[float, TokenTotals] | None = None

    def update(self, now: float, totals: TokenTotals) -> TokenTotals | None:
        last, self._last = self._last, (now, totals)
        if last is None or now <= last[0]:
            return None
        elapsed = now - last[0]

        def rate(new: float, old: float) -> float:
            return (new - old if new >= old else new) / elapsed

        return TokenTotals(rate(totals.generation, last[1].generation), rate(totals.prompt, last[1].prompt))
