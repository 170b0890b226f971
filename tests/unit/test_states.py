"""One type and one writer per state: the engine writes its own, the residency a sharing model's, and a model's state
is composed of the two; the task's outcome keeps ClearML's words."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from app.gateway.model_routes import ModelRoute
from app.serving.engine import Engine
from app.serving.readings import scrape_tokens
from app.serving.residency import Residency, Slot
from app.states import ASLEEP, EngineState, ModelState, Outcome, model_state


def test_every_engine_state_is_the_model_state_of_the_same_name():
    for state in EngineState:
        assert model_state(state) is ModelState(state.value)


def test_where_models_share_gpus_the_residency_state_is_the_models():
    assert model_state(EngineState.RESIDENT, ModelState.SLEEPING) is ModelState.SLEEPING
    assert model_state(EngineState.RESIDENT, ModelState.LOADING) is ModelState.LOADING  # up, not yet measured
    assert ASLEEP == {ModelState.SLEEPING, ModelState.WAKING}


def test_the_outcomes_are_clearmls_words():
    assert [str(o) for o in Outcome] == ["completed", "stopped", "failed"]
    assert Outcome.FAILED == "failed" and f"{Outcome.STOPPED}" == "stopped"


def test_an_engines_state_is_read_only_outside_it():
    assert Engine.state.fset is None


@dataclass(frozen=True)
class FrozenEngine:
    """An engine nobody but itself may write: setting its state raises."""

    endpoint: str
    url: str
    state: EngineState = EngineState.RESIDENT


@dataclass
class Control:
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def busy(self, engine) -> int:
        return 0

    async def release(self, engine) -> None:
        self.calls.append(("release", engine.endpoint))

    async def resume(self, engine) -> None:
        self.calls.append(("resume", engine.endpoint))

    async def footprint_gib(self, engine) -> float | None:
        return 6.0


@dataclass
class Client:
    asked: list[str] = field(default_factory=list)

    async def metrics(self, url: str) -> str:
        self.asked.append(url)
        return ""


def test_a_model_sleeps_and_wakes_while_its_engine_stays_resident():
    async def scenario():
        engines = {n: FrozenEngine(n, f"http://{n}") for n in ("a", "b")}
        residency = Residency([Slot(n, (0,), 6.0) for n in engines], engines, Control(), budget_gib={0: 10.0})
        routes = {n: ModelRoute(n, engine=e, residency=residency) for n, e in engines.items()}
        for name in engines:  # as the supervisor starts them: b takes a's room, and a sleeps
            await residency.admit(engines[name])
            await residency.started(engines[name])
        assert {n: r.state for n, r in routes.items()} == {"a": ModelState.SLEEPING, "b": ModelState.RESIDENT}
        client = Client()
        await scrape_tokens(client, list(engines.values()), residency)  # SGLang is not asked while its model sleeps
        assert client.asked == ["http://b"]
        assert await residency.wait_resident("a", 5.0)
        assert {n: r.state for n, r in routes.items()} == {"a": ModelState.RESIDENT, "b": ModelState.SLEEPING}
        assert all(e.state == EngineState.RESIDENT for e in engines.values())
    asyncio.run(scenario())


def test_a_crash_reaches_the_model_through_the_residency():
    async def scenario():
        engine = FrozenEngine("a", "http://a")
        residency = Residency([Slot("a", (0,), 6.0)], {"a": engine}, Control(), budget_gib={0: 10.0})
        await residency.admit(engine)
        await residency.started(engine)
        residency.engine_changed(FrozenEngine("a", "http://a", EngineState.RESTARTING))
        assert residency.state("a") is ModelState.RESTARTING and not residency.enter("a")
    asyncio.run(scenario())
