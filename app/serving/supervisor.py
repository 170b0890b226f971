"""Every engine of a deployment: started together, restarted when one crashes, stopped together.

Example::

    supervisor = EngineSupervisor([Engine(command) for command in commands])
    await supervisor.start_all()          # EngineStartupError names the likely cause
    ...
    await supervisor.stop_all(grace_s=15)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app.serving.engine import Engine
from app.serving.failures import EngineStartupError, RestartPolicy, classify_failure
from app.states import EngineState

logger = logging.getLogger(__name__)



class EngineSupervisor:
    """Starts every engine, restarts the ones that crash, stops them all.

    `failed` is set (with `failure`) when an engine crashed and could not be brought back within the budget.
    """

    def __init__(
        self,
        engines: list[Engine],
        *,
        startup_deadline_s: float = 1800.0,
        restarts: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[Engine], None] | None = None,
        admit: Callable[[Engine], Awaitable[None]] | None = None,
        on_ready: Callable[[Engine], Awaitable[None]] | None = None,
    ):
        """`admit` (models sharing GPUs): awaited before each start or restart, to make room; engines then start
        one at a time, each alone with the memory it finds. `on_ready`: awaited once each is ready."""
        self.engines = engines
        self._admit = admit
        self._on_ready = on_ready
        self.startup_deadline_s = startup_deadline_s
        self.restarts = restarts
        self.failed = asyncio.Event()
        self.failure: EngineStartupError | None = None
        self._clock = clock
        self._on_change = on_change or (lambda engine: None)
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start_all(self) -> None:
        """Start every engine at once and wait until all are ready; on a failure stop the others and raise."""
        deadline = self._clock() + self.startup_deadline_s
        if self._admit is not None:
            errors = []
            for engine in self.engines:
                if error := await self._start_one(engine, deadline):
                    errors.append(error)
                    break
        else:
            for engine in self.engines:
                await engine.start()
                self._on_change(engine)
            errors = list(await asyncio.gather(*(self._ready(e, deadline) for e in self.engines),
                                               return_exceptions=True))
        errors = [r for r in errors if isinstance(r, BaseException)]
        for engine in self.engines:
            self._on_change(engine)
        if errors:
            await self.stop_all(grace_s=5.0)
            raise errors[0]
        self._watchers = [asyncio.create_task(self._watch(e), name=f"watch-{e.endpoint}") for e in self.engines]

    async def _start_one(self, engine: Engine, deadline: float) -> BaseException | None:
        """Admit, start and wait for one engine; the error instead of raising it (the others are stopped)."""
        try:
            if self._admit is not None:
                await self._admit(engine)
            await engine.start()
            self._on_change(engine)
            await self._ready(engine, deadline)
        except EngineStartupError as exc:
            return exc
        return None

    async def _ready(self, engine: Engine, deadline: float) -> None:
        await engine.wait_ready(deadline)
        if self._on_ready is not None:
            await self._on_ready(engine)

    async def _watch(self, engine: Engine) -> None:
        while True:
            code = await engine.wait_exit()
            if self._stopping:
                return
            now = self._clock()
            engine.crashes.append(now)
            cause = classify_failure(code, engine.tail, engine.evidence)
            delay = self.restarts.delay(engine.crashes, now)
            if delay is None:
                logger.error("Engine %s crashed (exit code %s, %s): %s; no restart left (%d in the last %g min)",
                             engine.endpoint, code, cause.kind, cause.hint, self.restarts.budget,
                             self.restarts.window_s / 60)
                engine.give_up()
                self._on_change(engine)
                window = self.restarts.window_s
                self.failure = EngineStartupError(
                    engine.endpoint, f"crashed {self.restarts.budget + 1} times within {window / 60:g} minutes",
                    cause, code, engine.tail)
                self.failed.set()
                return
            logger.error("Engine %s crashed (exit code %s, %s): %s; restarting in %g s (%s; %d left)",
                         engine.endpoint, code, cause.kind, cause.hint, delay,
                         self.restarts.describe(engine.crashes, now),
                         self.restarts.budget - self.restarts.recent(engine.crashes, now))
            engine.restart_pending()
            self._on_change(engine)
            await engine.reap()  # what the crash left of its process group
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                if self._admit is not None:
                    await self._admit(engine)
                await engine.start(restarting=True)
                self._on_change(engine)
                await self._ready(engine, self._clock() + self.startup_deadline_s)
                logger.info("Engine %s is back (restart %d)", engine.endpoint, engine.restarts)
            except EngineStartupError as exc:
                logger.error("Engine %s did not come back: %s", engine.endpoint, exc)
                await engine.reap(grace_s=5.0)  # so the next round counts it as another crash
            self._on_change(engine)

    def _of(self, endpoint: str) -> list[Engine]:
        """A model's engines: its own, or its replica servers (`<endpoint>/<n>`)."""
        return [e for e in self.engines if e.endpoint == endpoint or e.endpoint.startswith(endpoint + "/")]

    def restarts_of(self, endpoint: str) -> int:
        """How often a model's engines have been restarted (the benchmark at ready reruns a run they cut)."""
        return sum(e.restarts for e in self._of(endpoint))

    async def serving_again(self, endpoint: str, deadline_s: float) -> bool:
        """Until every engine of a model serves (True), or one failed for good, or the deadline passed."""
        return all(await asyncio.gather(*(e.wait_serving(deadline_s) for e in self._of(endpoint))))

    def restarting(self) -> list[str]:
        """`restarting <model> (restart N of M in the last T min)` for each engine coming back from a crash."""
        now = self._clock()
        return [f"restarting {e.endpoint} ({self.restarts.describe(e.crashes, now)})" for e in self.engines
                if e.state == EngineState.RESTARTING]

    async def stop_all(self, grace_s: float) -> None:
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*(e.stop(grace_s) for e in self.engines), return_exceptions=True)
        for engine in self.engines:
            self._on_change(engine)
