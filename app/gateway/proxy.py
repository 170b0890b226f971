"""The gateway: bearer auth, routing to engines, streaming pass-through, OpenAI-shaped errors, stats, draining.

Routes (DESIGN section 4):
    GET  /healthz                    liveness of the gateway itself (no token)
    GET  /readyz                     200 when every model is ready, else 503 with each model's state (no token)
    GET  /metrics                    the gateway's metrics, Prometheus text
    GET  /v1/models                  every model and LoRA adapter
    *    /v1/...                     routed by the body's "model": an endpoint name or "endpoint:adapter"
    *    /<endpoint>/...             routed by path: /<endpoint>/v1/chat/completions, /<endpoint>/generate, ...

Every route but /healthz and /readyz needs `Authorization: Bearer <token>`; a request without a valid token is
answered 401 here and never reaches an engine. The client's token is replaced by the engine's own key upstream.
Responses are relayed as they arrive (`app.gateway.http11`): a stream's chunks reach the client as the engine
produces them, and a client that disconnects closes its upstream connection, which makes SGLang abort the
request. Errors: 404 unknown model or route, 413 body too large, 502 engine unreachable or failed (an SSE error
event when a stream was already under way), 503 loading or draining (`Retry-After`), 504 engine silent too long.

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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from app.gateway.auth import TokenChecker
from app.gateway.http11 import (
    PENDING,
    REQUEST_RECEIVE_TIMEOUT_SECONDS,
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
# Waiting this long for the engine's next byte means it hangs: 504 before headers, an SSE error event after.
UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# What a 503 tells clients to wait before retrying (loading, restarting, draining).
RETRY_AFTER_SECONDS = 5

_OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Engine routes a client token must not reach (the gateway would call them with the engine's own key): SGLang's
# memory and weight controls (the app's residency policy owns them), profiling and logging controls, scheduling
# controls, and the router's worker registry.
ADMIN_ROUTES = frozenset({
    "release_memory_occupation", "resume_memory_occupation", "update_weights_from_disk",
    "update_weights_from_tensor", "update_weights_from_distributed", "update_weights_from_ipc",
    "init_weights_update_group", "destroy_weights_update_group", "begin_weight_update", "end_weight_update",
    "start_profile", "stop_profile", "configure_logging", "set_internal_state", "freeze_gc",
    "pause_generation", "continue_generation", "workers", "add_worker", "remove_worker",
})
_JSON = [(b"content-type", b"application/json")]


class EngineHandle(Protocol):
    """What the gateway needs of an engine (`app.engine.Engine` has it; tests pass simple objects)."""

    url: str
    state: str


class Residency(Protocol):
    """Models sharing GPUs (`app.residency.Residency`): a request enters a resident model at once, or waits while
    it wakes; the model cannot sleep until every request that entered has left."""

    def enter(self, endpoint: str) -> bool: ...

    async def wait_resident(self, endpoint: str, deadline_s: float) -> bool: ...

    def leave(self, endpoint: str, now: float) -> None: ...

    def describe(self) -> dict[str, dict[str, object]]: ...

    def state(self, endpoint: str) -> str: ...


_WAITS_FOR_WAKE = frozenset({"sleeping", "waking"})


@dataclass
class ModelRoute:
    endpoint: str
    engine: EngineHandle
    api_key: str | None = None  # the engine's own key, sent upstream instead of the client's token
    adapters: tuple[str, ...] = ()
    residency: Residency | None = field(default=None, repr=False)  # when models share GPUs by sleeping
    wake_deadline_s: float = 120.0
    upstream: Upstream | None = field(default=None, repr=False)
    _host: bytes = field(default=b"", repr=False)
    _authorization: bytes | None = field(default=None, repr=False)


class Activity(Protocol):
    """Told when a proxied request starts and ends (the idle policy)."""

    def request_started(self, now: float) -> None: ...

    def request_finished(self, now: float) -> None: ...


@dataclass(frozen=True)
class Answer:
    """A response the gateway makes itself."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"


def openai_error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> Answer:
    body = json.dumps({"error": {"message": message, "type": kind, "code": code or str(status)}}).encode()
    return Answer(status, body, tuple((k.lower().encode(), v.encode()) for k, v in headers.items()))


def _sse_error(message: str, code: int) -> bytes:
    body = {"error": {"message": message, "type": "engine_error", "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


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
    ):
        self.routes = {r.endpoint: r for r in routes}
        self.auth = auth
        self.stats = stats
        self.activity = activity
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.upstream_read_timeout_s = upstream_read_timeout_s
        self.request_receive_timeout_s = request_receive_timeout_s
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[ServerConnection] = set()
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

        def connection() -> ServerConnection:
            return _TrackedConnection(self._handle, lambda: self.max_body_bytes, loop, self._connections,
                                      self.request_receive_timeout_s)

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

    def _handle(self, request: Request, conn: ServerConnection) -> object:
        """Answer at once (None), or start relaying to an engine (PENDING, or an awaitable when a new connection
        to the engine must be opened first)."""
        answer = self._answer(request)
        if answer is not None:
            self._send(conn, answer)
            return None
        route, target = self._route(request)
        if isinstance(route, Answer):
            self._send(conn, route)
            return None
        residency = route.residency
        if residency is not None and residency.enter(route.endpoint):
            return _Relay(self, request, conn, route, target).start()
        state = _state(route)
        if residency is not None and state in _WAITS_FOR_WAKE:
            return self._after_wake(request, conn, route, target)
        if residency is not None or state != "resident":  # (resident to the engine, not yet measured: loading)
            self._send(conn, self._unavailable(route, "loading" if state == "resident" else state))
            return None
        return _Relay(self, request, conn, route, target).start()

    async def _after_wake(self, request: Request, conn: ServerConnection, route: ModelRoute,
                          target: bytes) -> object:
        """Hold a request for a sleeping model while it wakes (one wake-up for all), at most its deadline."""
        assert route.residency is not None
        if not await route.residency.wait_resident(route.endpoint, route.wake_deadline_s):
            self._send(conn, self._unavailable(route, _state(route), waking=True))
            return None
        started = _Relay(self, request, conn, route, target).start()
        return await started if started is not PENDING else PENDING  # type: ignore[misc]

    @staticmethod
    def _unavailable(route: ModelRoute, state: str, waking: bool = False) -> Answer:
        message = (f"Model {route.endpoint!r} is still waking after {route.wake_deadline_s:g} s; retry shortly"
                   if waking else f"Model {route.endpoint!r} is {state}; retry shortly")
        return openai_error(503, message, "service_unavailable", state, **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    def _answer(self, request: Request) -> Answer | None:
        """What the gateway answers itself, before any routing; None to proxy the request."""
        path = request.path
        if path in _OPEN_PATHS:
            return self._healthz() if path == "/healthz" else self._readyz()
        authorization = request.header(b"authorization")
        if not self.auth.check(authorization.decode("latin-1") if authorization is not None else None):
            return openai_error(401, "Missing or invalid access token: send 'Authorization: Bearer <token>'",
                                "authentication_error", "invalid_api_key", **{"WWW-Authenticate": "Bearer"})
        if path == "/metrics":
            return Answer(200, self.stats.prometheus(self.in_flight, self.states()).encode(),
                          content_type=b"text/plain; version=0.0.4; charset=utf-8")
        if path == "/v1/models" and request.method == "GET":
            return Answer(200, json.dumps(self._models()).encode())
        if request.method == "HEAD":  # no SGLang route answers HEAD
            return openai_error(405, "HEAD is not supported", "invalid_request_error", "method_not_allowed")
        if request.too_large:
            return openai_error(413, f"Request body is larger than {self.max_body_bytes} bytes",
                                "invalid_request_error", "request_too_large")
        if self.draining:
            return openai_error(503, "The deployment is shutting down", "service_unavailable", "draining",
                                **{"Retry-After": str(RETRY_AFTER_SECONDS)})
        return None

    def _route(self, request: Request) -> tuple[ModelRoute | Answer, bytes]:
        path = request.path
        target = request.path.encode("utf-8") + (b"?" + request.query if request.query else b"")
        if path.startswith("/v1/"):
            model = _model_field(request.body)
            if model is None:
                if len(self.routes) == 1:
                    return next(iter(self.routes.values())), target
                return openai_error(400, "The request names no model: set \"model\" to one of "
                                    + ", ".join(sorted(self.routes)), "invalid_request_error", "model_required"), b""
            endpoint = model if model in self.routes else model.split(":", 1)[0]
            route = self.routes.get(endpoint)
            if route is None:
                return openai_error(404, f"The model {model[:200]!r} does not exist; available: "
                                    + ", ".join(sorted(self.routes)), "invalid_request_error", "model_not_found"), b""
            return route, target
        endpoint, _, rest = path[1:].partition("/")
        route = self.routes.get(endpoint)
        parts = unquote(rest).split("/")
        if route is None or ".." in parts:  # no way out of the engine's routes
            return openai_error(404, f"No route {path[:200]!r}: use /v1/... or /<endpoint>/...; endpoints: "
                                + ", ".join(sorted(self.routes)), "invalid_request_error", "not_found"), b""
        if parts[0] in ADMIN_ROUTES:
            return openai_error(403, f"/{parts[0]} is an administrative route of the engine, not served through "
                                "the endpoint", "permission_error", "admin_route"), b""
        return route, target[len(endpoint) + 1:]

    def _failed(self, conn: ServerConnection, exchange: Exchange, route: ModelRoute, status: int) -> int:
        """The engine failed or went silent: say so in the way the client can still hear."""
        timed_out = exchange.timed_out
        code = 504 if timed_out else 502
        what = "stopped answering" if timed_out else "failed mid-response"
        if exchange.head is None:
            if timed_out:
                self._send(conn, openai_error(504, f"Model {route.endpoint!r} did not answer in time",
                                              "engine_timeout"))
            else:
                self._send(conn, openai_error(502, f"Model {route.endpoint!r} failed before answering",
                                              "engine_unreachable"))
            return code
        logger.warning("Response from %s was cut: the engine %s", route.endpoint, what)
        if (exchange.head.header(b"content-type") or b"").startswith(b"text/event-stream"):
            conn.write(_sse_error(f"Model {route.endpoint!r} {what}", code))
            conn.end()
        else:
            conn.abort()  # a body cut short: the client must not take it for a whole one
        return code

    def _send(self, conn: ServerConnection, answer: Answer) -> None:
        conn.respond(answer.status, [(b"content-type", answer.content_type), *answer.headers], answer.body)

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

    def _healthz(self) -> Answer:
        return Answer(200, b'{"status": "ok"}')

    def _readyz(self) -> Answer:
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
        return Answer(200 if ready else 503, json.dumps(body).encode())

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        data = []
        for name, route in self.routes.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "clearml-sglang",
                         "state": _state(route)})
            data += [{"id": f"{name}:{adapter}", "object": "model", "created": created, "owned_by": "clearml-sglang",
                      "parent": name, "state": _state(route)} for adapter in route.adapters]
        return {"object": "list", "data": data}


def _state(route: ModelRoute) -> str:
    return route.residency.state(route.endpoint) if route.residency is not None else route.engine.state


class _Relay:
    """One proxied request: sends it on a kept-alive connection to the engine (or a new one), relays the answer
    on the connections' callbacks, and records it when it ends, whichever way it ends."""

    __slots__ = ("gateway", "request", "conn", "route", "data", "started", "sent_at", "usage", "status",
                 "streamed", "exchange", "attempt", "reused", "loop")

    def __init__(self, gateway: Gateway, request: Request, conn: ServerConnection, route: ModelRoute, target: bytes):
        self.gateway, self.request, self.conn, self.route = gateway, request, conn, route
        self.data = request_bytes(request.method, target, route._host, request.headers, request.body,
                                  route._authorization)
        self.started = gateway.clock()
        self.usage = _UsageScanner()
        self.status, self.streamed = 502, False
        self.exchange: Exchange | None = None
        self.attempt, self.reused = 0, False
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
            self._answer(openai_error(503, f"Model {self.route.endpoint!r} has too many requests open",
                                      "service_unavailable", "overloaded",
                                      **{"Retry-After": str(RETRY_AFTER_SECONDS)}))
            return None
        except UpstreamError as exc:
            self._answer(openai_error(502, f"Model {self.route.endpoint!r} is unreachable ({exc})",
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
        self.streamed = head.content_length is None or (head.header(b"content-type") or b"").startswith(
            b"text/event-stream")
        self.usage.whole = not self.streamed and (head.content_length or 0) <= MAX_COUNTED_RESPONSE_BYTES
        self.conn.start(response_head(head), head.content_length)

    def _done(self, exchange: Exchange) -> None:
        if exchange.error is not None and exchange.head is None and self.reused and self.attempt == 1 \
                and not exchange.timed_out:
            # a kept-alive connection the engine had closed meanwhile: once more, on a fresh one
            result = self.start()
            if result is not PENDING:
                self.loop.create_task(self._retry(result))  # type: ignore[arg-type]
            return
        if exchange.error is not None:
            self.status = self.gateway._failed(self.conn, exchange, self.route, self.status)
        else:
            self.conn.end()
        self._finish()
        self.conn.request_done()

    async def _retry(self, connecting: Awaitable[object]) -> None:
        if await connecting is not PENDING:
            self.conn.request_done()

    def _answer(self, answer: Answer) -> None:
        self.gateway._send(self.conn, answer)
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


class _TrackedConnection(ServerConnection):
    """A server connection the gateway can find again (to close them all when it stops)."""

    def __init__(self, handler, max_body_bytes, loop, registry: set[ServerConnection], receive_timeout_s: float):
        super().__init__(handler, max_body_bytes, loop, receive_timeout_s)
        self._registry = registry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(exc)


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
