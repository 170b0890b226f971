"""What SGLang's console lines say, read one line at a time (pure): its startup phases, and its per-batch chatter.

An engine's output is the app's console (and the ClearML task's log). SGLang 0.5.23 prints, while it starts:
    Load weight begin. avail mem=...                       (sglang/srt/model_executor/model_runner.py)
    Load weight end. ...
    Capture cuda graph begin. ... / Capture cpu graph ...   (model_runner_components/cuda_graph_setup.py,
                                                             cpu_graph_runner.py)
    Engine startup timings (s): load_weight=...            (the scheduler is up; the HTTP server and SGLang's
    INFO:     Uvicorn running on http://...                 warmup request follow; uvicorn's line is INFO)
    The server is fired up and ready to roll!               (sglang/srt/entrypoints/http_server.py: its warmup
                                                             request was answered; the app takes it as ready)
and, while it serves, one `Prefill batch, ...` line per prefill batch and a `Decode batch, ...` line every
`--decode-log-interval` steps (scheduler_components/metrics_reporter.py): at load, many lines a second, which the
console shows only in debug mode (the task's scalars carry the same figures as time series).
"""

from __future__ import annotations

import re
from enum import Enum


class Phase(str, Enum):
    """An engine's startup, in order; the app's own phases come before and after SGLang's."""

    STARTING = "starting SGLang"  # the process spawned: imports, tokenizer, ports (until weights load)
    LOADING_WEIGHTS = "loading weights"
    PREPARING = "allocating memory"  # weights loaded: the KV cache pool, then graphs (on GPUs)
    CAPTURING_GRAPHS = "capturing graphs"
    WARMING_UP = "warming up"  # SGLang's warmup request, until its "ready to roll"
    READY = "ready"


# A line as SGLang's logger writes it: `[2026-12-02 15:40:12] msg` or `[2026-12-02 15:40:12 TP0] msg`.
_PREFIX = r"^(?:\[[^\]]*\]\s*)?"
_PHASES = (
    (re.compile(_PREFIX + r"Load weight begin\b"), Phase.LOADING_WEIGHTS),
    (re.compile(_PREFIX + r"Load weight end\b"), Phase.PREPARING),
    (re.compile(_PREFIX + r"Capture .*\b(?:graph|Graph)\b.*\bbegin\b|" + _PREFIX + r"Capture cpu graph bs\b"),
     Phase.CAPTURING_GRAPHS),
    (re.compile(_PREFIX + r"Engine startup timings\b|" + _PREFIX + r"(?:INFO:\s+)?Uvicorn running on "),
     Phase.WARMING_UP),
    (re.compile(_PREFIX + r"The server is fired up and ready to roll!"), Phase.READY),
)
_BATCH_STATS = re.compile(_PREFIX + r"(?:Prefill|Decode) batch\b")
_PHASE_ORDER = list(Phase)


def startup_phase(line: str) -> Phase | None:
    """The phase this line of SGLang's output begins, if it begins one."""
    for pattern, phase in _PHASES:
        if pattern.search(line):
            return phase
    return None


def later(phase: Phase, than: Phase) -> bool:
    """Whether `phase` comes after `than` (SGLang's ranks each print their own lines: a phase never goes back)."""
    return _PHASE_ORDER.index(phase) > _PHASE_ORDER.index(than)


def is_batch_stats(line: str) -> bool:
    """A per-batch statistics line (`Prefill batch, ...`, `Decode batch, ...`): debug-mode console only."""
    return _BATCH_STATS.search(line) is not None
