"""The gateway: one authenticated port in front of every engine.

Routes (which engine routes are relayed, and why: `app.gateway.routes`):
    GET  /healthz                    liveness of the gateway itself (no token)
    GET  /readyz                     200 when every model is ready, else 503 with each model's state (no token)
    GET  /metrics                    the gateway's metrics, Prometheus text
    GET  /v1/models[/{id}]           every model and LoRA adapter (also /<endpoint>/v1/models[/{id}])
    POST /v1/chat/completions, ...   an inference route, to the model the body's "model" names
    *    /<endpoint>/<route>         an inference route of that model's engine: /<endpoint>/v1/chat/completions, ...

Every route but /healthz and /readyz needs `Authorization: Bearer <token>`, checked on the request's head: a request
without a valid one is answered 401 before its body is read, and never reaches an engine; nor does a route that is
not an inference route (404, or 405 for another method). The client's token is replaced by the engine's own key
upstream (`app.gateway.relay`). Every error, the engine's included, is answered in one shape (`app.gateway.errors`):
400 not a JSON object, 404 unknown model or route, 413 body too large, 502 engine unreachable or crashed (an SSE
error event when a stream was already under way), 503 loading, restarting or waking past its deadline, or draining
(`Retry-After`), 504 engine silent too long. A request for a model that is restarting or waking is held until it
serves again, up to a deadline. A request for `"<endpoint>:<reference>"` where the model loads adapters on request
waits for its adapter to load (`app.gateway.adapters`). The gateway makes one token of its own, `quiet_token`, for
the deployment's benchmark (`app.serving.benchmark`): its requests are served like any other, counted nowhere, and
are no activity for the idle clock.

Example::

    gateway = Gateway(routes, KeyRing(keys), RequestStats(), activity=tracker, limits=GatewayLimits())
    await gateway.start("0.0.0.0", 8000)
    ...
    gateway.begin_drain(); await gateway.wait_drained(deadline_s=30); await gateway.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.gateway import page
from app.gateway import routes as paths
from app.gateway.adapters import AdapterRefused, LeasedTarget, lease_adapters, requested_adapter
from app.gateway.admission import Admission
from app.gateway.bodies import model_field
from app.gateway.connections import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    ConnectionTable,
    TrackedConnection,
)
from app.gateway.errors import Reply, error_reply
from app.gateway.forward import ControlPlane
from app.gateway.keys import KeyRing, KeyState
from app.gateway.messages import (
    PENDING,
    REQUEST_RECEIVE_TIMEOUT_SECONDS,
    WRITE_TIMEOUT_SECONDS,
    Handled,
    Limits,
    Pending,
    Request,
    Responder,
)
from app.gateway.model_routes import (
    WAITS_FOR_WAKE,
    ModelRoute,
    cards_for,
    find_model,
    models_answer,
    prompt_too_long,
    unavailable,
)
from app.gateway.relay import RETRY_AFTER_SECONDS, Activity, InFlight, Relay, RelayContext
from app.gateway.stats import RequestStats
from app.keys import NO_LIMITS
from app.states import ModelState

logger = logging.getLogger(__name__)

# Largest request body accepted by default (`general.max_request_body_mib`): chat traffic is a few KiB, a prompt that
# fills a 128k context a few hundred, an image sent inline (base64) a few MiB. A body is held whole before it is
# relayed, so this is also what one token holder's request may hold in memory.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Waiting this long for the engine's next byte means it hangs: 504 before headers, an SSE error event after.
UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
# Requests held at most per model while it restarts or wakes; past it they get 503 at once.
MAX_HELD_REQUESTS = 4096
# Connections the kernel queues for the gateway to take (nginx's default too): the event loop takes at most this many
# in one turn, so a flood of new connections delays everyone else's requests by one short turn, not a long one;
# past it the kernel drops new connections' first packets, and their clients try again a second later.
LISTEN_BACKLOG = 511


class Workers(Protocol):
    """A control plane's gateway workers (`app.serving.gateway_workers.GatewayWorkers`), as its answers count them."""

    @property
    def in_flight(self) -> int: ...

    def tables(self) -> tuple[int, int, int]:
        """Their connection tables together: open, closed to make room, refused."""
        ...


@dataclass(frozen=True)
class GatewayLimits:
    """What the gateway allows: a request body's size, how long an engine, a request's arrival and a client's reading
    may take, and how many client connections it keeps (in all, and from one address once the table is full)."""

    max_body_bytes: int = MAX_BODY_BYTES
    upstream_read_timeout_s: float = UPSTREAM_READ_TIMEOUT_SECONDS
    request_receive_timeout_s: float = REQUEST_RECEIVE_TIMEOUT_SECONDS
    write_timeout_s: float = WRITE_TIMEOUT_SECONDS
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS


class Gateway:
    """One port in front of every engine. Constructing it binds nothing; `start` does."""

    def __init__(self, routes: list[ModelRoute], keys: KeyRing, stats: RequestStats, *,
                 activity: Activity | None = None, clock: Callable[[], float] = time.monotonic,
                 limits: GatewayLimits = GatewayLimits(), task_url: str | None = None,
                 control: ControlPlane | None = None):
        """`task_url`: the ClearML task's page, which the endpoint's page links to; `control`: a worker's control
        plane (`app.gateway.forward`), where the requests it cannot answer alone go (and whose benchmark token it
        takes)."""
        self.routes = {r.endpoint: r for r in routes}
        self.task_url = task_url
        self._endpoints = frozenset(self.routes)
        self.keys = keys
        self.admission = Admission(keys, self.routes, clock, control.quiet_token if control is not None else None)
        self.control = control
        self.quiet_token = self.admission.quiet_token  # the benchmark's: served, counted nowhere, no activity
        stats.add_keys(list(keys.keys))
        self.stats = stats
        self.clock = clock
        self.max_body_bytes = limits.max_body_bytes  # (read by every connection as it needs it: it may change)
        self.upstream_read_timeout_s = limits.upstream_read_timeout_s
        self.limits = Limits(lambda: self.max_body_bytes, limits.request_receive_timeout_s, limits.write_timeout_s)
        self.draining = False
        self._flight = InFlight(activity)
        self._relays: RelayContext | None = None
        self._server: asyncio.base_events.Server | None = None
        self.connections = ConnectionTable(limits.max_connections, limits.max_connections_per_address)
        self.workers: Workers | None = None  # a control plane's workers: the clients' connections and requests
        self.port: int | None = None

    @property
    def served(self) -> int:
        """Requests under way at the endpoint: its workers' (what they sent on here among them), or its own."""
        return self.workers.in_flight if self.workers is not None else self._flight.count

    @property
    def in_flight(self) -> int:
        return self._flight.count

    # ----- lifecycle -----

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, sock: socket.socket | None = None) -> None:
        """Listen on `host:port`, or on `sock` (a worker's share of the endpoint's port)."""
        loop = asyncio.get_running_loop()
        for route in self.routes.values():
            route.connect(loop)
        if self.control is not None:
            self.control.connect(loop)
        self._relays = RelayContext(loop, self.clock, self.stats, self._flight, self.upstream_read_timeout_s)
        self.connections.fit_open_files()

        def connection() -> TrackedConnection:
            return TrackedConnection(self.handle, loop, self.limits, screen=self.screen,
                                     on_response=self.stats.count_response, table=self.connections)

        if sock is not None:
            self._server = await loop.create_server(connection, sock=sock, backlog=LISTEN_BACKLOG)
        else:
            self._server = await loop.create_server(connection, host, port, reuse_address=True,
                                                    backlog=LISTEN_BACKLOG)
        address = self._server.sockets[0].getsockname()
        self.port = address[1]
        logger.log(logging.DEBUG if sock is not None else logging.INFO, "Gateway listening on %s:%s", address[0],
                   self.port)

    def begin_drain(self) -> None:
        """Stop accepting proxied requests (503 + Retry-After); the ones in flight go on."""
        self.draining = True

    async def wait_drained(self, deadline_s: float) -> bool:
        """Wait until nothing is in flight, at most `deadline_s`; True when drained."""
        try:
            await asyncio.wait_for(self._flight.idle.wait(), deadline_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in self.connections:
                conn.abort()
            await self._server.wait_closed()
        for route in self.routes.values():
            if route.upstream is not None:
                route.upstream.close()

    # ----- requests -----

    def screen(self, request: Request) -> Reply | None:
        """Judge a request on its head, before its body is read: the route, its key, then what the route allows."""
        refusal = self._screen(request)
        if refusal is not None:
            self.admission.stamp(request)
        return refusal

    def _screen(self, request: Request) -> Reply | None:
        route = request.route = paths.classify(request.method, request.path, self._endpoints)
        if route.kind in ("open", "page"):
            if request.header(b"content-length") not in (None, b"0") or request.header(b"transfer-encoding"):
                return error_reply(400, f"{request.path} takes no request body", "unexpected_body")
            return None
        refusal = self.admission.identify(request, route)
        if refusal is not None:
            return refusal
        if route.kind == "not_found":
            return error_reply(404, f"No route {request.path[:200]!r}: the endpoint serves the inference routes of "
                               "/v1/... and /<endpoint>/... (see GET /v1/models for the endpoints)", "not_found")
        if route.kind == "method_not_allowed":
            allowed = ", ".join(sorted(route.allowed))
            return error_reply(405, f"{request.method} is not served on {request.path[:200]!r} (use {allowed})",
                               "method_not_allowed", headers=((b"allow", allowed.encode()),))
        if route.kind == "relay" and self.draining:
            return error_reply(503, "The deployment is shutting down", "draining", retry_after_s=RETRY_AFTER_SECONDS)
        return None

    def handle(self, request: Request, conn: Responder) -> Handled:
        """Answer at once, relay to an engine, or hold the request while its model wakes or restarts."""
        route = request.route
        assert route is not None  # (the screen read it)
        control = self.control
        if route.kind != "relay":
            if control is not None and route.kind != "page" and route.path != "/healthz":  # (the deployment's state)
                return control.relay(self._relays, request, conn)  # type: ignore[arg-type]
            self.admission.stamp(request)
            conn.reply(own_answer(self, route, request.key))
            return None
        model = find_model(self.admission.visible(request.key), route, request)
        if control is not None and isinstance(model, ModelRoute) and control.takes(request, model):
            return control.relay(self._relays, request, conn)  # type: ignore[arg-type]
        refusal = model if isinstance(model, Reply) else (
            prompt_too_long(model, route, request) or self.admission.judge(request, model, route))
        if refusal is not None:
            self.admission.stamp(request)
            conn.reply(refusal)
            return None
        assert isinstance(model, ModelRoute)
        path = route.target.encode() + (b"?" + request.query if request.query else b"")
        loader = model.adapter_loader
        adapter = requested_adapter(model_field(request.body), model.endpoint, loader) if loader else None
        residency = model.residency
        if residency is not None and residency.enter(model.endpoint):
            return self._relay(request, conn, model, path, adapter)
        state = model.state
        if (residency is not None and state in WAITS_FOR_WAKE) or state == ModelState.RESTARTING:
            if model.held >= MAX_HELD_REQUESTS:
                conn.reply(unavailable(model, state))
                return None
            return self._held(request, conn, model, path, state, adapter)
        if residency is not None or state != ModelState.RESIDENT:  # (resident, not yet measured: loading)
            conn.reply(unavailable(model, ModelState.LOADING if state == ModelState.RESIDENT else state))
            return None
        return self._relay(request, conn, model, path, adapter)

    def _relay(self, request: Request, conn: Responder, route: ModelRoute, path: bytes,
               adapter: str | None = None, held_s: float = 0.0) -> Handled:
        assert self._relays is not None
        if adapter is not None or b'"lora_path"' in request.body:
            return self._relay_with_adapters(request, conn, route, path, adapter, held_s)
        return Relay(self._relays, request, conn, route, path, held_s).start()

    async def _relay_with_adapters(self, request: Request, conn: Responder, route: ModelRoute, path: bytes,
                                   adapter: str | None, held_s: float = 0.0) -> Pending | None:
        """Relay a request holding every adapter it names (`lease_adapters`: loading the one its model names)."""
        assert self._relays is not None
        try:
            leases = await lease_adapters(request, route, adapter, self.clock)
        except BaseException as failed:  # a refusal, or the client went away while its adapter loaded
            route.leave(self.clock())
            self.admission.settle(request)
            if not isinstance(failed, AdapterRefused):
                raise
            conn.reply(failed.reply())
            return None
        started = Relay(self._relays, request, conn, LeasedTarget(route, tuple(leases)), path, held_s).start()
        return started if started is None or started is PENDING else await started

    async def _held(self, request: Request, conn: Responder, route: ModelRoute, path: bytes,
                    state: ModelState, adapter: str | None) -> Pending | None:
        """Hold a request for a model that is waking or restarting (`ModelRoute.wait`), then relay it, or answer
        503 + Retry-After."""
        arrived = self.clock()
        try:
            refusal = await route.wait(state)
        except BaseException:  # the client went away
            self.admission.settle(request)
            raise
        if refusal is not None:
            self.admission.settle(request)
            conn.reply(refusal)
            return None
        started = self._relay(request, conn, route, path, adapter, held_s=self.clock() - arrived)
        return started if started is None or started is PENDING else await started

    def states(self) -> dict[str, ModelState]:
        """Each model's state, as requests find it."""
        return states_of(self.routes)


def own_answer(gateway: Gateway, route: paths.Route, key: KeyState | None) -> Reply:
    """An answer of the gateway itself: health, readiness, the page and its status, /metrics, the model cards."""
    if route.kind == "open":
        return Reply(200, b'{"status": "ok"}') if route.path == "/healthz" else readyz(gateway.routes, gateway.draining)
    if route.kind == "page":
        return page.asset(route.path)
    routes = gateway.admission.visible(key)
    if route.kind == "page_status":
        live = {name: gateway.stats.live(name) for name in routes}
        caller = page.caller(key.name, key.limits, gateway.stats.key_usage().get(key.name), key.in_flight) \
            if key is not None else None
        return page.status(cards_for(routes, key), live, gateway.served, gateway.task_url, caller)
    if route.kind == "metrics":
        own = key is not None and key.limits != NO_LIMITS  # a key with limits sees its own usage and models
        text = gateway.stats.prometheus(gateway.served, states_of(routes),
                                        keys={key.name} if own and key is not None else None,
                                        endpoints=set(routes) if own else None) + gateway.connections.prometheus(
            gateway.workers.tables() if gateway.workers is not None else None)
        return Reply(200, text.encode(), content_type=b"text/plain; version=0.0.4; charset=utf-8")
    return models_answer(cards_for(routes, key, route.endpoint), route)


def readyz(routes: dict[str, ModelRoute], draining: bool) -> Reply:
    """Ready when every model can answer: resident, or sleeping/waking (a request wakes it)."""
    states = states_of(routes)
    ready = all(s == ModelState.RESIDENT or s in WAITS_FOR_WAKE for s in states.values()) and not draining
    body: dict[str, Any] = {"ready": ready, "draining": draining, "models": states}
    described = next((r.residency.describe() for r in routes.values() if r.residency is not None), {})
    if described:
        body["residency"] = described
    return Reply(200 if ready else 503, json.dumps(body).encode(),
                 () if ready else ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),))


def states_of(routes: dict[str, ModelRoute]) -> dict[str, ModelState]:
    """Each model's state, as requests find it."""
    return {name: route.state for name, route in routes.items()}
