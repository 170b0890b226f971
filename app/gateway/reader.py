"""Reading a client connection: its bytes parsed into requests, each judged on its head, and its deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import httptools

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import MAX_HEAD_BYTES, MAX_PIPELINED, Limits, Request, Screen

if TYPE_CHECKING:
    from app.gateway.server import ServerConnection


class _Stop(httptools.HttpParserError):
    """Raised in a parser callback: nothing more is parsed from this connection."""


class RequestReader:
    """Turns a connection's bytes into requests (httptools' callbacks), judging each on its head: a refused one,
    a malformed one or one too large becomes a refusal, and nothing more is read."""

    def __init__(self, conn: ServerConnection, screen: Screen | None, limits: Limits):
        self._conn = conn
        self._screen = screen
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_trailers = False
        self.request: Request | None = None  # its head has been read
        self.receiving = False  # a request has begun and is not complete yet

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # the request has been taken, to be answered as plain HTTP; what follows it is another protocol
            self._conn.stop_reading()
        except httptools.HttpParserError:
            if not self._conn.stopped:  # (else a callback stopped the parser on purpose)
                too_large = self._head_bytes > MAX_HEAD_BYTES
                self.refuse(error_reply(431 if too_large else 400, "Request header fields too large"
                                        if too_large else "Malformed HTTP request", "malformed_request"))

    def refuse(self, reply: Reply) -> None:
        """The request being received is refused (a placeholder when its head is not whole yet)."""
        request = self.request or Request("GET", "/", b"", [])
        request.refusal = reply
        self.request = None
        self.receiving = False
        self._conn.refuse(request)

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._body_size = b"", [], [], 0
        self._head_bytes = 0
        self._in_trailers = False
        self.request = None
        self.receiving = True
        self._conn.request_began()

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
        request = self.request = Request(
            method=self._parser.get_method().decode("ascii", "replace"),
            path=parsed.path.decode("utf-8", "replace") if parsed.path else "/",
            query=parsed.query or b"",
            headers=self._headers,
            keep_alive=self._parser.should_keep_alive(),
        )
        refusal = self._screen(request) if self._screen is not None else None
        if refusal is None:
            length = request.header(b"content-length")
            if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes():
                refusal = self._too_large()
        if refusal is not None:
            self.refuse(refusal)
            raise _Stop  # its body is never read
        expect = request.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self._conn.invite_body()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes():
            self.refuse(self._too_large())
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        self.receiving = False
        if request is None:  # pragma: no cover - llhttp completes only messages whose head it read
            return
        request.body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        if self._conn.received(request) >= MAX_PIPELINED:  # far ahead of its answers: take nothing more from it
            self._conn.stop_reading()
            raise _Stop

    def _too_large(self) -> Reply:
        limit = self._limits.max_body_bytes()
        return error_reply(413, f"Request body is larger than {limit} bytes", "request_too_large")


class Deadlines:
    """A connection's deadlines on the loop's clock, with one timer for them all: a request being received, an
    idle keep-alive connection, a client that reads none of its answer. The timer is moved only when it would fire
    too late (most requests move none)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]):
        self._loop = loop
        self._expired = expired
        self.receive_by: float | None = None
        self.idle_by: float | None = None
        self.write_by: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def after(self, seconds: float) -> float:
        return self._loop.time() + seconds

    def passed(self, deadline: float | None) -> bool:
        return deadline is not None and self._loop.time() >= deadline

    def schedule(self) -> None:
        deadlines = [d for d in (self.receive_by, self.idle_by, self.write_by) if d is not None]
        if not deadlines:
            return
        when = min(deadlines)
        if self._timer is None or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._expired()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


