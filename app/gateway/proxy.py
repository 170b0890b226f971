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
Streams are forwarded chunk by chunk as they arrive; a client that disconnects cancels its handler, which closes
the upstream connection, which makes SGLang abort the request. One long-lived client session per engine.

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

import aiohttp
from aiohttp import web

from app.gateway.auth import TokenChecker
from app.gateway.stats import RequestRecord, RequestStats

logger = logging.getLogger(__name__)

# Largest request body accepted (base64 images make multimodal requests large; text requests are tiny).
MAX_BODY_BYTES = 32 * 1024 * 1024
# Largest non-streamed response read whole to count its tokens; larger ones pass through uncounted.
MAX_COUNTED_RESPONSE_BYTES = 4 * 1024 * 1024
# Waiting this long for the engine's next byte means it hangs: 504 before headers, an SSE error event after.
UPSTREAM_READ_TIMEOUT_SECONDS = 600.0
UPSTREAM_CONNECT_TIMEOUT_SECONDS = 10.0
# What a 503 tells clients to wait before retrying (loading, restarting, draining).
RETRY_AFTER_SECONDS = 5

_HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
    "transfer-encoding", "upgrade", "host", "content-length", "authorization",
})
_RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "date", "server"})
_OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class EngineHandle(Protocol):
    """What the gateway needs of an engine (`app.engine.Engine` has it; tests pass simple objects)."""

    url: str
    state: str


@dataclass
class ModelRoute:
    endpoint: str
    engine: EngineHandle
    api_key: str | None = None  # the engine's own key, sent upstream instead of the client's token
    adapters: tuple[str, ...] = ()
    session: aiohttp.ClientSession | None = field(default=None, repr=False)


class Activity(Protocol):
    """Told when a proxied request starts and ends (the idle policy)."""

    def request_started(self, now: float) -> None: ...

    def request_finished(self, now: float) -> None: ...


def openai_error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": code or str(status)}}
    return web.json_response(body, status=status, headers=headers or None)


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
    ):
        self.routes = {r.endpoint: r for r in routes}
        self.auth = auth
        self.stats = stats
        self.activity = activity
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.upstream_read_timeout_s = upstream_read_timeout_s
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    # ----- lifecycle -----

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def start(self, host: str, port: int) -> None:
        for route in self.routes.values():
            route.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60),
                timeout=aiohttp.ClientTimeout(total=None, connect=UPSTREAM_CONNECT_TIMEOUT_SECONDS,
                                              sock_read=self.upstream_read_timeout_s),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        # handler_cancellation: a client that goes away cancels its handler at once, even mid-wait
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        self.port = server.sockets[0].getsockname()[1] if server and server.sockets else port
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
        if self._runner is not None:
            await self._runner.cleanup()
        for route in self.routes.values():
            if route.session is not None:
                await route.session.close()

    # ----- requests -----

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in _OPEN_PATHS:
            return self._healthz() if path == "/healthz" else self._readyz()
        if not self.auth.check(request.headers.get("Authorization")):
            return openai_error(401, "Missing or invalid access token: send 'Authorization: Bearer <token>'",
                                "authentication_error", "invalid_api_key", **{"WWW-Authenticate": "Bearer"})
        if path == "/metrics":
            return web.Response(text=self.stats.prometheus(self.in_flight, self.states()),
                                content_type="text/plain", charset="utf-8")
        if path == "/v1/models" and request.method == "GET":
            return web.json_response(self._models())
        if self.draining:
            return openai_error(503, "The deployment is shutting down", "service_unavailable", "draining",
                                **{"Retry-After": str(RETRY_AFTER_SECONDS)})
        if (request.content_length or 0) > self.max_body_bytes:
            return self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        if len(body) > self.max_body_bytes:
            return self._too_large()
        route, upstream_path = self._route(path, body)
        if isinstance(route, web.Response):
            return route
        if route.engine.state != "resident":
            return openai_error(503, f"Model {route.endpoint!r} is {route.engine.state}; retry shortly",
                                "service_unavailable", route.engine.state,
                                **{"Retry-After": str(RETRY_AFTER_SECONDS)})
        return await self._proxy(request, route, upstream_path, body)

    def _route(self, path: str, body: bytes) -> tuple[ModelRoute | web.Response, str]:
        if path.startswith("/v1/"):
            model = _model_field(body)
            if model is None:
                if len(self.routes) == 1:
                    return next(iter(self.routes.values())), path
                return openai_error(400, "The request names no model: set \"model\" to one of "
                                    + ", ".join(sorted(self.routes)), "invalid_request_error", "model_required"), ""
            endpoint = model if model in self.routes else model.split(":", 1)[0]
            route = self.routes.get(endpoint)
            if route is None:
                return self._unknown_model(model), ""
            return route, path
        endpoint, _, rest = path[1:].partition("/")
        route = self.routes.get(endpoint)
        if route is None:
            return openai_error(404, f"No route {path!r}: use /v1/... or /<endpoint>/...; endpoints: "
                                + ", ".join(sorted(self.routes)), "invalid_request_error", "not_found"), ""
        return route, "/" + rest

    def _too_large(self) -> web.Response:
        return openai_error(413, f"Request body is larger than {self.max_body_bytes} bytes", "invalid_request_error",
                            "request_too_large")

    def _unknown_model(self, model: str) -> web.Response:
        return openai_error(404, f"The model {model[:200]!r} does not exist; available: "
                            + ", ".join(sorted(self.routes)), "invalid_request_error", "model_not_found")

    async def _proxy(self, request: web.Request, route: ModelRoute, upstream_path: str,
                     body: bytes) -> web.StreamResponse:
        started = self.clock()
        self._enter(started)
        status, ttft, usage, streamed = 502, None, None, False
        try:
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
            if route.api_key:
                headers["Authorization"] = f"Bearer {route.api_key}"
            url = route.engine.url + upstream_path + (f"?{request.query_string}" if request.query_string else "")
            assert route.session is not None
            try:
                upstream = await route.session.request(request.method, url, data=body or None, headers=headers,
                                                       allow_redirects=False)
            except asyncio.TimeoutError:
                status = 504
                return openai_error(504, f"Model {route.endpoint!r} did not answer in time", "engine_timeout")
            except aiohttp.ClientError as exc:
                status = 502
                return openai_error(502, f"Model {route.endpoint!r} is unreachable ({type(exc).__name__})",
                                    "engine_unreachable")
            async with upstream:
                status = upstream.status
                out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP}
                is_stream = upstream.headers.get("Content-Type", "").startswith("text/event-stream") or (
                    upstream.content_length is None and request.method != "HEAD")
                if not is_stream:
                    try:
                        data = await upstream.read()
                    except asyncio.TimeoutError:
                        status = 504
                        return openai_error(504, f"Model {route.endpoint!r} did not answer in time",
                                            "engine_timeout")
                    except aiohttp.ClientError:
                        status = 502
                        return openai_error(502, f"Model {route.endpoint!r} failed while answering",
                                            "engine_unreachable")
                    usage = _usage_from_json(data) if len(data) <= MAX_COUNTED_RESPONSE_BYTES else None
                    return web.Response(body=data, status=upstream.status, headers=out_headers)
                streamed = True
                response = web.StreamResponse(status=upstream.status, headers=out_headers)
                await response.prepare(request)
                tracker = _UsageScanner()
                try:
                    async for chunk in upstream.content.iter_any():
                        if ttft is None:
                            ttft = self.clock() - started
                        await response.write(chunk)
                        tracker.feed(chunk)
                except asyncio.TimeoutError:
                    status = 504
                    await response.write(_sse_error(f"Model {route.endpoint!r} stopped answering", 504))
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    status = 502
                    logger.warning("Stream from %s was cut: the engine failed mid-response", route.endpoint)
                    await response.write(_sse_error(f"Model {route.endpoint!r} failed mid-response", 502))
                usage = tracker.usage
                await response.write_eof()
                return response
        except (ConnectionResetError, asyncio.CancelledError):
            status = 499  # the client went away; leaving this block closes the upstream request
            raise
        finally:
            ended = self.clock()
            self._leave(ended)
            self.stats.record(RequestRecord(
                endpoint=route.endpoint, status=status, latency_s=ended - started, ttft_s=ttft,
                prompt_tokens=(usage or {}).get("prompt_tokens"),
                completion_tokens=(usage or {}).get("completion_tokens"), stream=streamed))

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
        return {name: route.engine.state for name, route in self.routes.items()}

    def _healthz(self) -> web.Response:
        return web.json_response({"status": "ok"})

    def _readyz(self) -> web.Response:
        states = self.states()
        ready = all(s == "resident" for s in states.values()) and not self.draining
        body = {"ready": ready, "draining": self.draining, "models": states}
        return web.json_response(body, status=200 if ready else 503)

    def _models(self) -> dict[str, Any]:
        created = int(time.time())
        data = []
        for name, route in self.routes.items():
            data.append({"id": name, "object": "model", "created": created, "owned_by": "clearml-sglang",
                         "state": route.engine.state})
            data += [{"id": f"{name}:{adapter}", "object": "model", "created": created, "owned_by": "clearml-sglang",
                      "parent": name, "state": route.engine.state} for adapter in route.adapters]
        return {"object": "list", "data": data}


def _model_field(body: bytes) -> str | None:
    if not body or b'"model"' not in body:
        return None
    try:
        value = json.loads(body).get("model")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _usage_from_json(data: bytes) -> dict[str, int] | None:
    if b'"usage"' not in data:
        return None
    try:
        usage = json.loads(data).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


class _UsageScanner:
    """Finds the usage block in a stream's SSE events, where it is (usually the last event)."""

    def __init__(self) -> None:
        self.usage: dict[str, int] | None = None
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
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
