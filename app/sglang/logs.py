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

SGLang's format has no level (`[time] message`), so `ConsoleLevels` decides which lines an operator needs at info
level: problems (errors, failures, tracebacks whole, a kill), and what sizes the engine (its KV cache). The rest of
a start, some 80 lines on the CPU, is there in debug mode: the imports' Python warnings (`…/awq.py:53: UserWarning:
Only CUDA, HIP and XPU support AWQ currently.` and the source line under it), the one 19.5 KB `server_args=…` line,
the model registry's `Ignore import error when loading …`, the progress bars, the per-batch lines.
"""

from __future__ import annotations

import logging
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
_WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")  # Python's `path:line: Category: message`
_TRACEBACK = "Traceback (most recent call last):"
_NOISE = re.compile(_PREFIX + r"(?:server_args=|Ignore import error when loading |"
                    r".*\bloading (?:shards|(?:safetensors )?checkpoint shards)\b)", re.IGNORECASE)
_PROBLEM = re.compile(r"\b(?:error|exception|fail(?:s|ed|ure)?|fatal|killed|out of memory|oom|abort(?:ed|ing)?|"
                      r"timed? ?out|cannot|unable|refused|denied|not found|invalid)\b|Errno|\w+Error:", re.IGNORECASE)
_SIZING = re.compile(_PREFIX + r"(?:KV Cache is allocated\b|max_total_num_tokens=)")
# The longest engine line the console shows at info level (the app's prefix brings it under 300 characters);
# longer ones end in `…`, whole in debug mode. A traceback is shown whole.
MAX_INFO_CHARS = 220
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



class ConsoleLevels:
    """The logging level and text of each line of one engine's output, in order (a line's meaning can depend on the
    line before it: what follows a warning or a traceback is indented)."""

    def __init__(self) -> None:
        self._block: int | None = None  # the level of the indented lines that follow: a warning's, a traceback's

    def classify(self, line: str) -> tuple[int, str]:
        if self._block is not None and line[:1].isspace():
            return self._block, line
        in_traceback = self._block == logging.INFO
        self._block = None
        if _TRACEBACK in line:  # (SGLang's scheduler: `[time TP0] Scheduler hit an exception: Traceback …`)
            self._block = logging.INFO
            return logging.INFO, line
        if in_traceback:  # its last line: the exception
            return logging.INFO, line
        if _WARNING.search(line):
            self._block = logging.DEBUG
            return logging.DEBUG, line
        if _BATCH_STATS.search(line) or _NOISE.search(line):
            return logging.DEBUG, line
        if _PROBLEM.search(line) or _SIZING.search(line):
            return logging.INFO, line if len(line) <= MAX_INFO_CHARS else line[:MAX_INFO_CHARS - 1] + "…"
        return logging.DEBUG, line
