"""LoRA adapters loaded on request (`lora.on_request`): any adapter from an allowed source, served on its first
request as `"model": "<endpoint>:<reference>"`.

A reference names its source by its shape, and is refused before anything is looked up if it names no allowed one
(`app.serving.adapter_references`); an adapter is one adapter however it is spelled (`/dir/one`, `/dir//one/` and
`one` are one load, listed and loaded in the engine under one name), and a request that spells it otherwise is
relayed with that name.

`OnRequestAdapters` (one per model) identifies the reference, fetches and checks the adapter's files off the event
loop, within their budgets (`app.serving.adapter_files`), makes room, and asks the engine to load it (SGLang's
`/load_lora_adapter`, which clients can never call: `app.gateway.routes`). Every request that arrives while it loads
waits for that one load, at most `ADAPTER_LOAD_DEADLINE_SECONDS` (refused past it). Whatever goes wrong in a load
ends it with a refusal and leaves nothing behind; a refusal names its reason (`app.gateway.adapters.Refusal`), which
the gateway answers in HTTP. At most `loaded_cap` adapters are loaded, configured ones included: to
load another, the least recently used idle one is unloaded (`room`, a pure policy); one with a request in flight or
waiting is never unloaded, and configured adapters never are.

Example::

    adapters = OnRequestAdapters("qwen", lora, engine=EngineAdapters(client, engine), fetch=Fetcher(registry, token))
    lease = await adapters.acquire("/data/adapters/sql-v2")  # loaded, or AdapterRefused saying why not
    ...  # relay the request (as `lease.name`)
    lease.release(now)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.config.types import LoraConfig
from app.gateway.adapters import AdapterRefused, Refusal
from app.serving.adapter_files import Fetched, base_config, inspect, max_weight_bytes
from app.serving.adapter_references import LOCAL, Identity, Source, identify, source_of
from app.sglang.api import AdapterCallError, SGLangClient
from app.states import AdapterState
from app.statistics import percentile

logger = logging.getLogger(__name__)

# A load (fetching, the checks, the engine's own load) that takes longer is given up: its requests get 504, and
# the engine is told to drop the adapter if it was asked for it. Time enough to download a large adapter.
ADAPTER_LOAD_DEADLINE_SECONDS = 300.0
# SGLang's unload call (a load is within the deadline above).
ENGINE_CALL_TIMEOUT_SECONDS = 600.0
# Spellings remembered to find their adapter without looking at the disk again; past this many they are forgotten.
MAX_SPELLINGS = 4096
LOAD_SAMPLES = 1000


@dataclass(eq=False)
class Entry:
    """An adapter loaded (or loading) on request, and the requests that hold it."""

    name: str
    state: AdapterState
    last_used: float
    in_use: int = 0  # requests waiting for it or in flight with it
    ready: asyncio.Future[None] | None = field(default=None, repr=False)
    key: str = ""  # (Identity.key)

    def release(self, now: float) -> None:
        self.in_use -= 1
        self.last_used = now


def room(loaded: Iterable[Entry], cap: int, configured: int) -> tuple[int, list[Entry]]:
    """For one more adapter to fit within `cap` (configured ones count, and are never unloaded): how many loaded on
    request must be unloaded, and the least recently used idle ones that may be (at most that many)."""
    loaded = [e for e in loaded if e.state == AdapterState.LOADED]
    excess = max(0, configured + len(loaded) + 1 - cap)
    idle = sorted((e for e in loaded if e.in_use == 0), key=lambda e: e.last_used)
    return excess, idle[:excess]


@dataclass
class AdapterStats:
    """What the dashboard shows of adapters loaded on request: loads per model and how long each took."""

    loads: collections.Counter[str] = field(default_factory=collections.Counter)
    load_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LOAD_SAMPLES))

    def p(self, q: float) -> float | None:
        return percentile(list(self.load_ms), q) if self.load_ms else None


class AdapterEngine(Protocol):
    """The engine's LoRA API: None when done, else the engine's reason; AdapterCallError when it cannot be asked."""

    async def load(self, name: str, path: str) -> str | None: ...

    async def unload(self, name: str) -> str | None: ...


class EngineAdapters:
    """An engine's LoRA API through the deployment's SGLang client, with the engine's own key."""

    def __init__(self, client: SGLangClient, url: str, api_key: str | None):
        self.client, self.url, self.api_key = client, url, api_key

    async def load(self, name: str, path: str) -> str | None:
        return await self.client.load_lora_adapter(self.url, self.api_key, name, path, ENGINE_CALL_TIMEOUT_SECONDS)

    async def unload(self, name: str) -> str | None:
        return await self.client.unload_lora_adapter(self.url, self.api_key, name, ENGINE_CALL_TIMEOUT_SECONDS)


class OnRequestAdapters:
    """One model's adapters on request; see the module's docstring. Lives on the gateway's event loop."""

    def __init__(self, endpoint: str, lora: LoraConfig, *, engine: AdapterEngine, fetch: Callable[..., Fetched],
                 base_model: str = "", stats: AdapterStats | None = None, clock: Callable[[], float] = time.monotonic,
                 load_deadline_s: float = ADAPTER_LOAD_DEADLINE_SECONDS):
        """`base_model`: the model's path or repo, whose config.json bounds what an adapter's weights may weigh."""
        self.endpoint, self.lora, self.engine, self.fetch = endpoint, lora, engine, fetch
        self.base_model = base_model
        self.stats = stats if stats is not None else AdapterStats()
        self.clock = clock
        self.load_deadline_s = load_deadline_s
        self._configured = frozenset(m.name for m in lora.modules)
        self._entries: dict[str, Entry] = {}  # by Identity.key
        self._spellings: dict[str, Entry] = {}  # a reference as written -> its adapter
        self._engine_lock = asyncio.Lock()  # one load or unload at a time (SGLang serialises them too)
        self._tasks: set[asyncio.Task[None]] = set()
        self._base: dict[str, Any] | None = None
        self._base_read = False

    def configured(self, name: str) -> bool:
        return name in self._configured

    def cards(self) -> list[tuple[str, AdapterState]]:
        return [(e.name, e.state) for e in sorted(self._entries.values(), key=lambda e: e.last_used)]

    def loaded(self, name: str) -> bool:
        return any(e.name == name and e.state == AdapterState.LOADED for e in self._entries.values())

    def hold(self, name: str) -> Entry | None:
        """A lease on the adapter loaded on request under `name`, for a request that names it otherwise than by its
        model (SGLang's `lora_path`); None when none is loaded under it (nothing is loaded for such a request)."""
        entry = next((e for e in self._entries.values() if e.name == name and e.state == AdapterState.LOADED), None)
        if entry is not None:
            entry.in_use += 1
            entry.last_used = self.clock()
        return entry

    async def acquire(self, reference: str) -> Entry:
        entry = self._spellings.get(reference)
        if entry is None or self._entries.get(entry.key) is not entry:
            source = source_of(reference, self.endpoint, self.lora)
            identity = await asyncio.to_thread(identify, source, self.lora) if source.kind == LOCAL else \
                identify(source, self.lora)
            entry = self._entries.get(identity.key) or self._start(identity, source)
            if len(self._spellings) >= MAX_SPELLINGS:
                self._spellings.clear()
            self._spellings[reference] = entry
        entry.in_use += 1
        try:
            assert entry.ready is not None
            if not entry.ready.done():  # (the load ends it, whatever happens; the bound is a second line)
                await asyncio.wait_for(asyncio.shield(entry.ready), self.load_deadline_s + 10)
            entry.ready.result()  # a load that failed: its refusal
        except asyncio.TimeoutError:
            entry.in_use -= 1
            raise self._timed_out(entry) from None
        except BaseException:
            entry.in_use -= 1
            raise
        entry.last_used = self.clock()
        return entry

    def _start(self, identity: Identity, source: Source) -> Entry:
        entry = Entry(identity.name, AdapterState.LOADING, self.clock(), key=identity.key,
                      ready=asyncio.get_running_loop().create_future())
        entry.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even if none waits
        self._entries[identity.key] = entry
        self._background(self._load(entry, source, identity), f"load-adapter-{self.endpoint}")
        return entry

    def _background(self, work: Any, name: str) -> None:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self) -> None:
        """The engine restarted with its configured adapters only: every adapter loaded on request is gone."""
        if self._entries:
            logger.info("Model %s restarted: its %d adapter(s) loaded on request load again on their next request",
                        self.endpoint, len(self._entries))
        for entry in self._entries.values():
            if entry.ready is not None and not entry.ready.done():
                entry.ready.set_exception(AdapterRefused(Refusal.ENGINE_RESTARTED, f"Model {self.endpoint!r} "
                                                         "restarted while the adapter loaded; retry shortly"))
        self._entries.clear()
        self._spellings.clear()

    async def _load(self, entry: Entry, source: Source, identity: Identity) -> None:
        started = self.clock()
        assert entry.ready is not None
        asked = False  # the engine was asked to load it: it may hold it, whatever became of the call
        try:
            async with asyncio.timeout(self.load_deadline_s):
                logger.info("Loading adapter %s:%s on request (%s)", self.endpoint, entry.name, source.kind)
                path = await self._checked_files(entry.name, source, identity)
                async with self._engine_lock:
                    self._check_room(entry)
                    asked = True
                    reason = await self.engine.load(entry.name, path)
                    if reason is not None:
                        raise AdapterRefused(Refusal.ENGINE_REFUSED, f"The engine could not load the adapter "
                                             f"{entry.name[:200]!r}: {_first_line(reason)}")
                    entry.state = AdapterState.LOADED
            async with self._engine_lock:
                await self._make_room(entry)
        except AdapterRefused as refused:
            self._failed(entry, refused)
            return
        except TimeoutError:
            if asked and entry.state != AdapterState.LOADED:  # (it may load after all: the engine is told to drop it)
                self._background(self._unload(entry.name, "its load was given up"), f"unload-adapter-{self.endpoint}")
            self._failed(entry, self._timed_out(entry))
            return
        except (AdapterCallError, OSError) as exc:
            logger.warning("Loading adapter %s:%s failed: %s", self.endpoint, entry.name, exc)
            self._failed(entry, AdapterRefused(Refusal.ENGINE_UNREACHABLE, f"Model {self.endpoint!r} could not be "
                                               "asked to load the adapter; retry shortly"))
            return
        except Exception:  # (a load always ends, and says so: never a request left waiting)
            logger.exception("Loading adapter %s:%s failed", self.endpoint, entry.name)
            self._failed(entry, AdapterRefused(Refusal.LOAD_FAILED, f"The adapter {entry.name[:200]!r} could not be "
                                               "loaded; the deployment's console says why"))
            return
        if self._entries.get(entry.key) is not entry or entry.ready.done():
            return  # forgotten meanwhile (the engine restarted)
        took_ms = (self.clock() - started) * 1000
        self.stats.loads[self.endpoint] += 1
        self.stats.load_ms.append(took_ms)
        logger.info("Adapter %s:%s loaded in %.0f ms", self.endpoint, entry.name, took_ms)
        entry.ready.set_result(None)

    async def _checked_files(self, name: str, source: Source, identity: Identity) -> str:
        """The adapter's directory, fetched first where it is not local, its files checked within their budgets (off
        the event loop)."""
        base = await self._base_config()
        path, roots = identity.path, self.lora.on_request_dirs
        if path is None:
            bound = max_weight_bytes(base, self.lora.max_lora_rank) if base and self.lora.max_lora_rank else None
            fetched = await asyncio.to_thread(self.fetch, source.kind, source.location, bound)
            path, roots = fetched.path, (fetched.root,)
        await asyncio.to_thread(inspect, path, name, self.lora.max_lora_rank, roots, base)
        return path

    async def _base_config(self) -> dict[str, Any] | None:
        if not self._base_read and self.base_model:
            self._base = await asyncio.to_thread(base_config, self.base_model)
            self._base_read = True
        return self._base

    def _timed_out(self, entry: Entry) -> AdapterRefused:
        return AdapterRefused(Refusal.TIMED_OUT,
                              f"The adapter {entry.name[:200]!r} did not load within {self.load_deadline_s:g} s")

    def _failed(self, entry: Entry, refused: AdapterRefused) -> None:
        logger.info("Adapter %s:%s not loaded: %s", self.endpoint, entry.name, refused.message)
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        assert entry.ready is not None
        if not entry.ready.done():
            entry.ready.set_exception(refused)

    def _room(self, entry: Entry) -> tuple[int, list[Entry]]:
        return room((e for e in self._entries.values() if e is not entry), self.lora.loaded_cap,
                    len(self._configured))

    def _check_room(self, entry: Entry) -> None:
        """Before a load: room can be made (the engine is given one slot more than the cap, so a new adapter loads
        first and the least recently used goes once it has: a load that fails costs no other adapter)."""
        needed, idle = self._room(entry)
        if len(idle) < needed:
            raise AdapterRefused(Refusal.SLOTS_BUSY, f"All {self.lora.loaded_cap} adapter slots of {self.endpoint!r} "
                                 "hold adapters with requests in flight; retry shortly")

    async def _make_room(self, entry: Entry) -> None:
        """After a load: back within the cap, unloading the least recently used idle adapters (those that turned
        busy meanwhile stay, one over the cap at most, until the next load)."""
        now = self.clock()
        for victim in self._room(entry)[1]:
            del self._entries[victim.key]
            await self._unload(victim.name, f"least recently used, idle {now - victim.last_used:.0f} s, to make room "
                               f"for {entry.name}", locked=True)

    async def _unload(self, name: str, why: str, locked: bool = False) -> None:
        if not locked:
            async with self._engine_lock:
                return await self._unload(name, why, locked=True)
        reason = await self.engine.unload(name)
        if reason is not None:
            logger.warning("Unloading adapter %s:%s failed: %s", self.endpoint, name, _first_line(reason))
        else:
            logger.info("Unloaded adapter %s:%s (%s)", self.endpoint, name, why)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no reason given"
