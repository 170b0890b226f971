"""HTTP/1.1 at the protocol level, the client side: one connection, its requests parsed and answered in order.

Why not a framework: a proxy in a framework pays for routing, middleware, header objects and a client session on
every request; measured on this machine, an aiohttp proxy spent 230 µs of CPU per request and added 0.4 ms at one
connection (bench/gateway.py). Here parsing is llhttp's (via `httptools`, the parser uvicorn uses), bytes go from
one transport to the other in the event loop's callbacks, and only the request's start runs as a coroutine.

Every request is judged on its head first (`screen`: the token, the route, the size): one that is refused is
answered when its turn comes, its body is never read, and the connection closes after it. What a connection can
cost before anyone is authenticated is bounded: a head of at most `MAX_HEAD_BYTES` and `MAX_HEADER_FIELDS`
(`app.gateway.reader`), one read of the socket, and seconds: its first byte within `FIRST_BYTE_TIMEOUT_SECONDS`, its
head within `HEAD_TIMEOUT_SECONDS` (a connection that has sent an authenticated request gets the receive deadline
and keep-alive's). Every answer to an authenticated request is `Cache-Control: no-store`. Backpressure: a client is
not read while it does not read its answers (and is cut off past the write deadline), nor while a request of its own
waits behind the one being answered; trailer fields are dropped; `Upgrade` is answered as plain HTTP and the
connection closes (RFC 9110 7.8: a server may ignore it); `Expect: 100-continue` is honoured only for a request that
passed the screen (RFC 9110 10.1.1). A client that goes away cancels its request's task.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import (
    KEEPALIVE_TIMEOUT_SECONDS,
    MAX_PIPELINED,
    PENDING,
    Handled,
    Handler,
    Limits,
    Pending,
    Request,
    Screen,
    status_line,
)
from app.gateway.reader import AUTHENTICATED, BEGAN, CONTINUE, STOP, Deadlines, RequestReader

logger = logging.getLogger(__name__)

_NO_REQUEST = Request("GET", "", b"", [])  # (before the first request)


class ResponseWriter:
    """The writing side of a client connection: whole answers (`reply`, `respond`) and streamed ones (`start`,
    `write`, `end`), chunked when their length is not known; a HEAD answer without its body."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_response: Callable[[int, Request], None] | None):
        self._loop = loop
        self._on_response = on_response  # told the status of every response sent, and its request
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self._request = _NO_REQUEST  # the request being answered: its method (HEAD: no body in the answer), ...
        self._method = "GET"
        self._private = False  # (whether it was authenticated: its answer is never cached)
        self._chunked = False
        self._pending_head: bytes | None = None
        self._write_paused = False

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def reply(self, reply: Reply) -> None:
        self.respond(reply.status, [(b"content-type", reply.content_type), *reply.headers], reply.body)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        if self._on_response is not None and self._request.counted:
            self._on_response(status, self._request)
        head = [status_line(status)]
        head += [name + b": " + value + b"\r\n" for name, value in headers]
        if self._private and all(name != b"cache-control" for name, _ in headers):
            head.append(b"cache-control: no-store\r\n")
        if self._request.rate_headers:  # (its key's x-ratelimit-* fields, as they stood when it was admitted)
            head.append(self._request.rate_headers)
        head.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            head.append(b"connection: close\r\n")
        head.append(b"\r\n")
        self._write(b"".join(head) + (body if self._method != "HEAD" else b""))

    def start(self, status: int, head: bytes, content_length: int | None) -> None:
        """Send a response head built by the caller (status line and headers, without the blank line); the body
        follows with `write`, chunked unless its length is known. The head goes out with the first `write` (one send
        for the head and the body's first bytes; an empty write sends the head alone)."""
        if self._on_response is not None and self._request.counted:
            self._on_response(status, self._request)
        self._chunked = content_length is None
        extra = b"transfer-encoding: chunked\r\n" if self._chunked else b"content-length: %d\r\n" % content_length
        if self._private:
            extra += b"cache-control: no-store\r\n" + self._request.rate_headers
        if not self.keep_alive:
            extra += b"connection: close\r\n"
        self._pending_head = head + extra + b"\r\n"

    def write(self, data: bytes) -> None:
        if self.closed:  # (`_write`, inline: this runs for every piece of a stream)
            return
        if data:
            framed = b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data
        elif self._pending_head is None:
            return
        else:
            framed = b""
        if self._pending_head is not None:
            framed, self._pending_head = self._pending_head + framed, None
        self.transport.write(framed)  # type: ignore[union-attr]

    def end(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._pending_head is not None:
            tail, self._pending_head = self._pending_head + tail, None
        if tail:
            self._write(tail)

    def _internal_error(self) -> None:
        logger.exception("Gateway handler failed")
        if not self.closed:
            self.keep_alive = False
            self.reply(error_reply(500, "The gateway failed to handle the request", "internal_error"))

    def evict(self, stranger: bool) -> None:
        """Closed to make room for a new connection: a stranger's at once (a reset), an idle one of a token holder
        as a keep-alive connection is closed."""
        if self.transport is None or self.closed:
            return
        if stranger:
            self.transport.abort()
        else:
            self.keep_alive = False
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection (a response that cannot be finished properly)."""
        self.keep_alive = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    @property
    def writable(self) -> bool:
        return not self._write_paused or self.closed


class ServerConnection(ResponseWriter, asyncio.Protocol):
    """One client connection: its reader says what the bytes hold, the connection acts on it; requests answered one
    at a time, in order, by the handler: `reply`/`respond` (whole) or `start`/`write`/`end` (streamed)."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop, limits: Limits, *,
                 screen: Screen | None = None, on_response: Callable[[int, Request], None] | None = None):
        super().__init__(loop, on_response)
        self._handler = handler
        self._limits = limits
        self._reader = RequestReader(screen, limits)
        self._deadlines = Deadlines(loop, self._expired)
        self._pending: collections.deque[Request] = collections.deque()  # received whole (or refused)
        self._busy = False  # a request is being answered
        self._task: asyncio.Task[None] | None = None
        self.on_lost: Callable[[], None] | None = None  # the relay of the request being answered
        self.on_writable: Callable[[], None] | None = None  # the relay resumes its engine's socket
        self.stopped = False  # nothing more is taken from this connection: it closes once its answers are out
        self.authenticated_once = False  # it has sent a request with a valid token: the longer deadlines apply
        self._reading = True

    # ----- asyncio.Protocol -----

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._deadlines.idle(self._limits.first_byte_timeout_s)

    def data_received(self, data: bytes) -> None:
        feed = self._reader.feed
        while data and not self.stopped:
            found, data = feed(data)
            for item in found:  # (most often: began, authenticated, the request)
                if item is BEGAN:  # its head (or, once the connection is authenticated, all of it) must follow in time
                    self._deadlines.began(self._limits.receive_timeout_s if self.authenticated_once
                                          else self._limits.head_timeout_s)
                elif item is AUTHENTICATED:
                    self._authenticated()
                elif item is CONTINUE:
                    if not self._busy and not self._pending:  # (else it would land inside another answer)
                        self._write(b"HTTP/1.1 100 Continue\r\n\r\n")
                elif item is STOP:
                    self.stop_reading()
                else:
                    self._received(item)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._deadlines.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: its request is abandoned, upstream included
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading it too, and cut it off if it stays that way."""
        self._write_paused = True
        self._deadlines.writing(self._limits.write_timeout_s)
        self._sync_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._deadlines.write_by = None
        self._sync_reading()
        if self.on_writable is not None:
            self.on_writable()

    @property
    def idle(self) -> bool:
        """Between requests: nothing being received, answered or waiting to be (closing it loses nothing)."""
        return not self._busy and not self._pending and not self._reader.receiving

    # ----- what the reader found -----

    def _authenticated(self) -> None:
        """A valid token: the whole receive deadline for this request, and keep-alive's for the connection."""
        if not self.authenticated_once:
            self.authenticated_once = True
            self._deadlines.extend(self._limits.receive_timeout_s)

    def _received(self, request: Request) -> None:
        """A request whole, or refused, answered in its turn; far ahead of its answers, nothing more is taken."""
        self._deadlines.receive_by = None
        refused = request.refusal is not None
        if refused:
            self.stopped = True  # (its answer is the last)
        self._pending.append(request)
        if not self._busy:
            self._next()
        else:
            self._sync_reading()  # one request waits: read no further until its turn
        if refused:
            self._sync_reading()
        elif len(self._pending) >= MAX_PIPELINED:
            self.stop_reading()

    def stop_reading(self) -> None:
        """Take no more requests from this connection: answer those taken, then close."""
        self.stopped = True
        self._sync_reading()
        if not self._busy and not self._pending:
            self._close()

    # ----- dispatch -----

    def _sync_reading(self) -> None:
        """Read the client only while it reads its answers and has nothing waiting to be answered."""
        want = not self.stopped and not self._write_paused and not (self._busy and self._pending)
        if want != self._reading and self.transport is not None and not self.closed:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _next(self) -> None:
        while self._pending and not self.closed:
            request = self._pending.popleft()
            self._request, self._method = request, request.method
            self._private = request.authenticated
            self.keep_alive = request.keep_alive and request.refusal is None and not (
                self.stopped and not self._pending)  # the last answer of a stopped connection closes it
            self._busy = True
            result = self._dispatch(request)
            if result is PENDING:
                return  # the relay calls request_done
            if result is not None:
                self._task = self._loop.create_task(self._run(result))
                return
            if not self._finished_one():
                return
        self._busy = False
        if not self.closed:
            if not self._reader.receiving:
                self._deadlines.idle(
                    KEEPALIVE_TIMEOUT_SECONDS if self.authenticated_once else self._limits.first_byte_timeout_s)
            self._sync_reading()

    def _dispatch(self, request: Request) -> Handled:
        if request.refusal is not None:
            self.reply(request.refusal)
            return None
        try:
            return self._handler(request, self)
        except Exception:
            self._internal_error()
            return None

    async def _run(self, awaitable: Awaitable[None | Pending]) -> None:
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
        if not self.keep_alive or (self.stopped and not self._pending):
            self._close()
            return False
        return True

    def _close(self) -> None:
        """Close once the answers are out; a client that does not take them is cut off at the write deadline."""
        if self.transport is None or self.closed:
            return
        self.transport.close()
        if self.transport.get_write_buffer_size() and self._deadlines.write_by is None:
            self._deadlines.writing(self._limits.write_timeout_s)

    def _expired(self) -> None:
        if self.closed or self.transport is None:
            return
        deadlines = self._deadlines
        if deadlines.passed(deadlines.write_by):
            logger.debug("A client read none of its answer for %.0f s: cut off", self._limits.write_timeout_s)
            self.transport.abort()  # the client takes no answers: nothing more is owed to it
            return
        if deadlines.passed(deadlines.receive_by):
            self._received(self._reader.refuse(error_reply(408, "Request not received in time", "request_timeout")))
        elif deadlines.passed(deadlines.idle_by) and not self._busy and not self._reader.receiving:
            deadlines.idle_by = None
            self._close()  # an idle keep-alive connection
            return
        deadlines.schedule()
