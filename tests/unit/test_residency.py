"""Models sharing GPUs: the sleep/wake policy (pure) and Residency carrying it out against a recording control."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from app.serving.residency import (
    RESIDENT,
    SLEEPING,
    ControlError,
    Residency,
    Slot,
    evictions,
    idle_sleepers,
)

BUDGET = {0: 10.0}


def slot(name: str, gib: float = 4.0, *, last_used: float = 0.0, in_flight: int = 0, state: str = RESIDENT,
         devices: tuple[int, ...] = (0,), woken_at: float | None = None) -> Slot:
    return Slot(name, devices, gib, state=state, holding=state == RESIDENT, in_flight=in_flight,
                last_used=last_used, woken_at=woken_at)


def names(slots):
    return None if slots is None else [s.endpoint for s in slots]


# ----- the policy -----

def test_the_least_recently_used_idle_model_sleeps_first():
    a, b, c = slot("a", last_used=5), slot("b", last_used=1), slot("c", state=SLEEPING)
    assert names(evictions(c, [a, b, c], BUDGET, now=10, protect_s=60)) == ["b"]
    b.last_used = 9
    assert names(evictions(c, [a, b, c], BUDGET, now=10, protect_s=60)) == ["a"]


def test_a_model_that_fits_evicts_nobody():
    a, c = slot("a"), slot("c", state=SLEEPING)
    assert evictions(c, [a, c], BUDGET, now=10, protect_s=60) == []


def test_a_model_with_requests_in_flight_never_sleeps():
    a, b, c = slot("a", in_flight=1, last_used=0), slot("b", last_used=5), slot("c", state=SLEEPING)
    assert names(evictions(c, [a, b, c], BUDGET, now=10, protect_s=60)) == ["b"]  # not a, though older
    b.in_flight = 2
    assert evictions(c, [a, b, c], BUDGET, now=10, protect_s=60) is None  # nobody can go: wait


def test_a_model_just_woken_is_not_put_back_to_sleep_before_it_served():
    a = slot("a", last_used=0, woken_at=9.0)  # woke at 9 for a request that has not reached it yet
    b, c = slot("b", last_used=8), slot("c", state=SLEEPING)
    assert names(evictions(c, [a, b, c], BUDGET, now=10, protect_s=60)) == ["b"]
    b.woken_at = 9.5
    assert evictions(c, [a, b, c], BUDGET, now=10, protect_s=60) is None
    assert names(evictions(c, [a, b, c], BUDGET, now=70, protect_s=60)) == ["a"]  # nobody came for it in time


def test_only_models_on_the_short_device_are_evicted():
    budget = {0: 10.0, 1: 10.0}
    a = slot("a", 6, devices=(0,), last_used=0)
    b = slot("b", 6, devices=(1,), last_used=1)
    c = slot("c", 6, devices=(1,), state=SLEEPING)
    assert names(evictions(c, [a, b, c], budget, now=10, protect_s=60)) == ["b"]


def test_a_model_alone_on_its_devices_always_fits():
    big = slot("big", 12, state=SLEEPING)  # measured above the budget: it started alone, so it fits alone
    small = slot("small", 1, last_used=0)
    assert names(evictions(big, [big, small], BUDGET, now=1, protect_s=60)) == ["small"]
    assert evictions(big, [big], BUDGET, now=1, protect_s=60) == []


def test_idle_models_sleep_after_the_threshold_only():
    a, b = slot("a", last_used=0), slot("b", last_used=50)
    busy = slot("busy", last_used=0, in_flight=1)
    assert names(idle_sleepers([a, b, busy], now=100, sleep_after_s=60, protect_s=60)) == ["a"]
    assert idle_sleepers([a, b, busy], now=100, sleep_after_s=0, protect_s=60) == []


# ----- carrying it out -----

@dataclass
class Engine:
    endpoint: str
    url: str = "http://engine"
    state: str = "loading"


@dataclass
class LedgerControl:
    """A device of `capacity` GiB: release frees a model's memory, resume takes it again (never above capacity,
    or the test fails); `gate` holds every resume until the test opens it."""

    capacity: float
    sizes: dict[str, float]
    resident: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)
    peak: float = 0.0
    gate: asyncio.Event | None = None
    busy_for: dict[str, int] = field(default_factory=dict)  # SGLang still finishing an aborted request

    def used(self) -> float:
        return sum(self.sizes[n] for n in self.resident)

    def _take(self, name: str) -> None:
        self.resident.add(name)
        self.peak = max(self.peak, self.used())
        assert self.used() <= self.capacity + 1e-9, f"over-committed: {sorted(self.resident)}"

    async def busy(self, engine) -> int:
        left = self.busy_for.get(engine.endpoint, 0)
        if left:
            self.busy_for[engine.endpoint] = left - 1
        return left

    async def release(self, engine) -> None:
        self.calls.append(("release", engine.endpoint))
        self.resident.discard(engine.endpoint)

    async def resume(self, engine) -> None:
        self.calls.append(("resume", engine.endpoint))
        if self.gate is not None:
            await self.gate.wait()
        self._take(engine.endpoint)

    async def footprint_gib(self, engine) -> float | None:
        return self.sizes[engine.endpoint]


async def started(names_: list[str], control: LedgerControl, **kwargs) -> tuple[Residency, dict[str, Engine]]:
    """Start the models one by one through admit/started, as the supervisor does."""
    engines = {n: Engine(n) for n in names_}
    residency = Residency([Slot(n, (0,), 6.0) for n in names_], engines, control, budget_gib={0: control.capacity},
                          **kwargs)
    for name in names_:
        await residency.admit(engines[name])
        control._take(name)  # the engine loads
        await residency.started(engines[name])
    return residency, engines


def run(coro):
    return asyncio.run(coro)


def test_three_models_on_a_device_that_fits_two_start_with_the_oldest_asleep():
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, engines = await started(["a", "b", "c"], control)
        assert residency.states() == {"a": SLEEPING, "b": RESIDENT, "c": RESIDENT}
        assert residency.state("a") == SLEEPING and control.resident == {"b", "c"}
        assert control.calls == [("release", "a")]
    run(scenario())


def test_requests_alternating_across_three_models_are_all_served_within_the_device():
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, _ = await started(["a", "b", "c"], control)
        served = []
        for i, name in enumerate(["a", "b", "c", "a", "c", "b"] * 3):
            assert await residency.wait_resident(name, 5.0)
            served.append(name)
            residency.leave(name, float(i))
        assert len(served) == 18 and control.peak <= 10.0
        stats = residency.wake_stats()
        assert sum(stats.wakeups.values()) == sum(1 for c in control.calls if c[0] == "resume")
        assert stats.p(50) is not None and stats.p(95) >= stats.p(50)
    run(scenario())


def test_a_burst_for_a_sleeping_model_causes_exactly_one_wake_up():
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, engines = await started(["a", "b", "c"], control)
        control.gate = asyncio.Event()
        waiters = [asyncio.create_task(residency.wait_resident("a", 5.0)) for _ in range(20)]
        while residency.state("a") != "waking":
            await asyncio.sleep(0)
        assert residency.describe()["a"]["state"] == "waking"
        control.gate.set()
        assert all(await asyncio.gather(*waiters))
        assert control.calls.count(("resume", "a")) == 1 and residency.wake_stats().wakeups["a"] == 1
        assert residency.slots["a"].in_flight == 20
    run(scenario())


def test_a_model_with_an_open_request_is_never_released_and_the_waiter_times_out():
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, _ = await started(["a", "b", "c"], control)
        assert residency.enter("b") and residency.enter("c")  # both residents are streaming
        assert not await residency.wait_resident("a", 0.2)  # no room within the deadline: the caller says 503
        assert ("release", "b") not in control.calls and ("release", "c") not in control.calls
        residency.leave("b", 100.0)  # b's stream ends: now a can wake, in b's place
        assert await residency.wait_resident("a", 5.0)
        assert control.resident == {"a", "c"} and ("release", "b") in control.calls
    run(scenario())


def test_a_model_sglang_still_reports_busy_stays_resident_and_another_yields():
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, _ = await started(["a", "b", "c"], control, idle_check_deadline_s=0.0)
        control.busy_for["b"] = 5  # b is the least recently used, but SGLang is still aborting a request
        assert await residency.wait_resident("a", 5.0)
        assert ("release", "b") not in control.calls and control.resident == {"a", "b"}
        assert residency.states()["c"] == SLEEPING
    run(scenario())


def test_a_failed_wake_up_answers_the_waiters_instead_of_hanging():
    class Failing(LedgerControl):
        async def resume(self, engine) -> None:
            raise ControlError("resume answered 500")

    async def scenario():
        control = Failing(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, _ = await started(["a", "b", "c"], control)
        assert not await residency.wait_resident("a", 5.0)
        assert residency.states()["a"] == SLEEPING
    run(scenario())


def test_idle_models_sleep_without_pressure_after_the_threshold():
    async def scenario():
        now = [0.0]
        control = LedgerControl(100.0, {"a": 4.0, "b": 4.0})
        residency, _ = await started(["a", "b"], control, sleep_after_s=60, clock=lambda: now[0])
        residency.enter("b")
        now[0] = 61.0
        assert await residency.sleep_idle() == ["a"]  # b has a request open
        residency.leave("b", 61.0)
        assert await residency.sleep_idle() == []
        now[0] = 130.0
        assert await residency.sleep_idle() == ["b"]
        assert control.resident == set()
    run(scenario())


@pytest.mark.parametrize("order", [["a", "b", "c"], ["c", "a", "b"]])
def test_no_thrash_under_alternating_requests(order):
    """Every wake-up serves a request for its model before that model is put back to sleep."""
    async def scenario():
        control = LedgerControl(10.0, {"a": 4.0, "b": 4.0, "c": 4.0})
        residency, _ = await started(order, control)
        control.calls.clear()

        async def request(name: str, i: int) -> bool:
            if not await residency.wait_resident(name, 5.0):
                return False
            await asyncio.sleep(0)  # the engine answers
            control.calls.append(("served", name))
            residency.leave(name, float(i))
            return True

        assert all(await asyncio.gather(*(request(n, i) for i, n in enumerate(["a", "b", "c"] * 6))))
        assert control.peak <= 10.0
        for i, (call, name) in enumerate(control.calls):
            if call == "resume":
                later = control.calls[i + 1:]
                released = later.index(("release", name)) if ("release", name) in later else len(later)
                assert ("served", name) in later[:released], f"{name} woke and slept again without serving"
    run(scenario())
