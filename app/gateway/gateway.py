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
waits for its adapter to load (`app.gateway.adapters`). The deployment's own benchmark sends its own token
(`quiet_auth`): served like any other, counted nowhere, and no activity for the idle clock.

Example::

    gateway = Gateway(routes, TokenChecker(tokens), RequestStats(), activity=tracker)
    await gateway.start("0.0.0.0", 8000)
    ...
    gateway.begin_drain(); await gateway.wait_drained(deadline_s=30); await gateway.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.gateway import page
from app.gateway import routes as paths
from app.gateway.adapters import AdapterLoader, AdapterRefused, LeasedTarget, requested_adapter
from app.gateway.auth import TokenChecker
from app.gateway.connections import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    ConnectionTable,
    TrackedConnection,
    raise_open_file_limit,
)
from app.gateway.errors import Reply, error_reply
from app.gateway.messages import (
    PENDING,
    REQUEST_RECEIVE_TIMEOUT_SECONDS,
    WRITE_TIMEOUT_SECONDS,
    Handled,
    Limits,
    Pending,
    Request,
)
from app.gateway.relay import (
    RETRY_AFTER_SECONDS,
    Activity,
    InFlight,
    Relay,
    RelayContext,
    json_object,
    model_field,
    text_bytes,
)
from app.gateway.server import ServerConnection
from app.gateway.stats import RequestStats
from app.gateway.upstream import Upstream
from app.states import ModelState

logger = logging.getLogger(__name__)

# Largest request body accepted by default (`general.max_request_body_mib`): chat traffic is a few KiB, a prompt that
# fills a 128k context a few hundred, an image sent inline (base64) a few MiB. A body is held whole before it is
# relayed, so this is also what one token holder's request may hold in memory.
MAX_BODY_BYTES = 4 * 1024 * 1024
# Waiting this long for the engine's next byte means it hangs: 504 before headers, an SSE error event after.
UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# A prompt's text takes at least one token per this many bytes of its JSON (the densest real text: a long word, a run
# of spaces or dashes, an emoji escaped as two \\u escapes in 12 bytes). A body whose text is longer than its model's
# context at this rate cannot fit, and is refused before the engine tokenizes it: SGLang tokenizes a whole prompt
# before it checks its length, and meanwhile serves nobody (30 MB took it 125 s).
MAX_PROMPT_BYTES_PER_TOKEN = 32
# Requests held at most per model while it restarts or wakes; past it they get 503 at once.
MAX_HELD_REQUESTS = 4096
# How long a request for a restarting model is held before 503 (the deployment's config sets it).
RESTART_HOLD_SECONDS = 120.0

_WAITS_FOR_WAKE = frozenset({ModelState.SLEEPING, ModelState.WAKING})


class EngineHandle(Protocol):
    """What the gateway needs of an engine (`app.serving.engine.Engine` has it; tests pass simple objects)."""

    url: str
    state: str

    async def wait_serving(self, deadline_s: float) -> bool:
        """Until the engine serves again after a crash (True), it failed for good, or the deadline passed."""
        ...


class Residency(Protocol):
    """Models sharing GPUs (`app.serving.residency.Residency`): a request enters a resident model at once, or
    waits while it wakes; the model cannot sleep until every request that entered has left."""

    def enter(self, endpoint: str) -> bool: ...

    async def wait_resident(self, endpoint: str, deadline_s: float) -> bool: ...

    def leave(self, endpoint: str, now: float) -> None: ...

    def describe(self) -> dict[str, dict[str, object]]: ...

    def state(self, endpoint: str) -> str: ...


@dataclass
class ModelRoute:
    """One model behind the gateway: its engine (or router), the engine's own key, its adapters, and how requests
    wait for it. `connect` (when the gateway starts) opens its pool of connections to the engine."""

    endpoint: str
    engine: EngineHandle
    api_key: str | None = None  # the engine's own key, sent upstream instead of the client's token
    adapters: tuple[str, ...] = ()
    adapter_loader: AdapterLoader | None = field(default=None, repr=False)  # with adapters on request
    residency: Residency | None = field(default=None, repr=False)  # when models share GPUs by sleeping
    wake_deadline_s: float = 120.0
    restart_hold_s: float = RESTART_HOLD_SECONDS
    upstream: Upstream | None = field(default=None, repr=False)
    context_tokens: int | None = None  # its context length, once its engine has said (the deployment asks it)
    held: int = 0  # requests waiting for it to wake or come back
    host: bytes = field(default=b"", repr=False)
    authorization: bytes | None = field(default=None, repr=False)

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        parts = urlsplit(self.engine.url)
        self.upstream = Upstream(parts.hostname or "127.0.0.1", parts.port or 80,
                                 connect_timeout_s=UPSTREAM_CONNECT_TIMEOUT_SECONDS, loop=loop)
        self.host = parts.netloc.encode()
        self.authorization = f"Bearer {self.api_key}".encode() if self.api_key else None

    @property
    def state(self) -> str:
        """The model's availability: the residency's where models share GPUs (an engine just up is `loading`
        until it has been measured and can take requests), else its engine's."""
        return self.residency.state(self.endpoint) if self.residency is not None else self.engine.state

    def leave(self, now: float) -> None:
        if self.residency is not None:
            self.residency.leave(self.endpoint, now)


def _unavailable(route: ModelRoute, state: str, waited_s: float | None = None) -> Reply:
    message = (f"Model {route.endpoint!r} is still {state} after {waited_s:g} s; retry shortly"
               if waited_s is not None else f"Model {route.endpoint!r} is {state}; retry shortly")
    return error_reply(503, message, str(state), retry_after_s=RETRY_AFTER_SECONDS)


class Gateway:
    """One port in front of every engine. Constructing it binds nothing; `start` does."""

    def __init__(
        self,
        routes: list[ModelRoute],
        auth: TokenChecker,
        stats: RequestStats,
        *,
        activity: Activity | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_body_bytes: int = MAX_BODY_BYTES,
        upstream_read_timeout_s: float = UPSTREAM_READ_TIMEOUT_SECONDS,
        request_receive_timeout_s: float = REQUEST_RECEIVE_TIMEOUT_SECONDS,
        write_timeout_s: float = WRITE_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
        task_url: str | None = None,
        quiet_auth: TokenChecker | None = None,
    ):
        """`task_url`: the ClearML task's page, which the endpoint's page links to. `quiet_auth`: the deployment's
        own token for its benchmark, whose requests are served like any other but counted nowhere and are no
        activity (the idle clock runs on)."""
        self.quiet_auth = quiet_auth
        self.routes = {r.endpoint: r for r in routes}
        self.task_url = task_url
        self._endpoints = frozenset(self.routes)
        self.auth = auth
        self.stats = stats
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.upstream_read_timeout_s = upstream_read_timeout_s
        self.limits = Limits(lambda: self.max_body_bytes, request_receive_timeout_s, write_timeout_s)
        self.draining = False
        self._flight = InFlight(activity)
        self._relays: RelayContext | None = None
        self._server: asyncio.base_events.Server | None = None
        self.connections = ConnectionTable(max_connections, max_connections_per_address)
        self.port: int | None = None

    @property
    def in_flight(self) -> int:
        return self._flight.count

    # ----- lifecycle -----

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        for route in self.routes.values():
            route.connect(loop)
        self._relays = RelayContext(loop, self.clock, self.stats, self._flight, self.upstream_read_timeout_s)
        self.connections.capacity = raise_open_file_limit(self.connections.capacity)
        self._server = await loop.create_server(lambda: TrackedConnection(self, loop), host, port,
                                                reuse_address=True, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("Gateway listening on %s:%s", host, self.port)

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
        """Judge a request on its head, before its body is read: the token first, then the route."""
        route = paths.classify(request.method, request.path, self._endpoints)
        request.context = route
        if route.kind in ("open", "page"):
            if request.header(b"content-length") not in (None, b"0") or request.header(b"transfer-encoding"):
                return error_reply(400, f"{request.path} takes no request body", "unexpected_body")
            return None
        header = request.header(b"authorization")
        authorization = header.decode("latin-1") if header is not None else None
        if self.quiet_auth is not None and self.quiet_auth.check(authorization):
            request.counted = False
        elif not self.auth.check(authorization):
            return error_reply(401, "Missing or invalid access token: send 'Authorization: Bearer <token>'",
                               "invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
        request.authenticated = True
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

    def handle(self, request: Request, conn: ServerConnection) -> Handled:
        """Answer at once, relay to an engine, or hold the request while its model wakes or restarts."""
        route: paths.Route = request.context  # type: ignore[assignment]
        if route.kind != "relay":
            conn.reply(self._own(route))
            return None
        model = self._model_route(request, route)
        if isinstance(model, Reply):
            conn.reply(model)
            return None
        too_long = prompt_too_long(model, route, request)
        if too_long is not None:
            conn.reply(too_long)
            return None
        path = route.target.encode() + (b"?" + request.query if request.query else b"")
        loader = model.adapter_loader
        adapter = requested_adapter(model_field(request.body), model.endpoint, loader) if loader else None
        residency = model.residency
        if residency is not None and residency.enter(model.endpoint):
            return self._relay(request, conn, model, path, adapter)
        state = model.state
        if (residency is not None and state in _WAITS_FOR_WAKE) or state == ModelState.RESTARTING:
            if model.held >= MAX_HELD_REQUESTS:
                conn.reply(_unavailable(model, state))
                return None
            return self._held(request, conn, model, path, state, adapter)
        if residency is not None or state != ModelState.RESIDENT:  # (resident, not yet measured: loading)
            conn.reply(_unavailable(model, ModelState.LOADING if state == ModelState.RESIDENT else state))
            return None
        return self._relay(request, conn, model, path, adapter)

    def _relay(self, request: Request, conn: ServerConnection, route: ModelRoute, path: bytes,
               adapter: str | None = None) -> Handled:
        assert self._relays is not None
        if adapter is not None:
            return self._relay_with_adapter(request, conn, route, path, adapter)
        return Relay(self._relays, request, conn, route, path).start()

    async def _relay_with_adapter(self, request: Request, conn: ServerConnection, route: ModelRoute, path: bytes,
                                  adapter: str) -> Pending | None:
        """Load the adapter the request names (or share a load under way), then relay it holding the adapter."""
        assert self._relays is not None and route.adapter_loader is not None
        try:
            lease = await route.adapter_loader.acquire(adapter)
        except AdapterRefused as refused:
            route.leave(self.clock())
            conn.reply(refused.reply())
            return None
        except BaseException:  # the client went away while the adapter loaded
            route.leave(self.clock())
            raise
        started = Relay(self._relays, request, conn, LeasedTarget(route, lease), path).start()
        return started if started is None or started is PENDING else await started

    def _model_route(self, request: Request, route: paths.Route) -> ModelRoute | Reply:
        """The model a relayed request goes to: the path's, or the one its JSON body names."""
        if route.takes_json(request.method) and not json_object(request.body):
            return error_reply(400, "The request body must be one JSON object", "invalid_json")
        if route.endpoint is not None:
            return self.routes[route.endpoint]
        model = model_field(request.body)
        if model is None:
            if len(self.routes) == 1:
                return next(iter(self.routes.values()))
            return error_reply(400, "The request names no model: set \"model\" to one of "
                               + ", ".join(sorted(self.routes)), "model_required", param="model")
        endpoint = model if model in self.routes else model.split(":", 1)[0]
        found = self.routes.get(endpoint)
        if found is None:
            return error_reply(404, f"The model {model[:200]!r} does not exist; available: "
                               + ", ".join(sorted(self.routes)), "model_not_found", param="model")
        return found

    async def _held(self, request: Request, conn: ServerConnection, route: ModelRoute, path: bytes,
                    state: str, adapter: str | None) -> Pending | None:
        """Hold a request for a model that is waking (one wake-up for all) or restarting after a crash, until it
        serves again, at most its deadline; then relay it, or 503 + Retry-After."""
        route.held += 1
        try:
            if state == ModelState.RESTARTING:
                deadline = route.restart_hold_s
                ready = await route.engine.wait_serving(deadline)
                if ready and route.residency is not None:
                    ready = route.residency.enter(route.endpoint)
            else:
                assert route.residency is not None
                deadline = route.wake_deadline_s
                ready = await route.residency.wait_resident(route.endpoint, deadline)
        finally:
            route.held -= 1
        if not ready:
            if state != ModelState.RESTARTING:
                conn.reply(_unavailable(route, ModelState.WAKING, waited_s=deadline))
            elif route.state == ModelState.RESTARTING:
                conn.reply(_unavailable(route, ModelState.RESTARTING, waited_s=deadline))
            else:  # it failed for good, or the deployment is stopping
                conn.reply(_unavailable(route, route.state))
            return None
        started = self._relay(request, conn, route, path, adapter)
        return started if started is None or started is PENDING else await started

    # ----- answers of the gateway itself -----

    def _own(self, route: paths.Route) -> Reply:
        if route.kind == "open":
            return Reply(200, b'{"status": "ok"}') if route.path == "/healthz" else self._readyz()
        if route.kind == "page":
            return page.asset(route.path)
        if route.kind == "page_status":
            live = {name: self.stats.live(name) for name in self.routes}
            return page.status(model_cards(self.routes), live, self.in_flight, self.task_url)
        if route.kind == "metrics":
            return Reply(200, self.stats.prometheus(self.in_flight, self.states()).encode(),
                         content_type=b"text/plain; version=0.0.4; charset=utf-8")
        cards = model_cards(self.routes, route.endpoint)
        if route.model_id is None:
            return Reply(200, json.dumps({"object": "list", "data": cards}).encode())
        for card in cards:
            if route.model_id == card["id"] or (route.endpoint is not None
                                                 and f"{route.endpoint}:{route.model_id}" == card["id"]):
                return Reply(200, json.dumps(card).encode())
        return error_reply(404, f"The model {route.model_id!r} does not exist", "model_not_found", param="model")

    def states(self) -> dict[str, str]:
        """Each model's state, as requests find it."""
        return {name: route.state for name, route in self.routes.items()}

    def _readyz(self) -> Reply:
        """Ready when every model can answer: resident, or sleeping/waking (a request wakes it)."""
        states = self.states()
        ready = all(s == ModelState.RESIDENT or s in _WAITS_FOR_WAKE for s in states.values()) and not self.draining
        body: dict[str, Any] = {"ready": ready, "draining": self.draining, "models": states}
        described = next((r.residency.describe() for r in self.routes.values() if r.residency is not None), {})
        if described:
            body["residency"] = described
        return Reply(200 if ready else 503, json.dumps(body).encode())


def prompt_too_long(model: ModelRoute, route: paths.Route, request: Request) -> Reply | None:
    """413 for a body whose text cannot fit the model's context (`MAX_PROMPT_BYTES_PER_TOKEN`): all of it where the
    body is one prompt, any one text where it may hold several. Looked at only when the body is long enough."""
    limit = model.context_tokens * MAX_PROMPT_BYTES_PER_TOKEN if model.context_tokens else None
    if limit is None or len(request.body) <= limit or not route.takes_json(request.method):
        return None
    total, longest = text_bytes(request.body)
    size = total if route.one_prompt else longest
    if size <= limit:
        return None
    return error_reply(413, f"The prompt is too long for model {model.endpoint!r}: {size} bytes of text, where its "
                       f"context of {model.context_tokens} tokens holds at most {limit} (at "
                       f"{MAX_PROMPT_BYTES_PER_TOKEN} bytes a token); shorten it", "context_length_exceeded",
                       param="messages" if route.one_prompt else None)


def model_cards(routes: dict[str, ModelRoute], endpoint: str | None = None) -> list[dict[str, Any]]:
    """Model cards: every model and adapter (or one endpoint's), with its state and no file path."""
    created = int(time.time())
    data = []
    for name, route in routes.items():
        if endpoint is not None and name != endpoint:
            continue
        state = route.state
        data.append({"id": name, "object": "model", "created": created, "owned_by": "clearml-sglang",
                     "state": state})
        adapters = [(adapter, state) for adapter in route.adapters]
        if route.adapter_loader is not None:
            adapters += route.adapter_loader.cards()
        data += [{"id": f"{name}:{adapter}", "object": "model", "created": created, "owned_by": "clearml-sglang",
                  "parent": name, "state": adapter_state} for adapter, adapter_state in adapters]
    return data
