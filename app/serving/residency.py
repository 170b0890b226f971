"""Models sharing GPUs: which are resident, which sleep, which wake (a pure policy), and carrying it out.

SGLang's own mechanism does the work (reference/sglang.md A2, A4; its calls: `app.serving.memory`): an engine
started with `--enable-memory-saver` gives its GPU memory back while idle (`/release_memory_occupation`) and takes it
again (`/resume_memory_occupation`). With `--enable-weights-cpu-backup` (Automatic CPU Offloading) its weights wait
in CPU memory meanwhile; without it (Disk Swapping) they are dropped and reloaded from the model's files on waking
(`/update_weights_from_disk`). SGLang says release "should be called only when the server is idle" (it asserts
it, and the assertion takes the server down), so the gateway counts each model's requests and a model with one
in flight never sleeps.

The ledger: each device may hold `budget_gib` of the engines' static memory (weights + KV cache + graphs, as SGLang
measures and exports it on /metrics); an engine's size is its measurement once it has started, its memory fraction
times the device before. A model alone on its devices always fits.

Policy (pure, `evictions` and `idle_sleepers`): to make room, the least recently used idle models sleep first;
a model with requests in flight never sleeps; a model woken for a request is not put back to sleep before it has
served one (or `protect_s` has passed), so alternating requests cannot thrash; a model idle for `sleep_after_s`
may sleep even when nobody needs its memory.

`Residency` carries the policy out on the event loop: one transition at a time (a lock), every request for a
sleeping model shares one wake-up, and a request waits at most its deadline (the gateway then answers 503 with
Retry-After; the wake-up goes on for the next request). It writes each model's `ModelState` on its slot, and only
there: a sleeping model's engine stays resident (its process is up), and what requests find is the slot's state
(`app.states.model_state`). An engine's crash, restart or stop reaches the slot through `engine_changed`.

Example::

    residency = Residency(slots, engines, SGLangMemoryControl(mode="cpu"), budget_gib={0: 70.0})
    if not residency.enter("qwen"):                     # fast path for a resident model
        ok = await residency.wait_resident("qwen", 120)  # wakes it (making room), then enters
    ...
    residency.leave("qwen", now)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from app.serving.memory import ControlError, EngineLike, MemoryControl, release_when_idle
from app.states import EngineState, ModelState, model_state
from app.statistics import percentile

logger = logging.getLogger(__name__)

# The states of a model sharing GPUs (the residency writes them on its slots, and nowhere else).
LOADING, RESIDENT, SLEEPING, WAKING = ModelState.LOADING, ModelState.RESIDENT, ModelState.SLEEPING, ModelState.WAKING
# An engine in these states holds no memory: its slot takes the state on (`Residency.engine_changed`).
GONE = frozenset({EngineState.RESTARTING, EngineState.FAILED, EngineState.STOPPED})

# Before releasing, SGLang itself must report nothing running or queued (`app.serving.memory.release_when_idle`):
# for at most this long, else the model stays resident.
IDLE_CHECK_DEADLINE_SECONDS = 10.0
# Wake latencies kept for the percentiles.
WAKE_SAMPLES = 1000


# ----------------------------------------------------------------------------------------------------------
# the policy (pure)


@dataclass
class Slot:
    """What the policy knows of one model."""

    endpoint: str
    devices: tuple[int, ...]
    estimate_gib: float  # per device, until measured: its memory fraction of the device
    measured_gib: float | None = None  # per device, as SGLang reports it once started
    state: ModelState = LOADING
    holding: bool = False  # its memory is on the devices (resident, waking, loading, or still releasing)
    in_flight: int = 0
    last_used: float = 0.0
    woken_at: float | None = None  # woken for a request, and has not served one since
    wakeups: int = 0
    last_wake_s: float | None = None  # wall-clock time of the last completed wake-up

    @property
    def gib(self) -> float:
        return self.measured_gib if self.measured_gib is not None else self.estimate_gib


def used_gib(slots: Iterable[Slot], device: int, *, without: Slot | None = None) -> float:
    return sum(s.gib for s in slots if s.holding and s is not without and device in s.devices)


def evictable(slot: Slot, now: float, protect_s: float) -> bool:
    """May sleep now: resident, nothing in flight, and not woken for a request it has not served yet."""
    if slot.state != RESIDENT or slot.in_flight:
        return False
    return slot.woken_at is None or now - slot.woken_at >= protect_s


def evictions(target: Slot, slots: list[Slot], budget_gib: dict[int, float], now: float,
              protect_s: float) -> list[Slot] | None:
    """The models to put to sleep, least recently used first, so that `target` fits on its devices: [] when it
    fits already, None when it cannot fit now (the models that would have to go are busy or just woke)."""
    short = {d: used_gib(slots, d, without=target) + target.gib - budget_gib[d] for d in target.devices}
    others = {d: used_gib(slots, d, without=target) for d in target.devices}

    def fits() -> bool:  # a model alone on its devices always fits: it started there
        return all(short[d] <= 1e-6 or others[d] <= 1e-6 for d in target.devices)

    chosen: list[Slot] = []
    candidates = sorted((s for s in slots if s is not target and s.holding and evictable(s, now, protect_s)),
                        key=lambda s: (s.last_used, s.endpoint))
    for slot in candidates:
        if fits():
            break
        if not any(d in slot.devices and short[d] > 1e-6 for d in target.devices):
            continue  # it frees nothing where memory is short
        chosen.append(slot)
        for d in target.devices:
            if d in slot.devices:
                short[d] -= slot.gib
                others[d] -= slot.gib
    return chosen if fits() else None


def idle_sleepers(slots: list[Slot], now: float, sleep_after_s: float, protect_s: float) -> list[Slot]:
    """Models idle for `sleep_after_s` (0: never without pressure), which may sleep now."""
    if sleep_after_s <= 0:
        return []
    return [s for s in slots if evictable(s, now, protect_s) and now - s.last_used >= sleep_after_s]


# ----------------------------------------------------------------------------------------------------------
# carrying it out


@dataclass
class WakeStats:
    wakeups: dict[str, int] = field(default_factory=dict)
    last_wake: dict[str, float] = field(default_factory=dict)  # wall-clock time of each model's last wake-up
    latencies_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=WAKE_SAMPLES))

    def p(self, q: float) -> float | None:
        return percentile(list(self.latencies_ms), q) if self.latencies_ms else None


class Residency:
    """Keeps the resident set within the devices' budget, on the event loop. See the module's docstring."""

    # When a wake-up ended, as the dashboard tells it (wall-clock seconds; tests may set it on an instance).
    wall_clock: ClassVar[Callable[[], float]] = staticmethod(time.time)

    def __init__(self, slots: list[Slot], engines: dict[str, EngineLike], control: MemoryControl, *,
                 budget_gib: dict[int, float], sleep_after_s: float = 0.0, protect_s: float = 120.0,
                 clock: Callable[[], float] = time.monotonic,
                 idle_check_deadline_s: float = IDLE_CHECK_DEADLINE_SECONDS):
        self.slots = {s.endpoint: s for s in slots}
        self.engines = engines
        self.control = control
        self.budget_gib = budget_gib
        self.sleep_after_s = sleep_after_s
        self.protect_s = protect_s
        self.clock = clock
        self.idle_check_deadline_s = idle_check_deadline_s
        self._wake_latencies_ms: collections.deque[float] = collections.deque(maxlen=WAKE_SAMPLES)
        self._lock = asyncio.Lock()
        self._changes = Changes()
        self._wakes: dict[str, asyncio.Task[None]] = {}

    # ----- the gateway's side -----

    def enter(self, endpoint: str) -> bool:
        """A request for `endpoint` starts now if its model is resident (True); else it must wait."""
        slot = self.slots[endpoint]
        if slot.state != RESIDENT:
            return False
        slot.in_flight += 1
        return True

    def leave(self, endpoint: str, now: float) -> None:
        slot = self.slots[endpoint]
        slot.in_flight -= 1
        slot.last_used = now
        slot.woken_at = None  # it served: an ordinary resident model again
        self._changes.notify()

    async def wait_resident(self, endpoint: str, deadline_s: float) -> bool:
        """Wake the model (one wake-up for every waiting request) and enter; False when the deadline passed or
        the wake-up failed (the caller answers 503)."""
        deadline = self.clock() + deadline_s
        while not self.enter(endpoint):
            remaining = deadline - self.clock()
            if remaining <= 0:
                return False
            wake = self._wakes.get(endpoint)
            if wake is None:
                wake = self._wakes[endpoint] = asyncio.create_task(self._wake(self.slots[endpoint]),
                                                                   name=f"wake-{endpoint}")
                wake.add_done_callback(lambda _, name=endpoint: self._wakes.pop(name, None))
            try:
                await asyncio.wait_for(asyncio.shield(wake), remaining)
            except asyncio.TimeoutError:
                return False
            except ControlError:
                return False
        return True

    def states(self) -> dict[str, ModelState]:
        return {name: slot.state for name, slot in self.slots.items()}

    def wake_stats(self) -> WakeStats:
        """What the dashboard reports (a copy: the reporter reads it on its own thread)."""
        return WakeStats({name: s.wakeups for name, s in self.slots.items()},
                         {name: s.last_wake_s for name, s in self.slots.items() if s.last_wake_s is not None},
                         collections.deque(self._wake_latencies_ms, maxlen=WAKE_SAMPLES))

    def state(self, endpoint: str) -> ModelState:
        return self.slots[endpoint].state

    def describe(self) -> dict[str, dict[str, object]]:
        """Per model: state, last wake-up (wall-clock seconds), wake-ups, memory per device (GiB)."""
        return {name: {"state": s.state, "last_wake": s.last_wake_s, "wakeups": s.wakeups,
                       "memory_gib": round(s.gib, 3)} for name, s in self.slots.items()}

    # ----- the supervisor's side -----

    async def admit(self, engine: EngineLike) -> None:
        """Before an engine (re)starts: make room for it on its devices, then count it."""
        slot = self.slots[engine.endpoint]
        slot.holding = False
        slot.state = LOADING
        while True:
            async with self._lock:
                seen = self._changes.version
                victims = evictions(slot, list(self.slots.values()), self.budget_gib, self.clock(), self.protect_s)
                if victims is not None and await self._sleep_all(victims):
                    slot.holding = True
                    return
            await self._changes.wait(seen)

    async def started(self, engine: EngineLike) -> None:
        """An engine is ready: measure it; it is resident."""
        slot = self.slots[engine.endpoint]
        measured = await self.control.footprint_gib(engine)
        if measured is not None:
            slot.measured_gib = measured
            logger.info("Model %s holds %.2f GiB per GPU", engine.endpoint, measured)
        slot.holding, slot.state, slot.woken_at = True, RESIDENT, None
        slot.last_used = self.clock()
        self._changes.notify()

    def engine_changed(self, engine: EngineLike) -> None:
        """The supervisor's view: an engine that crashed or stopped holds no memory any more, and its model is
        restarting, failed or stopped with it."""
        slot = self.slots.get(engine.endpoint)
        if slot is not None and engine.state in GONE:
            slot.holding, slot.state, slot.in_flight = False, model_state(engine.state), 0
            self._changes.notify()

    # ----- the deployment's loop -----

    async def sleep_idle(self) -> list[str]:
        """Put to sleep the models idle longer than `sleep_after_s`; their names."""
        if self.sleep_after_s <= 0:
            return []
        async with self._lock:
            sleepers = idle_sleepers(list(self.slots.values()), self.clock(), self.sleep_after_s, self.protect_s)
            slept = [s.endpoint for s in sleepers if await self._sleep(s)]
        if slept:
            logger.info("Idle for %.0f s: %s sleeping", self.sleep_after_s, ", ".join(slept))
        return slept

    # ----- transitions (under the lock) -----

    async def _wake(self, slot: Slot) -> None:
        """Make room and resume; gives up after `protect_s` (the requests' own deadline) without room."""
        started = self.clock()
        while True:
            if self.clock() - started > self.protect_s:
                raise ControlError(f"no room for {slot.endpoint} within {self.protect_s:.0f} s")
            async with self._lock:
                seen = self._changes.version
                if slot.state == RESIDENT:
                    return
                if slot.state == SLEEPING:
                    victims = evictions(slot, list(self.slots.values()), self.budget_gib, self.clock(),
                                        self.protect_s)
                    if victims is not None and await self._sleep_all(victims):
                        await self._resume(slot, started)
                        return
            with contextlib.suppress(asyncio.TimeoutError):  # room comes when a request ends or a state changes
                await asyncio.wait_for(self._changes.wait(seen), max(0.0, started + self.protect_s - self.clock()))

    async def _resume(self, slot: Slot, started: float) -> None:
        engine = self.engines[slot.endpoint]
        slot.state = WAKING
        slot.holding = True
        logger.info("Waking %s", slot.endpoint)
        try:
            await self.control.resume(engine)
        except ControlError:
            logger.exception("Waking %s failed", slot.endpoint)
            slot.state = SLEEPING
            slot.holding = False  # what the engine holds now is unknown: a crash shows up through the supervisor
            self._changes.notify()
            raise
        now = self.clock()
        slot.state = RESIDENT
        slot.woken_at = slot.last_used = now
        slot.wakeups += 1
        slot.last_wake_s = self.wall_clock()
        self._wake_latencies_ms.append((now - started) * 1000)
        logger.info("%s is awake (%.0f ms)", slot.endpoint, (now - started) * 1000)
        self._changes.notify()

    async def _sleep_all(self, victims: list[Slot]) -> bool:
        for victim in victims:
            if not await self._sleep(victim):
                return False
        return True

    async def _sleep(self, slot: Slot) -> bool:
        """Release one idle model's memory; False (and it stays resident) when SGLang is still busy or refuses."""
        if not evictable(slot, self.clock(), 0.0):
            return False
        engine = self.engines[slot.endpoint]
        slot.state = SLEEPING  # from now on its requests wait for a wake-up
        try:
            await release_when_idle(self.control, engine, self.clock() + self.idle_check_deadline_s, self.clock)
        except ControlError as exc:
            logger.warning("%s stays resident: %s", slot.endpoint, exc)
            slot.state = RESIDENT
            slot.last_used = self.clock()  # SGLang was at work: as good as used now, so another model yields
            self._changes.notify()
            return False
        slot.holding = False
        logger.info("%s is sleeping (%.2f GiB per GPU given back)", slot.endpoint, slot.gib)
        self._changes.notify()
        return True


class Changes:
    """A count of changes that waiters can wait on: one that looked at `version` v waits only if nothing changed
    since (the residency's lock is not held while waiting, so a change may come between the look and the wait)."""

    def __init__(self) -> None:
        self.version = 0
        self._changed: asyncio.Future[None] | None = None

    def notify(self) -> None:
        self.version += 1
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None

    async def wait(self, seen: int) -> None:
        """Until something changed since version `seen` (at once if it has already)."""
        if self.version != seen:
            return
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._changed)
