"""One SGLang server process group, watched from start to stop; its `EngineState` is written here only.

`Engine` spawns the server in a new session (its own process group) through `app.sglang.launch`, pumps its output
line by line to our log (prefixed by the endpoint name, secrets masked) and into a bounded tail, reads its startup
phases from it (`app.serving.startup`), waits for readiness (SGLang's "ready to roll" line, or its `/health`) under
one deadline while watching for the process dying, and stops it with SIGTERM to
the launcher, a grace period, then SIGKILL to the whole group. (SGLang's launcher drains and stops its own children
on SIGTERM; signalling the whole group makes it read its scheduler's exit as a crash: docs/sglang.md, "Stopping".)

Once ready, every SGLang process of the engine (its scheduler, detokenizer and ranks, which SGLang names
`sglang::...`) is watched too (`app.serving.processes`): when any of them dies the engine is taken down at once,
rather than when SGLang's launcher gets round to it (its watchdog looks once a second, then it tears down), so
streams end with their error within a second and the gateway holds new requests from that moment.

Its supervisor (`app.serving.supervisor`) restarts it when it crashes (`restart_pending`, then `start`) or gives up
(`give_up`); why it crashed is read from the evidence it leaves (`app.serving.failures`). Where models share GPUs a
model may sleep while its engine stays resident: what requests find is the residency's (`app.states.model_state`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable

from app.serving.failures import CrashEvidence, EngineStartupError, classify_failure, oom_kill_count
from app.serving.processes import Member, MemberWatch, end_group, kill_group, sglang_processes
from app.serving.startup import EnginePhases, OnPhase
from app.sglang.api import http_health_probe
from app.sglang.command import EngineCommand
from app.sglang.launch import SECRET_ARGS_ENV, engine_environment
from app.sglang.logs import ConsoleLevels, Phase
from app.states import EngineState

logger = logging.getLogger(__name__)

LOADING, RESIDENT, RESTARTING, FAILED, STOPPED = (EngineState.LOADING, EngineState.RESIDENT, EngineState.RESTARTING,
                                                  EngineState.FAILED, EngineState.STOPPED)

# How often readiness is probed; SGLang answers 503 quickly while it loads.
READINESS_PROBE_INTERVAL_SECONDS = 0.5
# Lines of engine output kept for error messages.
LOG_TAIL_LINES = 200
# Longest line read from an engine (SGLang prints its whole ServerArgs on one line).
MAX_LOG_LINE_BYTES = 1 << 20

Probe = Callable[[str], Awaitable[bool]]


class Engine:
    """One SGLang server: `start`, `wait_ready`, `wait_exit`, `stop`. Constructing it starts nothing.

    `state` is read-only outside: the engine writes it as it starts, becomes ready, crashes or stops, and when its
    supervisor asks (`restart_pending`, `give_up`); `wait_serving` lets the gateway hold a request until a restarting
    engine serves again."""

    def __init__(
        self,
        command: EngineCommand,
        *,
        probe: Probe = http_health_probe,
        secrets: Iterable[str] = (),
        base_env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_phase: OnPhase | None = None,
    ):
        """`on_phase(endpoint, phase, left)`: each startup phase as the engine's output shows it, and the one it left
        with its time (`app.serving.startup`)."""
        self.command = command
        self.endpoint = command.endpoint
        self.url = f"http://127.0.0.1:{command.port}"
        self._state = STOPPED
        self._changed = asyncio.Event()
        self.exit_code: int | None = None
        self.ready_at: float | None = None
        self.restarts = 0
        self.crashes: list[float] = []  # when it crashed (the supervisor's restart policy reads them)
        self._probe = probe
        self._secrets = [s for s in (*secrets, command.api_key or "", *command.secret_args.values()) if s]
        self._base_env = base_env
        self._clock = clock
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._process: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._exited = asyncio.Event()
        self._members = MemberWatch(self.endpoint, self._member_died)
        self._stopping = False
        self._died: str | None = None  # the SGLang process whose death ended the engine
        self._oom_at_start: int | None = None
        self.phases = EnginePhases(self.endpoint, clock, on_phase)
        self._said_ready = asyncio.Event()  # SGLang printed "ready to roll", after its own warmup request

    @property
    def state(self) -> EngineState:
        return self._state

    def _set(self, state: EngineState) -> None:
        if state != self._state:
            self._state = state
            self._changed.set()  # wakes every waiter; they wait on a fresh event next time
            self._changed = asyncio.Event()

    async def wait_serving(self, deadline_s: float) -> bool:
        """Wait until the engine is resident again (True), or has failed or stopped for good, or `deadline_s`
        passed (False)."""
        end = time.monotonic() + deadline_s
        while self._state != RESIDENT:
            remaining = end - time.monotonic()
            if self._state in (FAILED, STOPPED) or remaining <= 0:
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def tail(self) -> list[str]:
        return list(self._tail)

    @property
    def running(self) -> bool:
        return self._process is not None and not self._exited.is_set()

    @property
    def evidence(self) -> CrashEvidence:
        """What is known of how the engine ended, besides its exit status and log."""
        now = oom_kill_count()
        before = self._oom_at_start
        return CrashEvidence(self._died, None if now is None or before is None else now - before)

    def restart_pending(self) -> None:
        """It crashed and will be started again: restarting until it is ready."""
        self.restarts += 1
        self._set(RESTARTING)

    def give_up(self) -> None:
        """It crashed once too often: failed for good."""
        self._set(FAILED)

    async def start(self, restarting: bool = False) -> None:
        """Launch the server: loading (or still restarting, after a crash) until it is ready."""
        state = RESTARTING if restarting else LOADING
        env = engine_environment(self._base_env if self._base_env is not None else os.environ, self.command.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.exit_code = None
        self.ready_at = None
        self._died = None
        self._stopping = False
        self._oom_at_start = oom_kill_count()
        self._exited.clear()
        self._said_ready.clear()
        self._set(state)
        argv = launch_argv(self.command, env)
        logger.info("Starting engine %s on port %d (its command line in debug mode)", self.endpoint, self.command.port)
        logger.debug("Engine %s: %s", self.endpoint, self.command.shell_line())
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, limit=MAX_LOG_LINE_BYTES)
        self.phases.spawned()
        self._pump = asyncio.create_task(self._pump_output(self._process), name=f"pump-{self.endpoint}")

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        engine_log = logging.getLogger("app.serving.engine." + self.endpoint)
        levels = ConsoleLevels()
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the limit: keep going with what follows
                continue
            if not raw:
                break
            line = masked(raw.decode("utf-8", "replace").rstrip("\r\n"), self._secrets)
            self._tail.append(line)
            if self.phases.saw(line) == Phase.READY:
                self._said_ready.set()
            level, shown = levels.classify(line)  # what an operator needs at info level; the rest in debug mode
            engine_log.log(level, "[%s] %s", self.endpoint, shown)
        self._crashed()  # its output ended: the launcher is going
        self.exit_code = await process.wait()
        self._members.close()
        self._exited.set()

    async def wait_ready(self, deadline: float) -> None:
        """Probe until ready, the process dies (EngineStartupError) or the deadline passes (the same)."""
        while True:
            if self._exited.is_set():
                raise self._failure("exited before it was ready")
            if self._said_ready.is_set() or await self._probe(self.url):  # (SGLang's /health takes a second)
                if self._process is not None:  # (/proc is read off the loop: on a busy machine it takes a while)
                    self._members.watch(await asyncio.to_thread(sglang_processes, self._process.pid))
                self._set(RESIDENT)
                self.ready_at = self._clock()
                logger.info("Engine %s is ready at %s", self.endpoint, self.url)
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._failure("was not ready before the startup deadline")
            await first_of((self._exited, self._said_ready), min(READINESS_PROBE_INTERVAL_SECONDS, remaining))

    def _failure(self, reason: str) -> EngineStartupError:
        if self._state != RESTARTING:  # (a restart that fails is its supervisor's to judge)
            self._set(FAILED)
        return EngineStartupError(self.endpoint, reason, classify_failure(self.exit_code, self._tail, self.evidence),
                                  self.exit_code, self.tail)

    # ----- SGLang's own processes -----

    def _member_died(self, member: Member) -> None:
        """One of SGLang's processes ended (`app.serving.processes.MemberWatch`): take the engine down now."""
        if self._stopping or self._exited.is_set() or self._process is None:
            return
        self._died = f"SGLang's {member.name} process (pid {member.pid})"
        logger.error("Engine %s: %s ended; taking the engine down now (its launcher would only after a pause)",
                     self.endpoint, self._died)
        self._crashed()
        kill_group(self._process.pid)

    def _crashed(self) -> None:
        """A serving engine is going down unasked: from this moment it is restarting (its supervisor restarts it, or
        marks it failed past its restart budget), so readiness says so and requests are held, not sent to it."""
        if self._state == RESIDENT and not self._stopping:  # (serving, or its model asleep)
            self._set(RESTARTING)

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        if self._pump is not None:
            await self._pump
        return self.exit_code

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the launcher, then SIGKILL to the whole group after `grace_s`; reaps everything."""
        await self.reap(grace_s)
        self._set(STOPPED)

    async def reap(self, grace_s: float = 0.0) -> None:
        """End the server's processes (SIGTERM to the launcher first when `grace_s`), leaving `state` as it is."""
        process = self._process
        self._stopping = True
        self._members.close()
        if process is None:
            return
        await end_group(self.endpoint, process, self._exited, grace_s)
        await self.wait_exit()


def launch_argv(command: EngineCommand, env: dict[str, str]) -> list[str]:
    """The command to exec, through `app.sglang.launch`: the secret flags (the engine's key) are handed over in `env`,
    readable only by this user, instead of on the command line, readable by all; and the engine dies with the app
    rather than outlive it."""
    argv = list(command.argv)
    if command.secret_args:
        env[SECRET_ARGS_ENV] = json.dumps(dict(command.secret_args))
    return [argv[0], "-m", "app.sglang.launch", *argv[1:]]


def masked(line: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in line:
            line = line.replace(secret, "***")
    return line


async def first_of(events: Iterable[asyncio.Event], timeout: float) -> None:
    """Until one of the events is set, or `timeout` seconds."""
    waits = [asyncio.ensure_future(event.wait()) for event in events]
    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for waiting in waits:
        waiting.cancel()
