"""LoRA adapters loaded on request, as the gateway sees them: a model may load the adapter a request names before it
is relayed (`app.serving.adapters` does the loading); the request holds its adapter until it ends, so the adapter
cannot be unloaded under it.

A request for `"model": "<endpoint>:<reference>"`, where the reference is not one of the model's configured adapters,
asks the model's `AdapterLoader` for a lease; the loader answers with one (the adapter is loaded, every request that
arrived meanwhile shared the one load) or refuses with the reason (`AdapterRefused`, with a `Refusal`: the loader
says why in its own words, and the gateway answers each reason with its status and code in the one error shape:
4xx, 502 or 504 for a load that failed or took too long, 503 while every adapter slot is busy).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import Protocol

from app.gateway.bodies import lora_paths, with_model
from app.gateway.errors import Reply, error_reply
from app.gateway.messages import Request
from app.gateway.relay import RETRY_AFTER_SECONDS, Target, failed_before_answering
from app.states import AdapterState


class Refusal(enum.Enum):
    """Why an adapter is not served."""

    NOT_A_REFERENCE = "not an adapter reference"
    NO_SUCH_MODEL = "no such model or adapter"  # (a name that is no reference and no configured adapter)
    SOURCE_NOT_ALLOWED = "a source the model does not load from"
    PATH_NOT_ALLOWED = "outside the adapter directories"
    NOT_FOUND = "not found"
    NOT_PERMITTED = "not permitted to fetch it"
    INVALID = "not a valid adapter"
    INCOMPATIBLE = "incompatible with the model as started"
    DOWNLOAD_FAILED = "could not be fetched"
    ENGINE_REFUSED = "the engine refused to load it"
    LOAD_FAILED = "the load failed"
    TIMED_OUT = "the load took too long"
    SLOTS_BUSY = "every adapter slot holds adapters in use"
    ENGINE_UNREACHABLE = "the engine could not be asked"
    ENGINE_RESTARTED = "the engine restarted during the load"
    INVALID_LORA_PATH = "lora_path names no adapter"
    LORA_PATH_NOT_LOADED = "lora_path names an adapter not loaded"


# Each reason as a client hears it: the HTTP status and the error code (`app.gateway.errors`).
_ANSWERS: dict[Refusal, tuple[int, str]] = {
    Refusal.NOT_A_REFERENCE: (400, "invalid_adapter_reference"),
    Refusal.NO_SUCH_MODEL: (404, "model_not_found"),
    Refusal.SOURCE_NOT_ALLOWED: (403, "adapter_source_not_allowed"),
    Refusal.PATH_NOT_ALLOWED: (403, "adapter_path_not_allowed"),
    Refusal.NOT_FOUND: (404, "adapter_not_found"),
    Refusal.NOT_PERMITTED: (403, "adapter_not_allowed"),
    Refusal.INVALID: (400, "invalid_adapter"),
    Refusal.INCOMPATIBLE: (400, "adapter_incompatible"),
    Refusal.DOWNLOAD_FAILED: (502, "adapter_download_failed"),
    Refusal.ENGINE_REFUSED: (400, "adapter_load_failed"),
    Refusal.LOAD_FAILED: (502, "adapter_load_failed"),
    Refusal.TIMED_OUT: (504, "adapter_load_timeout"),
    Refusal.SLOTS_BUSY: (503, "adapter_slots_busy"),
    Refusal.ENGINE_UNREACHABLE: (503, "engine_unavailable"),
    Refusal.ENGINE_RESTARTED: (503, "engine_restarted"),
    Refusal.INVALID_LORA_PATH: (400, "invalid_lora_path"),
    Refusal.LORA_PATH_NOT_LOADED: (400, "adapter_not_loaded"),
}
# Reasons that pass once something busy frees: the answer says when to retry.
_RETRIED = frozenset({Refusal.SLOTS_BUSY, Refusal.ENGINE_UNREACHABLE})
# Reasons about the body's `lora_path` (the others are about its `model`).
_ABOUT_LORA_PATH = frozenset({Refusal.INVALID_LORA_PATH, Refusal.LORA_PATH_NOT_LOADED})


class AdapterRefused(Exception):
    """Why a requested adapter is not served: the reason, and the message (naming the reference and the fix). What a
    client hears of it (`status`, `code`, `param`, `retry_after_s`: `reply`) is the gateway's reading of the reason."""

    def __init__(self, reason: Refusal, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message

    @property
    def status(self) -> int:
        return _ANSWERS[self.reason][0]

    @property
    def code(self) -> str:
        return _ANSWERS[self.reason][1]

    @property
    def param(self) -> str:
        return "lora_path" if self.reason in _ABOUT_LORA_PATH else "model"

    @property
    def retry_after_s(self) -> int | None:
        return RETRY_AFTER_SECONDS if self.reason in _RETRIED else None

    def reply(self) -> Reply:
        return error_reply(self.status, self.message, self.code, param=self.param, retry_after_s=self.retry_after_s)


class Lease(Protocol):
    """A request's hold on a loaded adapter (listed and loaded under `name`), released when the request ends."""

    name: str

    def release(self, now: float) -> None: ...


class AdapterLoader(Protocol):
    """One model's adapters on request (`app.serving.adapters.OnRequestAdapters`)."""

    def configured(self, name: str) -> bool:
        """A name the model was started with: served without asking."""
        ...

    async def acquire(self, reference: str) -> Lease:
        """The adapter, loaded (once for every request that asks meanwhile, whatever its spelling); raises
        AdapterRefused."""
        ...

    def hold(self, name: str) -> Lease | None:
        """A lease on the adapter loaded on request under `name`; None when none is (nothing is loaded for it)."""
        ...

    def cards(self) -> list[tuple[str, AdapterState]]:
        """Each adapter loaded or loading on request, with its state, least recently used first."""
        ...

    def loaded(self, name: str) -> bool:
        """An adapter is loaded on request under `name` now."""
        ...


class AdapterRoute(Protocol):
    """A model's adapters, as `lease_adapters` reads them (`app.gateway.model_routes.ModelRoute`)."""

    endpoint: str
    adapters: tuple[str, ...]  # configured ones
    adapter_loader: AdapterLoader | None


async def lease_adapters(request: Request, route: AdapterRoute, adapter: str | None,
                         clock: Callable[[], float]) -> list[Lease]:
    """Every adapter a request names, held for it: the one its model names (`adapter`, loaded on request, or a load
    under way shared; the body then names it as it is loaded), and those its `lora_path` names (loaded already).
    AdapterRefused when one cannot be held; then none is."""
    leases: list[Lease] = []
    try:
        if adapter is not None:
            assert route.adapter_loader is not None
            leases.append(lease := await route.adapter_loader.acquire(adapter))
            if lease.name != adapter:
                request.body = with_model(request.body, f"{route.endpoint}:{lease.name}")
        try:
            named = lora_paths(request.body)
        except ValueError as exc:
            raise AdapterRefused(Refusal.INVALID_LORA_PATH,
                                 f"{exc}: name an adapter, or ask for it as \"model\"") from None
        leases += hold_named(named or [], route.endpoint, route.adapters, route.adapter_loader)
    except BaseException:  # a refusal, or the client went away while its adapter loaded
        now = clock()
        for held in leases:
            held.release(now)
        raise
    return leases


class LeasedTarget:
    """A model's route for one request that holds adapters: where the relay sends it, and the leases it releases
    when the request ends."""

    __slots__ = ("route", "leases")

    def __init__(self, route: Target, leases: tuple[Lease, ...]):
        self.route, self.leases = route, leases

    endpoint = property(lambda self: self.route.endpoint)
    upstream = property(lambda self: self.route.upstream)
    host = property(lambda self: self.route.host)
    authorization = property(lambda self: self.route.authorization)
    api_key = property(lambda self: self.route.api_key)
    transparent = False

    def leave(self, now: float) -> None:
        for lease in self.leases:
            lease.release(now)
        self.route.leave(now)

    async def after_failure(self) -> Reply | None:
        """As its model's route, but where it holds adapters loaded on request: a restarted engine has none of
        them, so it is not sent again."""
        return await self.route.after_failure() if not self.leases else failed_before_answering(self.route.endpoint)


def hold_named(names: list[str], endpoint: str, configured: Collection[str],
               loader: AdapterLoader | None) -> list[Lease]:
    """Leases on the adapters a body's `lora_path` names: each must be one the gateway lists as loaded, configured or
    loaded on request (held for the request, so it is not unloaded under it). Nothing is loaded for such a request:
    SGLang would load on its own an adapter it once had, behind the gateway's back."""
    missing = [n for n in names if n not in configured and (loader is None or not loader.loaded(n))]
    if missing:
        raise AdapterRefused(Refusal.LORA_PATH_NOT_LOADED, f"lora_path names {missing[0][:200]!r}, which is no "
                             f"adapter of {endpoint!r} loaded now: ask for it as \"model\": \"{endpoint}:<adapter>\"")
    return [lease for n in names if n not in configured and loader is not None and (lease := loader.hold(n))]


def requested_adapter(model: str | None, endpoint: str, loader: AdapterLoader | None) -> str | None:
    """The reference a request asks to load: its `model` is `<endpoint>:<reference>` and the reference is not a
    configured adapter (SGLang reads the same split: the served name, then everything after its colon)."""
    if loader is None or model is None or not model.startswith(endpoint + ":"):
        return None
    reference = model[len(endpoint) + 1:]
    return None if loader.configured(reference) else reference
