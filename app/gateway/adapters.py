"""LoRA adapters loaded on request, as the gateway sees them: a model may load the adapter a request names before it
is relayed (`app.serving.adapters` does the loading); the request holds its adapter until it ends, so the adapter
cannot be unloaded under it.

A request for `"model": "<endpoint>:<reference>"`, where the reference is not one of the model's configured adapters,
asks the model's `AdapterLoader` for a lease; the loader answers with one (the adapter is loaded, every request that
arrived meanwhile shared the one load) or refuses with the reason (`AdapterRefused`: 4xx in the one error shape, or
503 while every adapter slot is busy).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import Request
from app.gateway.relay import Target, lora_paths, with_model
from app.states import AdapterState


class AdapterRefused(Exception):
    """Why a requested adapter is not served: the HTTP status, the message (naming the reference and the fix), the
    error code, and the request's field it is about."""

    def __init__(self, status: int, message: str, code: str, *, retry_after_s: int | None = None,
                 param: str = "model"):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after_s = status, message, code, retry_after_s
        self.param = param

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
            raise AdapterRefused(400, f"{exc}: name an adapter, or ask for it as \"model\"", "invalid_lora_path",
                                 param="lora_path") from None
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

    def leave(self, now: float) -> None:
        for lease in self.leases:
            lease.release(now)
        self.route.leave(now)


def hold_named(names: list[str], endpoint: str, configured: Collection[str],
               loader: AdapterLoader | None) -> list[Lease]:
    """Leases on the adapters a body's `lora_path` names: each must be one the gateway lists as loaded, configured or
    loaded on request (held for the request, so it is not unloaded under it). Nothing is loaded for such a request:
    SGLang would load on its own an adapter it once had, behind the gateway's back."""
    missing = [n for n in names if n not in configured and (loader is None or not loader.loaded(n))]
    if missing:
        raise AdapterRefused(400, f"lora_path names {missing[0][:200]!r}, which is no adapter of {endpoint!r} "
                             f"loaded now: ask for it as \"model\": \"{endpoint}:<adapter>\"", "adapter_not_loaded",
                             param="lora_path")
    return [lease for n in names if n not in configured and loader is not None and (lease := loader.hold(n))]


def requested_adapter(model: str | None, endpoint: str, loader: AdapterLoader | None) -> str | None:
    """The reference a request asks to load: its `model` is `<endpoint>:<reference>` and the reference is not a
    configured adapter (SGLang reads the same split: the served name, then everything after its colon)."""
    if loader is None or model is None or not model.startswith(endpoint + ":"):
        return None
    reference = model[len(endpoint) + 1:]
    return None if loader.configured(reference) else reference
