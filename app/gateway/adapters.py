"""LoRA adapters loaded on request, as the gateway sees them: a model may load the adapter a request names before it
is relayed (`app.serving.adapters` does the loading); the request holds its adapter until it ends, so the adapter
cannot be unloaded under it.

A request for `"model": "<endpoint>:<reference>"`, where the reference is not one of the model's configured adapters,
asks the model's `AdapterLoader` for a lease; the loader answers with one (the adapter is loaded, every request that
arrived meanwhile shared the one load) or refuses with the reason (`AdapterRefused`: 4xx in the one error shape, or
503 while every adapter slot is busy).
"""

from __future__ import annotations

from typing import Protocol

from app.gateway.errors import Reply, error_reply
from app.gateway.relay import Target


class AdapterRefused(Exception):
    """Why a requested adapter is not served: the HTTP status, the message (naming the reference and the fix) and
    the error code."""

    def __init__(self, status: int, message: str, code: str, *, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after_s = status, message, code, retry_after_s

    def reply(self) -> Reply:
        return error_reply(self.status, self.message, self.code, param="model", retry_after_s=self.retry_after_s)


class Lease(Protocol):
    """A request's hold on a loaded adapter, released when the request ends."""

    def release(self, now: float) -> None: ...


class AdapterLoader(Protocol):
    """One model's adapters on request (`app.serving.adapters.OnRequestAdapters`)."""

    def configured(self, name: str) -> bool:
        """A name the model was started with: served without asking."""
        ...

    async def acquire(self, reference: str) -> Lease:
        """The adapter, loaded (once for every request that asks meanwhile); raises AdapterRefused."""
        ...

    def cards(self) -> list[tuple[str, str]]:
        """Each adapter loaded or loading on request, with its state, least recently used first."""
        ...


class LeasedTarget:
    """A model's route for one request that holds an adapter: where the relay sends it, and the lease it releases
    when the request ends."""

    __slots__ = ("route", "lease")

    def __init__(self, route: Target, lease: Lease):
        self.route, self.lease = route, lease

    endpoint = property(lambda self: self.route.endpoint)
    upstream = property(lambda self: self.route.upstream)
    host = property(lambda self: self.route.host)
    authorization = property(lambda self: self.route.authorization)
    api_key = property(lambda self: self.route.api_key)

    def leave(self, now: float) -> None:
        self.lease.release(now)
        self.route.leave(now)


def requested_adapter(model: str | None, endpoint: str, loader: AdapterLoader | None) -> str | None:
    """The reference a request asks to load: its `model` is `<endpoint>:<reference>` and the reference is not a
    configured adapter (SGLang reads the same split: the served name, then everything after its colon)."""
    if loader is None or model is None or not model.startswith(endpoint + ":"):
        return None
    reference = model[len(endpoint) + 1:]
    return None if loader.configured(reference) else reference
