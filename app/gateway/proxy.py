"""The gateway: bearer auth, default-deny routing to engines, streaming pass-through, one error shape, stats,
holding requests through restarts and wake-ups, draining.

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
upstream. Responses are relayed as they arrive (`app.gateway.http11`): a stream's chunks reach the client as the
engine produces them, and a client that disconnects closes its upstream connection, which makes SGLang abort the
request. Every error, the engine's included, is answered in one shape (`app.gateway.errors`): 400 not a JSON
object, 404 unknown model or route, 413 body too large, 502 engine unreachable or crashed (an SSE error event when a
stream was already under way), 503 loading, restarting or waking past its deadline, or draining (`Retry-After`), 504
engine silent too long. A request for a model that is restarting or waking is held until it serves again, up to a
deadline.

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
import re
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from app.gateway import routes as paths
from app.gateway.auth import TokenChecker
from app.gateway.errors import Reply, clean_message, engine_error_message, error_reply, sse_error_event
from app.gateway.http11 import (
    PENDING,
    REQUEST_RECEIVE_TIMEOUT_SECONDS,
    WRITE_TIMEOUT_SECONDS,
    Exchange,
    PoolExhausted,
    Request,
    ResponseHead,
    ServerConnection,
    Upstream,
    UpstreamConnection,
    UpstreamError,
    request_bytes,
    response_head,
)
from app.gateway.stats import RequestRecord, RequestStats

logger = logging.getLogger(__name__)

# Largest request body accepted (base64 images make multimodal requests large; text requests are tiny).
MAX_BODY_BYTES = 32 * 1024 * 1024
# Largest non-streamed response kept in memory to count its tokens; larger ones pass through uncounted.
MAX_COUNTED_RESPONSE_BYTES = 4 * 1024 * 1024
# Largest error body read from an engine to re-shape it (the message is what is kept).
MAX_ERROR_BODY_BYTES = 64 * 1024
# Waiting this long for the engine's next byte means it hangs: 504 before headers, an SSE error event after.
UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# What a 503 tells clients to wait before retrying (loading, restarting, draining).
RETRY_AFTER_SECONDS = 5
# Client connections at most (each proxied one also holds a connection to an engine): past it a new connection
# gets 503 and is closed. The open-file limit is raised to what this needs, where the hard limit allows.
MAX_CONNECTIONS = 8192
# Requests held at most per model while it restarts or wakes; past it they get 503 at once.
MAX_HELD_REQUESTS = 4096
# How long a request for a restarting model is held before 503 (the deployment's config sets it).
RESTART_HOLD_SECONDS = 120.0

_JSON = [(b"content-type", b"application/json")]


class EngineHandle(Protocol):
    """What the gateway needs of an engine (`app.engine.Engine` has it; tests pass simple objects)."""

    url: str
    state: str

    async def wait_serving(self, deadline_s: float) -> bool:
        """Until the engine serves again after a crash (True), it failed for good, or the deadline passed."""
        ...


class Residency(Protocol):
    """Models sharing GPUs (`app.residency.Residency`): a request enters a resident model at once, or waits while
    it wakes; the model cannot sleep until every request that entered has left."""

    def enter(self, endpoint: str) -> bool: ...

    async def wait_resident(self, endpoint: str, deadline_s: float) -> bool: ...

    def leave(self, endpoint: str, now: float) -> None: ...

    def describe(self) -> dict[str, dict[str, object]]: ...

    def state(self, endpoint: str) -> str: ...


_WAITS_FOR_WAKE = frozenset({"sleeping", "waking"})
RESTARTING = "restarting"


@dataclass
class ModelRoute:
    endpoint: str
    engine: EngineHandle
    api_key: str | None = None  # the engine's own key, sent upstream instead of the client's token
    adapters: tuple[str, ...] = ()
    residency: Residency | None = field(default=None, repr=False)  # when models share GPUs by sleeping
    wake_deadline_s: float = 120.0
    restart_hold_s: float = RESTART_HOLD_SECONDS
    upstream: Upstream | None = field(default=None, repr=False)
    held: int = 0  # requests waiting for it to wake or come back
    _host: bytes = field(default=b"", repr=False)
    _authorization: bytes | None = field(default=None, repr=False)


class Activity(Protocol):
    """Told when a proxied request starts and ends (the idle policy)."""

    def request_started(self, now: float) -> None: ...

    def request_finished(self, now: float) -> None: ...


def _unavailable(route: ModelRoute, state: str, waited_s: float | None = None) -> Reply:
    message = (f"Model {route.endpoint!r} is still {state} after {waited_s:g} s; retry shortly"
               if waited_s is not None else f"Model {route.endpoint!r} is {state}; retry shortly")
    return error_reply(503, message, state, retry_after_s=RETRY_AFTER_SECONDS)


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
    ):
        self.routes = {r.endpoint: r for r in routes}
        self._endpoints = frozenset(self.routes)
        self.auth = auth
        self.stats = stats
        self.activity = activity
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.upstream_read_timeout_s = upstream_read_timeout_s
        self.request_receive_timeout_s = request_receive_timeout_s
        self.write_timeout_s = write_timeout_s
        self.max_connections = max_connections
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[ServerConnection] = set()
        self._refused_connections = 0
        self.port: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ----- lifecycle -----

    async def start(self, host: str, port: int) -> None:
        self.loop = loop = asyncio.get_running_loop()
        for route in self.routes.values():
            parts = urlsplit(route.engine.url)
            route.upstream = Upstream(parts.hostname or "127.0.0.1", parts.port or 80,
                                      connect_timeout_s=UPSTREAM_CONNECT_TIMEOUT_SECONDS, loop=loop)
            route._host = parts.netloc.encode()
            route._authorization = f"Bearer {route.api_key}".encode() if route.api_key else None
        self.max_connections = raise_open_file_limit(self.max_connections)

        def connection() -> ServerConnection:
            return _TrackedConnection(self, loop)

        self._server = await loop.create_server(connection, host, port, reuse_address=True, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("Gateway listening on %s:%s", host, self.port)

    def begin_drain(self) -> None:
        """Stop accepting proxied requests (503 + Retry-After); the ones in flight go on."""
        self.draining = True

    async def wait_drained(self, deadline_s: float) -> bool:
        """Wait until nothing is in flight, at most `deadline_s`; True when drained."""
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                conn.abort()
            await self._server.wait_closed()
        for route in self.routes.values():
            if route.upstream is not None:
                route.upstream.close()

    # ----- requests -----

    def _screen(self, request: Request) -> Reply | None:
        """Judge a request on its head, before its body is read: the token first, then the route."""
        route = paths.classify(request.method, request.path, self._endpoints)
        request.context = route
        if route.kind == "open":
            if request.header(b"content-length") not in (None, b"0") or request.header(b"transfer-encoding"):
                return error_reply(400, f"{request.path} takes no request body", "unexpected_body")
            return None
        authorization = request.header(b"authorization")
        if not self.auth.check(authorization.decode("latin-1") if authorization is not None else None):
            return error_reply(401, "Missing or invalid access token: send 'Authorization: Bearer <token>'",
                               "invalid_api_key", headers=((b"www-authenticate", b"Bearer"),))
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

    def _handle(self, request: Request, conn: ServerConnection) -> object:
        """Answer at once (None), or start relaying to an engine (PENDING, or an awaitable when it must wait for
        a connection to the engine, a model waking or restarting)."""
        route: paths.Route = request.context  # type: ignore[assignment]
        if route.kind != "relay":
            conn.reply(self._own(route))
            return None
        model = self._model_route(request, route)
        if isinstance(model, Reply):
            conn.reply(model)
            return None
        target = (route.target.encode() + (b"?" + request.query if request.query else b""))
        residency = model.residency
        if residency is not None and residency.enter(model.endpoint):
            return _Relay(self, request, conn, model, target).start()
        state = _state(model)
        if (residency is not None and state in _WAITS_FOR_WAKE) or state == RESTARTING:
            if model.held >= MAX_HELD_REQUESTS:
                conn.reply(_unavailable(model, state))
                return None
            return self._held(request, conn, model, target, state)
        if residency is not None or state != "resident":  # (resident to the engine, not yet measured: loading)
            conn.reply(_unavailable(model, "loading" if state == "resident" else state))
            return None
        return _Relay(self, request, conn, model, target).start()

    def _model_route(self, request: Request, route: paths.Route) -> ModelRoute | Reply:
        """The model a relayed request goes to: the path's, or the one its JSON body names."""
        if route.takes_json(request.method) and not _json_object(request.body):
            return error_reply(400, "The request body must be one JSON object", "invalid_json")
        if route.endpoint is not None:
            return self.routes[route.endpoint]
        model = _model_field(request.body)
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

    async def _held(self, request: Request, conn: ServerConnection, route: ModelRoute, target: bytes,
                    state: str) -> object:
        """Hold a request for a model that is waking (one wake-up for all) or restarting after a crash, until it
        serves again, at most its deadline; then relay it, or 503 + Retry-After."""
        route.held += 1
        try:
            if state == RESTARTING:
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
            if state != RESTARTING:
                conn.reply(_unavailable(route, "waking", waited_s=deadline))
            elif _state(route) == RESTARTING:
                conn.reply(_unavailable(route, RESTARTING, waited_s=deadline))
            else:  # it failed for good, or the deployment is stopping
                conn.reply(_unavailable(route, _state(route)))
            return None
        started = _Relay(self, request, conn, route, target).start()
        return await started if started is not PENDING else PENDING  # type: ignore[misc]

    def _own(self, route: paths.Route) -> Reply:
        """The answers the gateway makes itself."""
        if route.kind == "open":
            return self._healthz() if route.path == "/healthz" else self._readyz()
        if route.kind == "metrics":
            return Reply(200, self.stats.prometheus(self.in_flight, self.states()).encode(),
                         content_type=b"text/plain; version=0.0.4; charset=utf-8")
        cards = self._models(route.endpoint)
        if route.model_id is None:
            return Reply(200, json.dumps({"object": "list", "data": cards}).encode())
        for card in cards:
            if route.model_id == card["id"] or (route.endpoint is not None
                                                 and f"{route.endpoint}:{route.model_id}" == card["id"]):
                return Reply(200, json.dumps(card).encode())
        return error_reply(404, f"The model {route.model_id!r} does not exist", "model_not_found", param="model")

    def _failed(self, conn: ServerConnection, exchange: Exchange, route: ModelRoute, status: int) -> int:
        """The engine failed or went silent: say so in the way the client can still hear."""
        timed_out = exchange.timed_out
        code, reason = (504, "engine_timeout") if timed_out else (502, "engine_crashed")
        what = "stopped answering" if timed_out else "failed mid-response"
        if exchange.head is None:
            if timed_out:
                conn.reply(error_reply(504, f"Model {route.endpoint!r} did not answer in time", reason))
            else:
                conn.reply(error_reply(502, f"Model {route.endpoint!r} failed before answering", "engine_unreachable"))
            return code
        logger.warning("Response from %s was cut: the engine %s", route.endpoint, what)
        if (exchange.head.header(b"content-type") or b"").startswith(b"text/event-stream"):
            conn.write(sse_error_event(code, f"Model {route.endpoint!r} {what}", reason))
            conn.end()
        else:
            conn.abort()  # a body cut short: the client must not take it for a whole one
        return code

    def _enter(self, now: float) -> None:
        self.in_flight += 1
        self._idle.clear()
        if self.activity is not None:
            self.activity.request_started(now)

    def _leave(self, now: float) -> None:
        self.in_flight -= 1
        if self.activity is not None:
            self.activity.request_finished(now)
        if self.in_flight == 0:
            self._idle.set()

    # ----- answers of the gateway itself -----

    def states(self) -> dict[str, str]:
        """Each model's state; where models share GPUs, the residency's (an engine just up is `loading` until it
        has been measured and can take requests)."""
        return {name: _state(route) for name, route in self.routes.items()}

    def _healthz(self) -> Reply:
        return Reply(200, b'{"status": "ok"}')

    def _readyz(self) -> Reply:
        """Ready when every model can answer: resident, or sleeping/waking (a request wakes it)."""
        states = self.states()
        ready = all(s == "resident" or s in _WAITS_FOR_WAKE for s in states.values()) and not self.draining
        body: dict[str, Any] = {"ready": ready, "draining": self.draining, "models": states}
        described = {}
        for route in self.routes.values():
            if route.residency is not None:
                described = route.residency.describe()
                break
        if described:
            body["residency"] = described
        return Reply(200 if ready else 503, json.dumps(body).encode())

    def _models(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Model cards: every model and adapter (or one endpoint's), with its state and no file path."""
        created = int(time.time())
        data = []
        for name, route in self.routes.items():
            if endpoint is not None and name != endpoint:
                continue
            state = _state(route)
            data.append({"id": name, "object": "model", "created": created, "owned_by": "clearml-sglang",
                         "state": state})
            data += [{"id": f"{name}:{adapter}", "object": "model", "created": created, "owned_by": "clearml-sglang",
                      "parent": name, "state": state} for adapter in route.adapters]
        return data


def raise_open_file_limit(connections: int) -> int:
    """Raise this process's open-file limit to what `connections` client connections need (each with one to an
    engine, and room for the rest), as far as the hard limit allows; the connections that fit."""
    needed = 2 * connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("Could not raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitting = max(1, (soft - 1024) // 2)
        logger.warning("The open-file limit (%d) allows %d client connections, not %d: raise `ulimit -n` for more",
                       soft, fitting, connections)
        return fitting
    return connections


def _state(route: ModelRoute) -> str:
    return route.residency.state(route.endpoint) if route.residency is not None else route.engine.state


class _Relay:
    """One proxied request: sends it on a kept-alive connection to the engine (or a new one), relays the answer
    on the connections' callbacks, and records it when it ends, whichever way it ends. An engine's error (any
    status from 400) is not relayed as it came: its message is read, cleaned and answered in the one error shape."""

    __slots__ = ("gateway", "request", "conn", "route", "data", "started", "sent_at", "usage", "status",
                 "streamed", "exchange", "attempt", "reused", "loop", "error_body")

    def __init__(self, gateway: Gateway, request: Request, conn: ServerConnection, route: ModelRoute, target: bytes):
        self.gateway, self.request, self.conn, self.route = gateway, request, conn, route
        self.data = request_bytes(request.method, target, route._host, request.headers, request.body,
                                  route._authorization)
        self.started = gateway.clock()
        self.usage = _UsageScanner()
        self.status, self.streamed = 502, False
        self.exchange: Exchange | None = None
        self.attempt, self.reused = 0, False
        self.error_body: list[bytes] | None = None  # an engine's error response, read to be re-shaped
        self.loop = gateway.loop
        self.sent_at = self.loop.time()  # the exchange's clock, for the time to the first chunk
        gateway._enter(self.started)
        conn.on_lost = self._lost

    def start(self) -> object:
        assert self.route.upstream is not None
        connection = self.route.upstream.take_idle()
        if connection is None:
            return self._connect()
        self._send(connection)
        return PENDING

    async def _connect(self) -> object:
        assert self.route.upstream is not None
        try:
            connection = await self.route.upstream.acquire()
        except PoolExhausted:
            self.status = 503
            self._answer(error_reply(503, f"Model {self.route.endpoint!r} has too many requests open", "overloaded",
                                     retry_after_s=RETRY_AFTER_SECONDS))
            return None
        except UpstreamError as exc:
            self._answer(error_reply(502, f"Model {self.route.endpoint!r} is unreachable ({exc})",
                                     "engine_unreachable"))
            return None
        except asyncio.CancelledError:
            self._lost()
            raise
        self._send(connection)
        return PENDING

    def _send(self, connection: UpstreamConnection) -> None:
        self.attempt += 1
        self.reused = connection.used
        self.exchange = Exchange(self.conn, self.loop, self.gateway.upstream_read_timeout_s, self.usage.feed,
                                 self._on_headers, self._done)
        self.exchange.send(connection, self.data)

    def _on_headers(self, head: ResponseHead) -> None:
        self.status = head.status
        if head.status >= 400:  # read the engine's error to answer it in the one shape
            self.error_body = []
            assert self.exchange is not None
            self.exchange.relaying = False
            self.exchange.on_chunk = self._error_chunk
            return
        self.streamed = head.content_length is None or (head.header(b"content-type") or b"").startswith(
            b"text/event-stream")
        self.usage.whole = not self.streamed and (head.content_length or 0) <= MAX_COUNTED_RESPONSE_BYTES
        self.conn.start(head.status, response_head(head), head.content_length)

    def _error_chunk(self, data: bytes) -> None:
        assert self.error_body is not None
        if sum(map(len, self.error_body)) < MAX_ERROR_BODY_BYTES:
            self.error_body.append(data)

    def _done(self, exchange: Exchange) -> None:
        if exchange.error is not None and exchange.head is None and self.reused and self.attempt == 1 \
                and not exchange.timed_out:
            # a kept-alive connection the engine had closed meanwhile: once more, on a fresh one
            result = self.start()
            if result is not PENDING:
                self.loop.create_task(self._retry(result))  # type: ignore[arg-type]
            return
        if self.error_body is not None:
            self.conn.reply(self._engine_error(exchange))
        elif exchange.error is not None:
            self.status = self.gateway._failed(self.conn, exchange, self.route, self.status)
        else:
            self.conn.end()
        self._finish()
        self.conn.request_done()

    def _engine_error(self, exchange: Exchange) -> Reply:
        """The engine's error in the one shape, its message cleaned of paths, tracebacks and keys. An engine that
        refuses the gateway's own key, or answers a route as unknown, is the gateway's fault to report: 502."""
        assert self.error_body is not None and exchange.head is not None
        status = exchange.head.status
        message = clean_message(engine_error_message(status, b"".join(self.error_body)),
                                (self.route.api_key or "",))
        endpoint = self.route.endpoint
        if status in (401, 403):
            self.status = 502
            logger.error("Model %s refused the gateway's key (%d)", endpoint, status)
            return error_reply(502, f"Model {endpoint!r} refused the gateway's request", "engine_refused")
        if status == 503:
            return error_reply(503, f"Model {endpoint!r} is busy: {message}", "engine_unavailable",
                               retry_after_s=RETRY_AFTER_SECONDS)
        if status >= 500:
            return error_reply(status, f"Model {endpoint!r} failed: {message}", "engine_error")
        return error_reply(status, message, _ENGINE_CODES.get(status, "invalid_request"))

    async def _retry(self, connecting: Awaitable[object]) -> None:
        if await connecting is not PENDING:
            self.conn.request_done()

    def _answer(self, reply: Reply) -> None:
        self.conn.reply(reply)
        self._finish()

    def _lost(self) -> None:
        """The client went away: the engine's connection closes, which makes the engine abort the request."""
        if self.exchange is not None and not self.exchange.finished:
            self.exchange.abandon()
        self.status = 499
        self._finish()

    def _finish(self) -> None:
        if self.started is None:
            return  # recorded already
        gateway, exchange = self.gateway, self.exchange
        ended = gateway.clock()
        gateway._leave(ended)
        self.conn.on_lost = None
        first = exchange.first_byte_at if exchange is not None else None
        ttft = first - self.sent_at if self.streamed and first is not None else None
        found = self.usage.result()
        gateway.stats.record(RequestRecord(
            endpoint=self.route.endpoint, status=self.status, latency_s=ended - self.started, ttft_s=ttft,
            prompt_tokens=(found or {}).get("prompt_tokens"),
            completion_tokens=(found or {}).get("completion_tokens"), stream=self.streamed))
        self.started = None
        self.exchange = None  # the exchange's callbacks point back here: no cycle left for the collector
        if self.route.residency is not None:
            self.route.residency.leave(self.route.endpoint, ended)


_ENGINE_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                 413: "request_too_large", 422: "invalid_request", 429: "rate_limited"}


class _TrackedConnection(ServerConnection):
    """A server connection the gateway can find again (to close them all when it stops), within its cap."""

    def __init__(self, gateway: Gateway, loop: asyncio.AbstractEventLoop):
        super().__init__(gateway._handle, lambda: gateway.max_body_bytes, loop, gateway.request_receive_timeout_s,
                         screen=gateway._screen, on_response=gateway.stats.count_response,
                         write_timeout_s=gateway.write_timeout_s)
        self._gateway = gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gateway = self._gateway
        if len(gateway._connections) >= gateway.max_connections:
            if gateway._refused_connections % 1000 == 0:
                logger.warning("%d client connections are open (the most allowed): new ones get 503",
                               len(gateway._connections))
            gateway._refused_connections += 1
            super().connection_made(transport)
            self.keep_alive = False
            self.reply(error_reply(503, "Too many connections are open; retry shortly", "too_many_connections",
                                   retry_after_s=RETRY_AFTER_SECONDS))
            self._close()
            return
        gateway._connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gateway._connections.discard(self)
        super().connection_lost(exc)


def _json_object(body: bytes) -> bool:
    """Whether a body is (at least at its start) one JSON object; arrays, strings and empty bodies are not. The
    engine parses it whole; this only keeps what no inference route takes from reaching it."""
    return body.lstrip(b" \t\r\n")[:1] == b"{"


_MODEL_RE = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
_USAGE_RE = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens)"\s*:\s*(\d+)')


def _model_field(body: bytes) -> str | None:
    if not body or b'"model"' not in body:
        return None
    match = _MODEL_RE.search(body)
    if match is not None and body.count(b'"model"') == 1:  # the common case, without parsing the whole body
        return match.group(1).decode("utf-8", "replace")
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _usage_from_json(data: bytes) -> dict[str, int] | None:
    """The token counts of a usage block (found by pattern: parsing whole responses costs more than proxying)."""
    at = data.find(b'"usage"')
    if at < 0 or data.startswith(b"null", at + 8) or data.startswith(b" null", at + 8):
        return None
    found = {k.decode(): int(v) for k, v in _USAGE_RE.findall(data, at)}
    return found or None


class _UsageScanner:
    """Finds a response's token usage: in a whole JSON body, or in a stream's SSE events (usually the last one)."""

    def __init__(self) -> None:
        self.usage: dict[str, int] | None = None
        self.whole = False  # the response is one JSON document: keep it to read its usage at the end
        self._body: list[bytes] = []
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        if self.whole:
            self._body.append(chunk)
            return
        if b'"usage"' not in chunk and not self._partial:
            return
        text = self._partial + chunk
        events = text.split(b"\n\n")
        self._partial = events.pop() if not text.endswith(b"\n\n") else b""
        if len(self._partial) > MAX_COUNTED_RESPONSE_BYTES:
            self._partial = b""
        for event in events:
            if b'"usage"' not in event:
                continue
            for line in event.split(b"\n"):
                if line.startswith(b"data:") and b'"usage"' in line:
                    usage = _usage_from_json(line[5:].strip())
                    if usage:
                        self.usage = usage

    def result(self) -> dict[str, int] | None:
        if self.whole and self._body:
            return _usage_from_json(b"".join(self._body))
        return self.usage
