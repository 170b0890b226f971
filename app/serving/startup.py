"""How long starting took, phase by phase: the app's own work, fetching models, and each engine's phases as SGLang's
console shows them (`app.sglang.logs`).

`EnginePhases` is one engine's startup, written by that engine's output pump only; `StartupTimeline` is the whole
deployment's, written by the deployment; `summary()` makes what the console prints at ready and the task keeps as
properties (`app.serving.report.StartupSummary`). "Ours" is the time the app itself adds: from the process start to
the first engine spawned (less the time spent fetching models, which is the models' size over the network), and
from an engine's "ready to roll" to the gateway serving it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from app.serving.report import Span, StartupSummary
from app.sglang.logs import Phase, later, startup_phase

# (endpoint, the phase it entered, the phase it left and how long that took)
OnPhase = Callable[[str, Phase, "Span | None"], None]


class EnginePhases:
    """One engine's startup: the phase its output last showed, and when each began."""

    def __init__(self, endpoint: str, clock: Callable[[], float], on_phase: OnPhase | None = None):
        self.endpoint = endpoint
        self._clock = clock
        self._on_phase = on_phase
        self.began: list[tuple[Phase, float]] = []

    @property
    def current(self) -> Phase | None:
        return self.began[-1][0] if self.began else None

    def spawned(self) -> None:
        """The process started (again): a new startup."""
        self.began = []
        self._enter(Phase.STARTING)

    def saw(self, line: str) -> Phase | None:
        """A line of the engine's output; the phase it began, if it moved the engine on."""
        if self.current in (None, Phase.READY):  # not started, or done: every later line is the engine serving
            return None
        phase = startup_phase(line)
        if phase is None or not later(phase, self.current):
            return None
        self._enter(phase)
        return phase

    def _enter(self, phase: Phase) -> None:
        now = self._clock()
        left = Span(self.began[-1][0].value, now - self.began[-1][1]) if self.began else None
        self.began.append((phase, now))
        if self._on_phase is not None:
            self._on_phase(self.endpoint, phase, left)

    def spans(self, until: float) -> list[Span]:
        """Each phase before ready and its length; the last one runs to `until` when ready was never printed."""
        spans = []
        for (phase, start), end in zip(self.began, [t for _, t in self.began[1:]] + [until], strict=True):
            if phase != Phase.READY:
                spans.append(Span(phase.value, max(0.0, end - start)))
        return spans

    def ready_line_at(self) -> float | None:
        """When SGLang said it was ready to roll (None where it did not: a stand-in, or SGLang's wording changed)."""
        return next((t for phase, t in self.began if phase == Phase.READY), None)


class Started(Protocol):
    """An engine, as its startup is read (`app.serving.engine.Engine`)."""

    phases: EnginePhases
    ready_at: float | None


@dataclass
class StartupTimeline:
    """The deployment's startup, on one clock (the monotonic one), from the process start."""

    process_started: float
    # before the engines: fetching (and converting) models, which is not the app's own time but their size
    app_spans: list[Span] = field(default_factory=list)
    first_spawn: float | None = None
    engines: dict[str, tuple[list[Span], float]] = field(default_factory=dict)  # name -> spans, handover
    serving: float | None = None
    notes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per model: its plan's notes (`EngineCommand`)

    def fetched(self, seconds: float) -> None:
        self.app_spans.append(Span("fetching models", seconds))

    def all_ready(self, engines: Iterable[Started], now: float) -> StartupSummary:
        """Every engine serves, the gateway too: the summary."""
        engines = list(engines)
        spawned = [e.phases.began[0][1] for e in engines if e.phases.began]
        self.first_spawn = min(spawned) if spawned else None
        for engine in engines:
            self.engine_ready(engine.phases, engine.ready_at if engine.ready_at is not None else now)
        self.serving = now
        return self.summary()

    def engine_ready(self, phases: EnginePhases, resident_at: float) -> None:
        """An engine is serving: its phases, and how long from its "ready to roll" to the gateway sending to it."""
        said = phases.ready_line_at()
        self.engines[phases.endpoint] = (phases.spans(said if said is not None else resident_at),
                                         max(0.0, resident_at - said) if said is not None else 0.0)

    def summary(self) -> StartupSummary:
        end = self.serving if self.serving is not None else self.process_started
        before = (self.first_spawn if self.first_spawn is not None else end) - self.process_started
        handover = max((h for _, h in self.engines.values()), default=0.0)
        fetching = sum(span.seconds for span in self.app_spans)
        return StartupSummary(total_s=end - self.process_started, own_s=max(0.0, before - fetching) + handover,
                              app=list(self.app_spans), engines={k: v[0] for k, v in self.engines.items()},
                              notes=dict(self.notes))
