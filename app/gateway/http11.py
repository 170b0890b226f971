"""HTTP/1.1 at the protocol level, for the gateway's hot path: a server connection and an upstream connection pool.

Why not a framework: a proxy in a framework pays for routing, middleware, header objects and a client session on
every request; measured on this machine, an aiohttp proxy spent 230 µs of CPU per request and added 0.4 ms at one
connection (bench/gateway.py). Here parsing is llhttp's (via `httptools`, the parser uvicorn uses), bytes go from
one transport to the other in the event loop's callbacks, and only the request's start runs as a coroutine.

- `ServerConnection` parses requests and answers them one at a time, in order. Every request is judged on its head
  first (`screen`: the token, the route, the size): one that is refused is answered when its turn comes, its body
  is never read, and the connection closes after it. What a connection can cost before anyone is authenticated is
  bounded: a head of at most `MAX_HEAD_BYTES`, one read of the socket, `REQUEST_RECEIVE_TIMEOUT_SECONDS`.
  Backpressure: a client is not read while it does not read its answers (and is cut off past
  `WRITE_TIMEOUT_SECONDS`), nor while a request of its own waits behind the one being answered; trailer fields are
  dropped; `Upgrade` is answered as plain HTTP and the connection closes; `Expect: 100-continue` is honoured only
  for a request that passed the screen. A client that goes away cancels its request's task.
- `Upstream` keeps idle keep-alive connections to one engine and opens more on demand (never queueing a request
  behind a busy connection); `Exchange` sends one request upstream and relays the response to the client as it
  arrives: headers, then every body chunk (re-framed with chunked encoding when the engine streams), pausing the
  engine's socket while the client's is full. Its idle timer ends an exchange whose engine stops sending.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

import httptools

from app.gateway.errors import Reply, error_reply

logger = logging.getLogger(__name__)

# Largest request head (request line + headers) accepted; nginx's default large_client_header_buffers is 32 KiB.
MAX_HEAD_BYTES = 64 * 1024
# A request must arrive whole within this long once it has started (slow-loris clients are cut off).
REQUEST_RECEIVE_TIMEOUT_SECONDS = 30.0
# A keep-alive connection with no request for this long is closed.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# A client that reads none of its answer for this long is cut off (nginx's send_timeout).
WRITE_TIMEOUT_SECONDS = 60.0
# Requests a client may send ahead of its answers (pipelining); past this the connection takes no more and closes
# once those are answered (RFC 9112 9.3.2: a client retries what was not answered).
MAX_PIPELINED = 16
# Idle connections kept per engine; more are opened on demand and closed after use.
MAX_IDLE_UPSTREAM = 512
# Connections per engine at most: past this a request fails at once (503) instead of queueing unseen.
MAX_UPSTREAM_CONNECTIONS = 16384
# How often requests in flight are checked for an engine that went silent (their idle timeout's resolution).
SWEEP_SECONDS = 0.5

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"expect",
})
# Response headers not relayed: framing (the gateway frames its own), the engine's identity, and its CORS answers
# (SGLang allows every origin with credentials; the gateway answers no preflight, so it grants no origin either).
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server",
                            b"trailer", b"access-control-allow-origin", b"access-control-allow-credentials",
                            b"access-control-allow-methods", b"access-control-allow-headers",
                            b"access-control-expose-headers", b"access-control-max-age"})


@functools.lru_cache(maxsize=128)
def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


@dataclass
class Request:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    keep_alive: bool = True
    refusal: Reply | None = None  # answered with this, its body unread, and the connection closes after it
    context: object = None  # what the screen found out about it, for the handler

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Stop(httptools.HttpParserError):
    """Raised in a parser callback: nothing more is parsed from this connection."""


# ----------------------------------------------------------------------------------------------------------
# the client side


# A handler answers at once (returns None), relays on callbacks and calls `request_done` later (returns PENDING),
# or needs to wait for something first (returns an awaitable, which then returns None or PENDING).
PENDING = object()
Handler = Callable[[Request, "ServerConnection"], object]
# Judges a request on its head (its body not read yet): a Reply refuses it.
Screen = Callable[[Request], "Reply | None"]


class ServerConnection(asyncio.Protocol):
    """One client connection. The handler answers with `reply`/`respond` (whole) or `start`/`write`/`end`
    (streamed)."""

    def __init__(self, handler: Handler, max_body_bytes: Callable[[], int], loop: asyncio.AbstractEventLoop,
                 receive_timeout_s: float = REQUEST_RECEIVE_TIMEOUT_SECONDS, *, screen: Screen | None = None,
                 write_timeout_s: float = WRITE_TIMEOUT_SECONDS, on_response: Callable[[int], None] | None = None):
        self._handler = handler
        self._screen = screen
        self._on_response = on_response  # told the status of every response sent
        self._max_body = max_body_bytes
        self._receive_timeout_s = receive_timeout_s
        self._write_timeout_s = write_timeout_s
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        # the request being received
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._request: Request | None = None  # its head has been read
        self._receiving = False  # a request has begun and is not complete yet
        self._in_trailers = False
        # requests received whole (or refused), answered one at a time in order
        self._pending: collections.deque[Request] = collections.deque()
        self._busy = False  # a request is being answered
        self._method = "GET"  # of the request being answered (HEAD: no body in the answer)
        self._task: asyncio.Task[None] | None = None
        self.on_lost: Callable[[], None] | None = None  # the relay of the request being answered
        self.on_writable: Callable[[], None] | None = None  # the exchange resumes its engine's socket
        self._stopped = False  # nothing more is taken from this connection: it closes once its answers are out
        self._reading = True
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        # deadlines (the loop's clock), one timer for them all
        self._receive_by: float | None = None
        self._idle_by: float | None = None
        self._write_by: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self._chunked = False
        self._pending_head: bytes | None = None
        self.keep_alive = True

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # a new connection must send its first request within the receive deadline (then keep-alive's)
        self._idle_by = self._loop.time() + min(KEEPALIVE_TIMEOUT_SECONDS, self._receive_timeout_s)
        self._schedule()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the request has been taken, to be answered as plain HTTP; what follows it is another protocol
            self._stop_reading()
        except httptools.HttpParserError:
            if not self._stopped:  # (else a callback stopped the parser on purpose)
                too_large = self._head_bytes > MAX_HEAD_BYTES
                self._refuse(error_reply(431 if too_large else 400, "Request header fields too large"
                                         if too_large else "Malformed HTTP request", "malformed_request"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writable.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: its request is abandoned, upstream included
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading it too, and cut it off if it stays that way."""
        self._write_paused = True
        self._writable.clear()
        self._write_by = self._loop.time() + self._write_timeout_s
        self._schedule()
        self._sync_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.set()
        self._write_by = None
        self._sync_reading()
        if self.on_writable is not None:
            self.on_writable()

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._body_size = b"", [], [], 0
        self._head_bytes = 0
        self._in_trailers = False
        self._request = None
        self._receiving = True
        self._idle_by = None
        self._receive_by = self._loop.time() + self._receive_timeout_s
        self._schedule()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value))
        if not self._in_trailers:  # trailer fields arrive after the request was judged: counted and dropped
            self._headers.append((name.lower(), value))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise httptools.HttpParserError("head too large")

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        parsed = httptools.parse_url(self._url)
        request = self._request = Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            path=parsed.path.decode("utf-8", "replace") if parsed.path else "/",
            query=parsed.query or b"",
            headers=self._headers,
            keep_alive=self._parser.should_keep_alive(),
        )
        refusal = self._screen(request) if self._screen is not None else None
        if refusal is None:
            length = request.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > self._max_body():
                refusal = self._too_large()
        if refusal is not None:
            self._refuse(refusal)
            raise _Stop  # its body is never read
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not self._busy and not self._pending:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._max_body():
            self._refuse(self._too_large())
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        request, self._request = self._request, None
        self._receiving = False
        self._receive_by = None
        if request is None:  # pragma: no cover - llhttp completes only messages whose head it read
            return
        request.body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        self._queue(request)
        if len(self._pending) >= MAX_PIPELINED:  # far ahead of its answers: take nothing more from it
            self._stop_reading()
            raise _Stop

    def _too_large(self) -> Reply:
        return error_reply(413, f"Request body is larger than {self._max_body()} bytes", "request_too_large")

    # ----- dispatch -----

    def _queue(self, request: Request) -> None:
        self._pending.append(request)
        if not self._busy:
            self._next()
        else:
            self._sync_reading()  # one request waits: read no further until its turn

    def _refuse(self, reply: Reply) -> None:
        """Answer the request being received with `reply` when its turn comes, then close; read nothing more."""
        request = self._request or Request("GET", "/", b"", [])
        request.refusal = reply
        self._request = None
        self._receiving = False
        self._receive_by = None
        self._stopped = True
        self._queue(request)
        self._sync_reading()

    def _stop_reading(self) -> None:
        """Take no more requests from this connection: answer those taken, then close."""
        self._stopped = True
        self._sync_reading()
        if not self._busy and not self._pending:
            self._close()

    def _sync_reading(self) -> None:
        """Read the client only while it reads its answers and has nothing waiting to be answered."""
        want = not self._stopped and not self._write_paused and not (self._busy and self._pending)
        if want != self._reading and self.transport is not None and not self.closed:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _next(self) -> None:
        while self._pending and not self.closed:
            request = self._pending.popleft()
            self._method = request.method
            self.keep_alive = request.keep_alive and request.refusal is None and not (
                self._stopped and not self._pending)  # the last answer of a stopped connection closes it
            self._busy = True
            if request.refusal is not None:
                self.reply(request.refusal)
                result = None
            else:
                try:
                    result = self._handler(request, self)
                except Exception:
                    result = None
                    self._internal_error()
            if result is PENDING:
                return  # the relay calls request_done
            if result is not None:
                self._task = self._loop.create_task(self._run(result))  # type: ignore[arg-type]
                return
            if not self._finished_one():
                return
        self._busy = False
        if not self.closed:
            if not self._receiving:
                self._idle_by = self._loop.time() + KEEPALIVE_TIMEOUT_SECONDS
                self._schedule()
            self._sync_reading()

    async def _run(self, awaitable: Awaitable[object]) -> None:
        try:
            result = await awaitable
        except asyncio.CancelledError:
            return
        except Exception:
            result = None
            self._internal_error()
        self._task = None
        if result is not PENDING:
            self.request_done()

    def request_done(self) -> None:
        """The current request has been answered: on to the next one (or close)."""
        self.on_lost = None
        if self._finished_one():
            self._next()

    def _finished_one(self) -> bool:
        """After an answer: False when the connection closes instead of serving another request."""
        self._busy = False
        if self.closed:
            return False
        if not self.keep_alive or (self._stopped and not self._pending):
            self._close()
            return False
        return True

    def _close(self) -> None:
        """Close once the answers are out; a client that does not take them is cut off at the write deadline."""
        if self.transport is None or self.closed:
            return
        self.transport.close()
        if self.transport.get_write_buffer_size() and self._write_by is None:
            self._write_by = self._loop.time() + self._write_timeout_s
            self._schedule()

    def _internal_error(self) -> None:
        logger.exception("Gateway handler failed")
        if not self.closed:
            self.keep_alive = False
            self.reply(error_reply(500, "The gateway failed to handle the request", "internal_error"))

    # ----- writing -----

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def reply(self, reply: Reply) -> None:
        self.respond(reply.status, [(b"content-type", reply.content_type), *reply.headers], reply.body)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._on_response is not None:
            self._on_response(status)
        head = [status_line(status)]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        head.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self._write(b"".join(head) + (body if self._method != "HEAD" else b""))

    def start(self, status: int, head: bytes, content_length: int | None) -> None:
        """Send a response head built by the caller (status line and headers, without the blank line); the body
        follows with `write`, chunked unless its length is known. The head goes out with the first body bytes when
        they arrive in the same turn of the event loop (one send instead of two), else at the end of that turn."""
        if self._on_response is not None:
            self._on_response(status)
        self._chunked = content_length is None
        extra = b"transfer-encoding: chunked\r\n" if self._chunked else b"content-length: %d\r\n" % content_length
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        self._pending_head = head + extra + b"\r\n"
        self._loop.call_soon(self._flush_head)

    def _flush_head(self) -> None:
        if self._pending_head is not None:
            head, self._pending_head = self._pending_head, None
            self._write(head)

    def write(self, data: bytes) -> None:
        if data:
            framed = b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data
            if self._pending_head is not None:
                framed, self._pending_head = self._pending_head + framed, None
            self._write(framed)

    def end(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._pending_head is not None:
            tail, self._pending_head = self._pending_head + tail, None
        if tail:
            self._write(tail)

    def abort(self) -> None:
        """Cut the connection (a response that cannot be finished properly)."""
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    @property
    def writable(self) -> bool:
        return self._writable.is_set()

    # ----- deadlines -----

    def _schedule(self) -> None:
        """Have the one timer fire at the earliest deadline; it is moved only when it would fire too late (most
        requests move none)."""
        deadlines = [d for d in (self._receive_by, self._idle_by, self._write_by) if d is not None]
        if not deadlines or self.closed:
            return
        when = min(deadlines)
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.closed or self.transport is None:
            return
        now = self._loop.time()
        if self._write_by is not None and now >= self._write_by:
            logger.debug("A client read none of its answer for %.0f s: cut off", self._write_timeout_s)
            self.transport.abort()  # the client takes no answers: nothing more is owed to it
            return
        if self._receive_by is not None and now >= self._receive_by:
            self._refuse(error_reply(408, "Request not received in time", "request_timeout"))
        elif self._idle_by is not None and now >= self._idle_by and not self._busy and not self._receiving:
            self._idle_by = None
            self._close()  # an idle keep-alive connection
            return
        self._schedule()


# ----------------------------------------------------------------------------------------------------------
# the engine side


class UpstreamError(Exception):
    """The engine could not be reached, or failed before its response began."""


class PoolExhausted(UpstreamError):
    pass


@dataclass
class ResponseHead:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    chunked: bool
    content_length: int | None

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to an engine; carries one exchange at a time."""

    def __init__(self, pool: Upstream):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reusable = False
        self.closed = False
        self.used = False  # has carried an exchange: an idle connection the engine may have closed meanwhile
        self._headers: list[tuple[bytes, bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.exchange is None:  # bytes from an idle connection: it is not in a state to reuse
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.exchange.failed(UpstreamError(f"malformed response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.exchange is not None:
            self.exchange.failed(UpstreamError("the engine closed the connection"))

    def on_message_begin(self) -> None:
        self._headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        length = next((v for k, v in self._headers if k == b"content-length"), None)
        chunked = any(k == b"transfer-encoding" and b"chunked" in v.lower() for k, v in self._headers)
        head = ResponseHead(self.parser.get_status_code(), b"", self._headers, chunked,
                            int(length) if length is not None and length.isdigit() else None)
        if self.exchange is not None:
            self.exchange.headers(head)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange.body(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        self.used = True
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.complete()
        self.pool.release(self)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()


class Upstream:
    """Keep-alive connections to one engine (`host:port`)."""

    def __init__(self, host: str, port: int, *, connect_timeout_s: float, loop: asyncio.AbstractEventLoop):
        self.host, self.port = host, port
        self.connect_timeout_s = connect_timeout_s
        self.loop = loop
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self.active: set[Exchange] = set()  # exchanges in flight, swept for silent engines
        self._sweeper: asyncio.TimerHandle | None = None

    def watch(self, exchange: Exchange) -> None:
        self.active.add(exchange)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def unwatch(self, exchange: Exchange) -> None:
        self.active.discard(exchange)

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for exchange in list(self.active):
            exchange.check_idle(now)
        if self.active:
            self._sweeper = self.loop.call_later(SWEEP_SECONDS, self._sweep)

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        return None

    async def acquire(self) -> UpstreamConnection:
        connection = self.take_idle()
        if connection is not None:
            return connection
        if self.open >= MAX_UPSTREAM_CONNECTIONS:
            raise PoolExhausted(f"{self.open} connections to the engine are busy")
        self.open += 1
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port),
                self.connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            self.open -= 1
            raise UpstreamError(f"cannot connect ({type(exc).__name__})") from None
        return connection

    def release(self, connection: UpstreamConnection) -> None:
        if connection.reusable and not connection.closed and len(self.idle) < MAX_IDLE_UPSTREAM:
            self.idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        self.open -= 1
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.close()
        self.idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class Exchange:
    """One request relayed to an engine and its response relayed back, chunk by chunk, on callbacks.

    `on_done(exchange)` is called once: when the response has ended, or failed (`error` set; `head` tells whether
    the response had begun). `abandon` (the client left) ends it without calling `on_done`.
    """

    __slots__ = ("client", "loop", "idle_timeout_s", "on_chunk", "on_headers", "on_done", "head", "first_byte_at",
                 "error", "timed_out", "connection", "finished", "relaying", "_last", "_pool")

    def __init__(self, client: ServerConnection, loop: asyncio.AbstractEventLoop, idle_timeout_s: float,
                 on_chunk: Callable[[bytes], None], on_headers: Callable[[ResponseHead], None],
                 on_done: Callable[[Exchange], None]):
        self.client, self.loop, self.idle_timeout_s = client, loop, idle_timeout_s
        self.on_chunk, self.on_headers, self.on_done = on_chunk, on_headers, on_done
        self.head: ResponseHead | None = None
        self.first_byte_at: float | None = None
        self.error: UpstreamError | None = None
        self.timed_out = False
        self.finished = False
        self.relaying = True  # the body goes to the client as it arrives (else only to on_chunk)
        self.connection: UpstreamConnection | None = None
        self._last = 0.0
        self._pool: Upstream | None = None

    def send(self, connection: UpstreamConnection, data: bytes) -> None:
        self.connection = connection
        connection.exchange = self
        self.client.on_writable = connection.resume
        connection.transport.write(data)  # type: ignore[union-attr]
        self._last = self.loop.time()
        self._pool = connection.pool
        self._pool.watch(self)

    # ----- from the upstream connection -----

    def headers(self, head: ResponseHead) -> None:
        self._last = self.loop.time()
        self.head = head
        self.on_headers(head)  # the client's response head goes out now

    def body(self, data: bytes) -> None:
        now = self.loop.time()
        self._last = now
        if self.first_byte_at is None:
            self.first_byte_at = now
        if self.relaying:
            self.client.write(data)
        self.on_chunk(data)
        if not self.client.writable and self.connection is not None:
            self.connection.pause()  # the client is slow: stop reading from the engine until it catches up

    def complete(self) -> None:
        if self.head is None:
            self.failed(UpstreamError("no response"))
            return
        self._end()

    def failed(self, error: UpstreamError) -> None:
        self.error = error
        self._end()

    def _end(self) -> None:
        if self.finished:
            return
        self.finished = True
        self._stop_timer()
        self.on_done(self)

    # ----- time and cancellation -----

    def check_idle(self, now: float) -> None:
        """Called by the pool's sweep: an engine silent for the whole idle timeout ends the exchange."""
        if self.finished or now - self._last < self.idle_timeout_s:
            return
        self.timed_out = True
        if self.connection is not None:
            self.connection.exchange = None
            self.connection.close()
        self.failed(UpstreamError("the engine stopped answering"))

    def _stop_timer(self) -> None:
        if self._pool is not None:
            self._pool.unwatch(self)
        self.client.on_writable = None

    def abandon(self) -> None:
        """The client is gone: close the engine's connection, so the engine aborts the request."""
        self.finished = True
        self._stop_timer()
        if self.connection is not None and self.connection.exchange is self:
            self.connection.exchange = None
            self.connection.close()


def request_bytes(method: str, target: bytes, host: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                  authorization: bytes | None) -> bytes:
    """The request as it goes to the engine: hop-by-hop headers and the client's token dropped."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1\r\nhost: " + host + b"\r\n"]
    lines += [name + b": " + value + b"\r\n" for name, value in headers if name not in _HOP_BY_HOP]
    if authorization is not None:
        lines.append(b"authorization: " + authorization + b"\r\n")
    lines.append(b"content-length: %d\r\n\r\n" % len(body))
    return b"".join(lines) + body


def response_head(head: ResponseHead) -> bytes:
    lines = [status_line(head.status)]
    lines += [name + b": " + value + b"\r\n" for name, value in head.headers if name not in _RESPONSE_DROP]
    return b"".join(lines)
