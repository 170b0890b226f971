"""LoRA adapters loaded on request (`lora.on_request`): any adapter from an allowed source, served on its first
request as `"model": "<endpoint>:<reference>"`.

A reference names its source by its shape (`source_of`, checked before anything is fetched or loaded):
    clearml   32 hex characters              a ClearML Model ID, fetched through the model registry
    hf        org/name                       a HuggingFace repo, fetched into the HF cache (general.hf_token)
    local     /abs/path, or a folder's name  a directory inside one of `lora.on_request_dirs` (symlinks resolved)

`OnRequestAdapters` (one per model) resolves the reference the way configured adapters are resolved
(`app.serving.models`), checks the adapter's files (`inspect`: a PEFT LoRA config, weights, a rank within
`max_lora_rank`), makes room, and asks the engine to load it (SGLang's `/load_lora_adapter`, which clients can never
call: `app.gateway.routes`). Every request that arrives while it loads waits for that one load. At most `loaded_cap`
adapters are loaded, configured ones included: to load another, the least recently used idle one is unloaded
(`room`, a pure policy); one with a request in flight or waiting is never unloaded, and configured adapters never
are. The adapter's name in SGLang is the reference as the request wrote it, so the request is relayed unchanged:
SGLang reads `<endpoint>:<reference>` as the served model and its adapter (docs/sglang.md, "LoRA").

Example::

    adapters = OnRequestAdapters("qwen", lora, engine=EngineAdapters(client, engine), fetch=Fetcher(registry, token))
    lease = await adapters.acquire("/data/adapters/sql-v2")  # loaded, or AdapterRefused saying why not
    ...  # relay the request
    lease.release(now)
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from app.config.types import CLEARML_MODEL_ID, LoraConfig
from app.gateway.adapters import AdapterRefused
from app.gateway.relay import RETRY_AFTER_SECONDS
from app.gateway.stats import percentile
from app.serving.models import ModelNotFound, ModelRegistry, is_hf_repo
from app.sglang.api import AdapterCallError, SGLangClient
from app.states import AdapterState

logger = logging.getLogger(__name__)

CLEARML, HF, LOCAL = "clearml", "hf", "local"
_SOURCE_TEXT = {CLEARML: "ClearML Model IDs", HF: "HuggingFace repos", LOCAL: "the adapter directories"}
MAX_REFERENCE_CHARS = 1024
# An adapter's own name inside an adapter directory.
_FOLDER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
MAX_CONFIG_BYTES = 1024 * 1024
# SGLang's load and unload calls: reading an adapter's weights to the device can take a while on a busy machine.
ENGINE_CALL_TIMEOUT_SECONDS = 600.0
LOAD_SAMPLES = 1000


@dataclass(frozen=True)
class Source:
    kind: str  # clearml | hf | local
    location: str  # the Model ID, the repo name, or the adapter's directory (resolved, inside an allowed one)


def source_of(reference: str, endpoint: str, lora: LoraConfig) -> Source:
    """Where an adapter reference is loaded from, or AdapterRefused saying why it is not: not a reference, a source
    this model does not load on request, a path outside the adapter directories, or no such adapter there."""
    shown = reference[:200]
    kind = _kind(reference)
    if kind is None:
        raise AdapterRefused(400, f"{shown!r} is not an adapter reference: use a ClearML Model ID, an HF repo "
                             "(org/name) or an adapter directory's path", "invalid_adapter_reference")
    allowed = lora.on_request
    if kind not in allowed:
        named = ", ".join(m.name for m in lora.modules) or "none"
        if kind == LOCAL and not reference.startswith("/"):  # a bare name: most likely a configured adapter mistyped
            raise AdapterRefused(404, f"The model {endpoint}:{shown} does not exist: {endpoint!r} has the adapters "
                                 f"{named}", "model_not_found")
        raise AdapterRefused(403, f"{endpoint!r} does not load adapters from {_SOURCE_TEXT[kind]} on request (it "
                             f"loads from: {', '.join(_SOURCE_TEXT[k] for k in allowed)})",
                             "adapter_source_not_allowed")
    if kind == LOCAL:
        return Source(LOCAL, _local_directory(reference, lora.on_request_dirs))
    return Source(kind, reference.lower() if kind == CLEARML else reference)


def _kind(reference: str) -> str | None:
    """The source a reference names by its shape, or None when it is no reference at all."""
    if not reference or len(reference) > MAX_REFERENCE_CHARS or reference != reference.strip() or \
            any(c.isspace() or not c.isprintable() for c in reference):
        return None
    if CLEARML_MODEL_ID.match(reference):
        return CLEARML
    if reference.startswith("/") or _FOLDER_RE.match(reference):
        return LOCAL
    if "/" in reference and is_hf_repo(reference):  # (an adapter's repo always has its owner: org/name)
        return HF
    return None


def _local_directory(reference: str, directories: Iterable[str]) -> str:
    """The adapter's directory, symlinks resolved, strictly inside one of the allowed directories: an absolute path
    is judged before its existence is looked at (nothing is said of paths outside); a name is looked up in each."""
    roots = [os.path.realpath(d) for d in directories]

    def inside(path: str) -> bool:
        return any(path != root and os.path.commonpath([path, root]) == root for root in roots)

    if reference.startswith("/"):
        real = os.path.realpath(reference)
        if not inside(real):
            raise AdapterRefused(403, f"{reference[:200]!r} is outside the adapter directories this model loads "
                                 "from (lora.on_request_dirs)", "adapter_path_not_allowed")
        candidates = [real]
    else:
        candidates = [real for root in roots if inside(real := os.path.realpath(os.path.join(root, reference)))]
    for path in candidates:
        if os.path.isdir(path):
            return path
    raise AdapterRefused(404, f"No adapter {reference[:200]!r} in the adapter directories", "adapter_not_found")


def inspect(path: str, reference: str, max_rank: int | None) -> None:
    """Check an adapter's directory before the engine is asked: a PEFT LoRA config with a rank and target modules,
    its weights, and a rank the engine reserved memory for. AdapterRefused (400) says what is wrong."""
    shown = reference[:200]

    def bad(reason: str, code: str = "invalid_adapter") -> AdapterRefused:
        return AdapterRefused(400, f"The adapter {shown!r} {reason}", code)

    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise bad("has no adapter_config.json: it is not a PEFT LoRA adapter directory")
    try:
        if os.path.getsize(config_path) > MAX_CONFIG_BYTES:
            raise bad("has an adapter_config.json over 1 MiB")
        with open(config_path, encoding="utf-8") as file:
            config: Any = json.load(file)
    except (OSError, ValueError) as exc:
        raise bad(f"has an unreadable adapter_config.json ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise bad("has an adapter_config.json that is not a JSON object")
    rank, targets = config.get("r"), config.get("target_modules")
    if config.get("peft_type", "LORA") != "LORA":
        raise bad(f"is a {str(config.get('peft_type'))[:40]} adapter; only LoRA adapters are served")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1 or not targets:
        raise bad("has an adapter_config.json without a rank (r) and target_modules")
    weights = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not weights:
        raise bad("has no weights (adapter_model.safetensors or adapter_model.bin)")
    if weights[0].endswith(".safetensors") and not _safetensors_intact(weights[0]):
        raise bad("has corrupt weights: adapter_model.safetensors is not a whole safetensors file")
    if max_rank is not None and rank > max_rank:
        raise bad(f"has rank {rank}, above this model's max_lora_rank {max_rank}: the engine reserved memory for "
                  f"ranks up to {max_rank} (raise lora.max_lora_rank and restart to serve it)", "adapter_incompatible")


def _safetensors_intact(path: str) -> bool:
    """The file is what the safetensors format says: an 8-byte little-endian header length, a JSON header, and
    every tensor's data within the file (github.com/huggingface/safetensors, "Format")."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if length < 2 or 8 + length > size or length > MAX_CONFIG_BYTES * 100:
                return False
            header = json.loads(file.read(length))
    except (OSError, ValueError):
        return False
    if not isinstance(header, dict):
        return False
    data = size - 8 - length
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            return False
    return True


@dataclass(eq=False)
class Entry:
    """An adapter loaded (or loading) on request, and the requests that hold it."""

    name: str
    state: AdapterState
    last_used: float
    in_use: int = 0  # requests waiting for it or in flight with it
    ready: asyncio.Future[None] | None = field(default=None, repr=False)

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


@dataclass(frozen=True)
class AdapterReport:
    """What one report says of adapters on request: the loads so far, and each adapter loaded or loading now
    (`<endpoint>:<reference>` -> its state)."""

    stats: AdapterStats
    endpoints: tuple[str, ...]  # the models that load adapters on request
    states: dict[str, str]

    @classmethod
    def of(cls, adapters: dict[str, OnRequestAdapters], stats: AdapterStats) -> AdapterReport:
        states = {f"{endpoint}:{name}": state for endpoint, model in adapters.items() for name, state in model.cards()}
        return cls(stats, tuple(adapters), states)


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

    def __init__(self, endpoint: str, lora: LoraConfig, *, engine: AdapterEngine, fetch: Callable[[Source], str],
                 stats: AdapterStats | None = None, clock: Callable[[], float] = time.monotonic):
        self.endpoint, self.lora, self.engine, self.fetch = endpoint, lora, engine, fetch
        self.stats = stats if stats is not None else AdapterStats()
        self.clock = clock
        self._configured = frozenset(m.name for m in lora.modules)
        self._entries: dict[str, Entry] = {}
        self._engine_lock = asyncio.Lock()  # one load or unload at a time (SGLang serialises them too)
        self._loads: set[asyncio.Task[None]] = set()

    def configured(self, name: str) -> bool:
        return name in self._configured

    def cards(self) -> list[tuple[str, str]]:
        return [(e.name, str(e.state)) for e in sorted(self._entries.values(), key=lambda e: e.last_used)]

    async def acquire(self, reference: str) -> Entry:
        entry = self._entries.get(reference)
        if entry is None:
            source = source_of(reference, self.endpoint, self.lora)
            entry = Entry(reference, AdapterState.LOADING, self.clock(),
                          ready=asyncio.get_running_loop().create_future())
            entry.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, even if none waits
            self._entries[reference] = entry
            task = asyncio.create_task(self._load(entry, source), name=f"load-adapter-{self.endpoint}")
            self._loads.add(task)
            task.add_done_callback(self._loads.discard)
        entry.in_use += 1
        try:
            if entry.ready is not None and not entry.ready.done():
                await asyncio.shield(entry.ready)
            elif entry.ready is not None:
                entry.ready.result()  # a load that failed: its refusal
        except BaseException:
            entry.in_use -= 1
            raise
        entry.last_used = self.clock()
        return entry

    def forget(self) -> None:
        """The engine restarted with its configured adapters only: every adapter loaded on request is gone."""
        if self._entries:
            logger.info("Model %s restarted: its %d adapter(s) loaded on request load again on their next request",
                        self.endpoint, len(self._entries))
        for entry in self._entries.values():
            if entry.ready is not None and not entry.ready.done():
                entry.ready.set_exception(AdapterRefused(
                    503, f"Model {self.endpoint!r} restarted while the adapter loaded; retry shortly",
                    "engine_restarted"))
        self._entries.clear()

    async def _load(self, entry: Entry, source: Source) -> None:
        started = self.clock()
        assert entry.ready is not None
        try:
            logger.info("Loading adapter %s:%s on request (%s)", self.endpoint, entry.name, source.kind)
            path = await asyncio.to_thread(self.fetch, source)
            inspect(path, entry.name, self.lora.max_lora_rank)
            async with self._engine_lock:
                self._check_room(entry)
                reason = await self.engine.load(entry.name, path)
                if reason is not None:
                    raise AdapterRefused(400, f"The engine could not load the adapter {entry.name[:200]!r}: "
                                         f"{_first_line(reason)}", "adapter_load_failed")
                entry.state = AdapterState.LOADED
                await self._make_room(entry)
        except AdapterRefused as refused:
            self._failed(entry, refused)
            return
        except (AdapterCallError, OSError) as exc:
            logger.warning("Loading adapter %s:%s failed: %s", self.endpoint, entry.name, exc)
            self._failed(entry, AdapterRefused(
                503, f"Model {self.endpoint!r} could not be asked to load the adapter; retry shortly",
                "engine_unavailable", retry_after_s=RETRY_AFTER_SECONDS))
            return
        if self._entries.get(entry.name) is not entry or entry.ready.done():
            return  # forgotten meanwhile (the engine restarted)
        took_ms = (self.clock() - started) * 1000
        self.stats.loads[self.endpoint] += 1
        self.stats.load_ms.append(took_ms)
        logger.info("Adapter %s:%s loaded in %.0f ms", self.endpoint, entry.name, took_ms)
        entry.ready.set_result(None)

    def _failed(self, entry: Entry, refused: AdapterRefused) -> None:
        logger.info("Adapter %s:%s not loaded: %s", self.endpoint, entry.name, refused.message)
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
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
            raise AdapterRefused(503, f"All {self.lora.loaded_cap} adapter slots of {self.endpoint!r} hold adapters "
                                 "with requests in flight; retry shortly", "adapter_slots_busy",
                                 retry_after_s=RETRY_AFTER_SECONDS)

    async def _make_room(self, entry: Entry) -> None:
        """After a load: back within the cap, unloading the least recently used idle adapters (those that turned
        busy meanwhile stay, one over the cap at most, until the next load)."""
        now = self.clock()
        for victim in self._room(entry)[1]:
            del self._entries[victim.name]
            reason = await self.engine.unload(victim.name)
            if reason is not None:
                logger.warning("Unloading adapter %s:%s failed: %s", self.endpoint, victim.name, _first_line(reason))
            else:
                logger.info("Unloaded adapter %s:%s (least recently used, idle %.0f s) to make room for %s",
                            self.endpoint, victim.name, now - victim.last_used, entry.name)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no reason given"


class Fetcher:
    """Adapter sources to local directories, the way configured adapters are fetched: ClearML Model IDs through the
    model registry (the SDK logs its download), HF repos into the HF cache with the deployment's token. Blocking:
    `OnRequestAdapters` runs it in a thread."""

    def __init__(self, registry: ModelRegistry, hf_token: str = ""):
        self.registry = registry
        self._hf_token = hf_token

    def __call__(self, source: Source) -> str:
        if source.kind == LOCAL:
            return source.location
        started = time.monotonic()
        path = self._clearml(source.location) if source.kind == CLEARML else self._hf(source.location)
        logger.info("Fetched adapter %s in %.1f s", source.location, time.monotonic() - started)
        return adapter_root(path)

    def _clearml(self, model_id: str) -> str:
        try:
            return self.registry.get_local_copy(model_id)
        except ModelNotFound as exc:
            raise AdapterRefused(404, f"ClearML model {model_id} was not found ({exc})", "adapter_not_found") from None
        except OSError as exc:  # (the cause names storage the client need not see: it goes to the console)
            logger.warning("ClearML model %s could not be downloaded: %s", model_id, exc.strerror or exc)
            raise AdapterRefused(502, f"ClearML model {model_id} could not be downloaded; the deployment's console "
                                 "says why", "adapter_download_failed") from None

    def _hf(self, repo: str) -> str:
        try:
            import huggingface_hub
            from huggingface_hub import errors
        except ImportError:  # (the engine install has it: SGLang needs it)
            raise AdapterRefused(502, "huggingface_hub is not installed here", "adapter_download_failed") from None
        logger.info("Fetching adapter %s from HuggingFace", repo)
        try:
            return huggingface_hub.snapshot_download(repo, token=self._hf_token or None)
        except errors.GatedRepoError:
            raise AdapterRefused(403, f"The HuggingFace repo {repo} is gated: general.hf_token needs access to it",
                                 "adapter_not_allowed") from None
        except errors.RepositoryNotFoundError:
            raise AdapterRefused(404, f"The HuggingFace repo {repo} was not found (or is private: set "
                                 "general.hf_token)", "adapter_not_found") from None
        except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as exc:
            raise AdapterRefused(502, f"The HuggingFace repo {repo} could not be downloaded ({type(exc).__name__})",
                                 "adapter_download_failed") from None


def adapter_root(path: str) -> str:
    """The directory holding adapter_config.json: the path itself, or the one folder a registry's archive unpacked
    into."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        inner = [e.path for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]
        if len(inner) == 1 and os.path.isfile(os.path.join(inner[0], "adapter_config.json")):
            return inner[0]
    return path
