"""Why an engine failed, and whether it is restarted: pure decisions over the evidence an engine leaves.

`classify_failure` reads SGLang's last log lines first (its own words: out of memory, port in use, bad argument,
missing model), then which of its processes died, the exit status or signal, and the kernel's count of OOM kills
(`oom_kill_count`: this container's `memory.events`, else the machine's `/proc/vmstat`); without evidence it says
the cause is unknown rather than guess. `RestartPolicy` budgets restarts as a rate: so many crashes within a window,
older ones forgotten.
"""

from __future__ import annotations

import contextlib
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# Restarts after a crash: waits between attempts, and how many crashes within the window are restarted before the
# deployment fails (older crashes are forgotten: a model that crashed five times last month still restarts).
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
RESTART_BUDGET = 5
RESTART_WINDOW_SECONDS = 3600.0



@dataclass(frozen=True)
class FailureCause:
    kind: str  # out_of_memory | port_in_use | bad_argument | missing_model | other
    hint: str


_CAUSES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("out_of_memory", re.compile(r"Not enough memory|increase --mem-fraction-static", re.I),
     "the KV cache does not fit next to the weights: raise mem-fraction-static, or lower context-length or "
     "max-running-requests"),
    ("out_of_memory", re.compile(r"out of memory|OutOfMemoryError|CUDA error: out of memory|Cannot allocate memory",
                                 re.I),
     "the model does not fit on its GPUs: give it more GPUs (gpus), use a quantized model, or set Max CUDA Memory "
     "above the GPU's memory to offload to CPU RAM"),
    ("port_in_use", re.compile(r"Address already in use|Errno 98", re.I),
     "another process holds the engine's port; stop it, or let the app pick another port by restarting"),
    ("missing_model", re.compile(
        r"Repository Not Found|RepositoryNotFoundError|GatedRepoError|is not a local folder and is not a valid model "
        r"identifier|does not appear to have a file named|HFValidationError|LocalEntryNotFoundError|"
        r"401 Client Error|Cannot access gated repo|Can't load (?:the )?(?:config|tokenizer)|"
        r"No such file or directory:.*(?:config\.json|tokenizer)", re.I),
     "the model could not be found or read: check the model name or path, and general.hf_token for a gated model"),
    ("bad_argument", re.compile(r"error: argument|unrecognized arguments|error: the following arguments|"
                                r"AssertionError|ValueError: .*(?:arg|flag|must|should)", re.I),
     "SGLang refused its arguments: check the model's flags (the log tail shows SGLang's own words)"),
)


@dataclass(frozen=True)
class CrashEvidence:
    """What is known of an engine's end besides its exit status and log: the SGLang process that died first (when
    the watch saw one go), and how many processes the kernel's OOM killer killed meanwhile (None: unreadable)."""

    died: str | None = None
    oom_kills: int | None = None


def classify_failure(exit_code: int | None, tail: Iterable[str],
                     evidence: CrashEvidence = CrashEvidence()) -> FailureCause:
    """The likely cause of an engine's failure, from what is known: SGLang's own last log lines first, then which
    of its processes died, the exit status or signal and the kernel's OOM record. It says "unknown" rather than
    guess."""
    lines = list(tail)
    for line in reversed(lines):
        for kind, pattern, hint in _CAUSES:
            if pattern.search(line):
                return FailureCause(kind, hint)
    oom = evidence.oom_kills
    if oom:
        return FailureCause("out_of_memory", f"the kernel's OOM killer killed {oom} process(es) on this machine "
                            "meanwhile: the host ran out of memory (give the machine more RAM, or use a smaller or "
                            "quantized model, fewer models or a smaller max-total-tokens)")
    unknown = ("no OOM kill is recorded" if oom == 0 else "the kernel's OOM record is not readable here")
    if evidence.died is not None:
        return FailureCause("other", f"{evidence.died} ended while the engine served, and no log line says why "
                            f"({unknown}): cause unknown")
    if exit_code == 2:
        return FailureCause("bad_argument", "SGLang refused its arguments (exit code 2)")
    if exit_code is not None and exit_code < 0:
        return FailureCause("other", f"the engine was killed by signal {-exit_code} ({_signal_name(-exit_code)}) "
                            f"from outside, and {unknown}: cause unknown")
    if exit_code:
        return FailureCause("other", f"the engine exited with code {exit_code}; see its log lines above")
    return FailureCause("other", "the engine ended without an error; see its log lines above")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def oom_kill_count() -> int | None:
    """How many processes the kernel's OOM killer has killed: in this process's memory cgroup where it is readable
    (a container's limit), else on the whole machine (/proc/vmstat); None when neither is."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and not controllers:  # cgroup v2
                for events in (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.events",
                               Path("/sys/fs/cgroup/memory.events")):
                    if events.exists():
                        return _field(events.read_text(), "oom_kill")
    with contextlib.suppress(OSError, ValueError):
        return _field(Path("/proc/vmstat").read_text(), "oom_kill")
    return None


def _field(text: str, name: str) -> int | None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return None


@dataclass(frozen=True)
class RestartPolicy:
    """Whether and when a crashed engine is restarted (pure): up to `budget` crashes within `window_s` are, after a
    backoff that grows with the crashes in the window; one more fails the deployment."""

    budget: int = RESTART_BUDGET
    window_s: float = RESTART_WINDOW_SECONDS
    backoff_s: tuple[float, ...] = RESTART_BACKOFF_SECONDS

    def recent(self, crashes: Iterable[float], now: float) -> int:
        """The crashes within the window."""
        return sum(1 for t in crashes if now - t < self.window_s)

    def delay(self, crashes: Iterable[float], now: float) -> float | None:
        """Seconds to wait before restarting, given every crash time (this one included); None: give up."""
        recent = self.recent(crashes, now)
        if recent > self.budget:
            return None
        return self.backoff_s[min(max(recent, 1), len(self.backoff_s)) - 1]

    def describe(self, crashes: Iterable[float], now: float) -> str:
        """`restart 2 of 5 in the last 60 min`: where the latest crash's restart stands in the budget."""
        return f"restart {max(1, self.recent(crashes, now))} of {self.budget} in the last {self.window_s / 60:g} min"


class EngineStartupError(Exception):
    """An engine that could not start (or crashed beyond its restart budget): cause, exit code, log tail."""

    def __init__(self, endpoint: str, reason: str, cause: FailureCause, exit_code: int | None, tail: list[str]):
        self.endpoint = endpoint
        self.reason = reason
        self.cause = cause
        self.exit_code = exit_code
        self.tail = tail
        super().__init__(f"engine {endpoint!r} {reason} ({cause.kind}): {cause.hint}")

    def render(self, tail_lines: int = 20) -> str:
        shown = "\n".join(f"    {line}" for line in self.tail[-tail_lines:])
        code = f", exit code {self.exit_code}" if self.exit_code is not None else ""
        return f"{self}{code}\n  last log lines:\n{shown}" if shown else f"{self}{code}"
