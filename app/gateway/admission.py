"""Which key a request comes with, and what that key lets it do: the gateway's decisions about callers.

`Admission.identify` (on the request's head) finds its key by its token, or refuses it 401; a key's `models` are all
that exist for it: any other endpoint is 404 `model_not_found` before the body is read. `Admission.judge` (once the
body is in and its model found) applies the rest of its limits (`app.keys.KeyLimits`): an adapter it may not use is
404, a route whose tokens the gateway cannot count 403 for a key with token limits, a `max_tokens` past its own 400
(`app.gateway.bodies.shape` writes its priority, its `max_tokens` and a stream's usage into the body), then its rate
limits 429 (`app.gateway.keys.KeyState.admit`); a request admitted holds its place until it ends
(`Relay` releases it with the tokens it used; `settle` where it ends before it is relayed).
"""

from __future__ import annotations

from collections.abc import Callable

from app.gateway import routes as paths
from app.gateway.auth import generate_token
from app.gateway.bodies import TOKEN_BOUNDED, Shaped, model_field, shape
from app.gateway.errors import Reply, error_reply
from app.gateway.keys import KeyRing, KeyState
from app.gateway.messages import Request
from app.gateway.model_routes import ModelRoute, named_adapters, no_model
from app.keys import NO_LIMITS


class Admission:
    """The keys of one gateway, and the models each of them sees."""

    def __init__(self, keys: KeyRing, routes: dict[str, ModelRoute], clock: Callable[[], float],
                 quiet_token: str | None = None):
        self.keys, self.routes, self.clock = keys, routes, clock
        self.quiet_token = quiet_token or generate_token()  # the benchmark's: served, counted nowhere, no activity
        self._quiet = KeyRing([("benchmark", self.quiet_token, NO_LIMITS)])
        self._prioritized = keys.prioritized  # every request gets its key's priority (0: a key without one)
        self._visible = {k.name: {e: r for e, r in routes.items() if k.sees(e)} for k in keys.keys.values()}

    def visible(self, key: KeyState | None) -> dict[str, ModelRoute]:
        """The models that exist for a key (every one for the benchmark's token)."""
        return self._visible[key.name] if key is not None else self.routes

    def identify(self, request: Request, route: paths.Route) -> Reply | None:
        """The request's key, from its token (None: the benchmark's), or the refusal: 401 without a valid token, 404
        for an endpoint its key does not see."""
        authorization = request.header(b"authorization")
        key = self.keys.find(authorization)
        if key is None:
            if self._quiet.find(authorization) is None:
                return error_reply(401, "Missing or invalid access token: send 'Authorization: Bearer <token>'",
                                   "invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
            request.counted = False  # the benchmark's
        request.key, request.authenticated = key, True
        if key is not None and route.endpoint is not None and not key.sees(route.endpoint):
            return no_model(route.endpoint, self._visible[key.name])  # (it does not exist for this key)
        return None

    def stamp(self, request: Request) -> None:
        """An answer other than an admitted request's carries its key's x-ratelimit-* fields too, as they stand."""
        key = request.key
        if key is not None and key.rated and not request.rate_headers:
            request.rate_headers = key.rate_headers(self.clock())

    def judge(self, request: Request, model: ModelRoute, route: paths.Route) -> Reply | None:
        """What the request's key allows: its models, its routes, its `max_tokens`; its priority written in, and
        a stream's usage asked for; then its rate limits (the request holds a place until it ends). The refusal,
        or None."""
        key = request.key
        if key is None:
            return None
        limits = key.limits
        if key.grants is not None and not key.may_use(model.endpoint, named_adapters(request.body, model.endpoint)):
            return no_model(model_field(request.body) or model.endpoint, self._visible[key.name])
        if key.bounds_tokens and route.path not in TOKEN_BOUNDED:
            return error_reply(403, f"Key {key.name!r} has token limits (tpm, max_tokens), which the endpoint "
                               f"enforces where it counts a request's tokens: {route.path} is not one of those routes; "
                               "use /v1/chat/completions or /v1/completions", "route_not_allowed")
        shaped = shape(route.path, request.body, priority=(limits.priority or 0) if self._prioritized else None,
                       max_tokens=limits.max_tokens, key=key.name)
        if not isinstance(shaped, Shaped):
            return shaped
        request.body, request.strip_usage = shaped.body, shaped.strip_usage
        if not key.admits:
            return None
        refusal = key.admit(self.clock())
        request.rate_headers = key.headers
        if refusal is not None:
            request.rate_limited = True
            return refusal
        request.admitted = True
        return None

    def settle(self, request: Request) -> None:
        """A request its key's limits took in ends before it was relayed: its place is free again."""
        if request.admitted and request.key is not None:
            request.admitted = False
            request.key.release(self.clock(), 0)
