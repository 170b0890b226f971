"""Engine supervision: one SGLang server process group per model, watched from start to stop.

`Engine` owns one server: it spawns it in a new session (its own process group), pumps its output line by line to
our log (prefixed by the endpoint name, secrets masked) and into a bounded tail, waits for readiness by probing
SGLang's `/health` under one deadline while watching for the process dying, and stops it with SIGTERM to the
launcher, a grace period, then SIGKILL to the whole group. (SGLang's launcher drains and stops its own children on
SIGTERM; signalling the whole group makes it treat its scheduler as crashed: reference/sglang.md B7.)

Once ready, every SGLang process of the engine (its scheduler, detokenizer and ranks, which SGLang names
`sglang::...`) is watched too: when any of them dies the engine is taken down at once, rather than when SGLang's
launcher gets round to it (it sleeps about 5 s first), so streams end with their error within a second and the
gateway holds new requests from that moment.

`EngineSupervisor` starts every engine, and restarts one that dies after it was ready, with backoff; a model that
crashes more than its budget within the restart window (`RestartPolicy`: a rate, not a lifetime count) fails the
deployment with its cause, read from the evidence (`classify_failure`): SGLang's last log lines, the exit status or
signal, which of its processes died, and the kernel's count of OOM kills.

Example::

    supervisor = EngineSupervisor([Engine(command) for command in commands])
    await supervisor.start_all(deadline_s=600)          # EngineStartupError names the likely cause
    ...
    await supervisor.stop_all(grace_s=15)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable, Container, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from app.engine_launch import SECRET_ARGS_ENV
from app.sglang_command import EngineCommand

logger = logging.getLogger(__name__)

LOADING, RESIDENT, RESTARTING, FAILED, STOPPED = "loading", "resident", "restarting", "failed", "stopped"

# How often readiness is probed; SGLang answers 503 quickly while it loads.
READINESS_PROBE_INTERVAL_SECONDS = 0.5
# One probe may take this long: SGLang's /health runs a one-token generation (its own limit is 20 s).
READINESS_PROBE_TIMEOUT_SECONDS = 25.0
# Lines of engine output kept for error messages.
LOG_TAIL_LINES = 200
# Longest line read from an engine (SGLang prints its whole ServerArgs on one line).
MAX_LOG_LINE_BYTES = 1 << 20
# Restarts after a crash: waits between attempts, and how many crashes within the window are restarted before the
# deployment fails (older crashes are forgotten: a model that crashed five times last month still restarts).
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0, 16.0)
RESTART_BUDGET = 5
RESTART_WINDOW_SECONDS = 3600.0
# How often SGLang's processes are looked at where the kernel cannot tell at once (no pidfd).
MEMBER_POLL_SECONDS = 0.25
# SGLang names its processes `sglang::scheduler`, `sglang::detokenizer`, `sglang::scheduler_TP1`, ... (setproctitle).
MEMBER_PREFIX = "sglang::"

Probe = Callable[[str], Awaitable[bool]]


# ----------------------------------------------------------------------------------------------------------
# failure causes (pure)


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

    def delay(self, crashes: Iterable[float], now: float) -> float | None:
        """Seconds to wait before restarting, given every crash time (this one included); None: give up."""
        recent = sum(1 for t in crashes if now - t < self.window_s)
        if recent > self.budget:
            return None
        return self.backoff_s[min(max(recent, 1), len(self.backoff_s)) - 1]


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


# ----------------------------------------------------------------------------------------------------------
# one engine


async def http_health_probe(url: str) -> bool:
    """True when SGLang's /health answers 200; 503 and connection errors mean "not yet"."""
    timeout = aiohttp.ClientTimeout(total=READINESS_PROBE_TIMEOUT_SECONDS)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url + "/health") as response:
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def call_engine(url: str, method: str, path: str, *, api_key: str | None, timeout_s: float,
                      error: type[Exception], body: dict | None = None, accept: Container[int] = (200,)) -> str:
    """One call to an engine's (or its router's) own API with its key; the answer's text. `error`, naming the call
    and the status or the cause, when it cannot be made or answers a status not in `accept`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, \
                session.request(method, url + path, json=body, headers=headers) as response:
            text = await response.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise error(f"{method} {path} failed: {exc!r}") from exc
    if response.status not in accept:
        raise error(f"{method} {path} answered {response.status}: {text[:300]}")
    return text


class Engine:
    """One SGLang server: `start`, `wait_ready`, `wait_exit`, `stop`. Constructing it starts nothing.

    `state` is written by the engine (loading, resident, failed, stopped) and by its supervisor (restarting);
    `wait_serving` lets the gateway hold a request until a restarting engine serves again."""

    def __init__(
        self,
        command: EngineCommand,
        *,
        probe: Probe = http_health_probe,
        secrets: Iterable[str] = (),
        base_env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
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
        self._members: list[_Member] = []
        self._stopping = False
        self._died: str | None = None  # the SGLang process whose death ended the engine
        self._oom_at_start: int | None = None

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        if value != self._state:
            self._state = value
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

    async def start(self, state: str = LOADING) -> None:
        """Launch the server (`state`: loading, or restarting after a crash, until it is ready)."""
        env = dict(self._base_env if self._base_env is not None else os.environ)
        env.update(self.command.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.exit_code = None
        self.ready_at = None
        self._died = None
        self._stopping = False
        self._oom_at_start = oom_kill_count()
        self._exited.clear()
        self.state = state
        argv = self._launch(env)
        logger.info("Starting engine %s: %s", self.endpoint, self.command.shell_line())
        self._process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True, limit=MAX_LOG_LINE_BYTES)
        self._pump = asyncio.create_task(self._pump_output(self._process), name=f"pump-{self.endpoint}")

    def _launch(self, env: dict[str, str]) -> list[str]:
        """The command to exec, through `app.engine_launch`: the secret flags (the engine's key) are handed over in
        the environment, readable only by this user, instead of on the command line, readable by all; and the
        engine dies with the app rather than outlive it."""
        argv = list(self.command.argv)
        if self.command.secret_args:
            env[SECRET_ARGS_ENV] = json.dumps(dict(self.command.secret_args))
        return [argv[0], "-m", "app.engine_launch", *argv[1:]]

    async def _pump_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        engine_log = logging.getLogger("app.engine." + self.endpoint)
        while True:
            try:
                raw = await process.stdout.readline()
            except ValueError:  # a line longer than the limit: keep going with what follows
                continue
            if not raw:
                break
            line = self._mask(raw.decode("utf-8", "replace").rstrip("\r\n"))
            self._tail.append(line)
            engine_log.info("[%s] %s", self.endpoint, line)
        self._crashed()  # its output ended: the launcher is going
        self.exit_code = await process.wait()
        self._unwatch_members()
        self._exited.set()

    def _mask(self, line: str) -> str:
        for secret in self._secrets:
            if secret in line:
                line = line.replace(secret, "***")
        return line

    async def wait_ready(self, deadline: float) -> None:
        """Probe until ready, the process dies (EngineStartupError) or the deadline passes (the same)."""
        while True:
            if self._exited.is_set():
                raise self._failure("exited before it was ready")
            if await self._probe(self.url):
                self._watch_members()
                self.state = RESIDENT
                self.ready_at = self._clock()
                logger.info("Engine %s is ready at %s", self.endpoint, self.url)
                return
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise self._failure("was not ready before the startup deadline")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._exited.wait(), min(READINESS_PROBE_INTERVAL_SECONDS, remaining))

    def _failure(self, reason: str) -> EngineStartupError:
        self.state = FAILED
        return EngineStartupError(self.endpoint, reason, classify_failure(self.exit_code, self._tail, self.evidence),
                                  self.exit_code, self.tail)

    # ----- SGLang's own processes -----

    def _watch_members(self) -> None:
        """Watch every SGLang process of the engine (`sglang::...`): the kernel tells at once when one ends (a
        pidfd becomes readable), or a poll does where it cannot."""
        self._unwatch_members()
        if self._process is None:
            return
        loop = asyncio.get_running_loop()
        for pid, name in sglang_processes(self._process.pid):
            member = _Member(pid, name)
            try:
                member.fd = os.pidfd_open(pid)
            except (AttributeError, OSError):  # no pidfd (not Linux, or an old kernel), or it is gone already
                member.poll = loop.create_task(self._poll_member(member), name=f"watch-{self.endpoint}-{pid}")
            else:
                loop.add_reader(member.fd, self._member_died, member)
            self._members.append(member)

    async def _poll_member(self, member: _Member) -> None:
        while _alive(member.pid):
            await asyncio.sleep(MEMBER_POLL_SECONDS)
        self._member_died(member)

    def _member_died(self, member: _Member) -> None:
        self._unwatch_members()
        if self._stopping or self._exited.is_set() or self._process is None:
            return
        self._died = f"SGLang's {member.name} process (pid {member.pid})"
        logger.error("Engine %s: %s ended; taking the engine down now (its launcher would only after a pause)",
                     self.endpoint, self._died)
        self._crashed()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._process.pid, signal.SIGKILL)

    def _crashed(self) -> None:
        """A serving engine is going down unasked: from this moment it is restarting (its supervisor restarts it, or
        marks it failed past its restart budget), so readiness says so and requests are held, not sent to it."""
        if self._state == RESIDENT and not self._stopping:
            self.state = RESTARTING

    def _unwatch_members(self) -> None:
        for member in self._members:
            if member.fd is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(member.fd)
                os.close(member.fd)
            if member.poll is not None and member.poll is not asyncio.current_task():
                member.poll.cancel()
        self._members = []

    async def wait_exit(self) -> int | None:
        await self._exited.wait()
        if self._pump is not None:
            await self._pump
        return self.exit_code

    async def stop(self, grace_s: float) -> None:
        """SIGTERM to the launcher, then SIGKILL to the whole group after `grace_s`; reaps everything."""
        await self.reap(grace_s)
        self.state = STOPPED

    async def reap(self, grace_s: float = 0.0) -> None:
        """End the server's processes (SIGTERM to the launcher first when `grace_s`), leaving `state` as it is."""
        process = self._process
        self._stopping = True
        self._unwatch_members()
        if process is None:
            return
        if not self._exited.is_set() and grace_s > 0:
            logger.info("Stopping engine %s (pid %s)", self.endpoint, process.pid)
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._exited.wait(), grace_s)
            except asyncio.TimeoutError:
                logger.warning("Engine %s did not stop within %.0f s: killing its process group", self.endpoint,
                               grace_s)
        # children that outlived the launcher (or a launcher that ignored SIGTERM) go with the group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        await self.wait_exit()


@dataclass
class _Member:
    """One of an engine's SGLang processes, watched."""

    pid: int
    name: str
    fd: int | None = None
    poll: asyncio.Task[None] | None = None


def sglang_processes(launcher: int) -> list[tuple[int, str]]:
    """(pid, name) of the SGLang processes under a launcher: those SGLang names `sglang::...`."""
    found = []
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(launcher).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                name = child.name()
                if name.startswith(MEMBER_PREFIX):
                    found.append((child.pid, name))
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------------------------------------
# every engine


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
                logger.error("Engine %s crashed (exit code %s, %s): %s", engine.endpoint, code, cause.kind, cause.hint)
                engine.state = FAILED
                self._on_change(engine)
                window = self.restarts.window_s
                self.failure = EngineStartupError(
                    engine.endpoint, f"crashed {self.restarts.budget + 1} times within {window / 60:g} minutes",
                    cause, code, engine.tail)
                self.failed.set()
                return
            logger.error("Engine %s crashed (exit code %s, %s): %s; restarting in %g s", engine.endpoint, code,
                         cause.kind, cause.hint, delay)
            engine.restarts += 1
            engine.state = RESTARTING
            self._on_change(engine)
            await engine.reap()  # what the crash left of its process group
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                if self._admit is not None:
                    await self._admit(engine)
                await engine.start(RESTARTING)
                self._on_change(engine)
                await self._ready(engine, self._clock() + self.startup_deadline_s)
                logger.info("Engine %s is back (restart %d)", engine.endpoint, engine.restarts)
            except EngineStartupError as exc:
                logger.error("Engine %s did not come back: %s", engine.endpoint, exc)
                await engine.reap(grace_s=5.0)  # so the next round counts it as another crash
                engine.state = RESTARTING
            self._on_change(engine)

    async def stop_all(self, grace_s: float) -> None:
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*(e.stop(grace_s) for e in self.engines), return_exceptions=True)
        for engine in self.engines:
            self._on_change(engine)
