"""HTTP/1.1 at the protocol level, the engine side: kept-alive connections to an engine, and one exchange per request.

`Upstream` keeps idle keep-alive connections to one engine and opens more on demand (never queueing a request
behind a busy connection); `Exchange` sends one request upstream and hands the response to its `ResponseSink` as it
arrives: headers, then every body chunk, then its end, pausing the engine's socket while the sink says the client is
full. The sink is the relay (`app.gateway.relay`): the one bridge between this side and the client's. A sweep of the
pool ends an exchange whose engine stops sending.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import httptools

from app.gateway.messages import status_line

# Idle connections kept per engine; more are opened on demand and closed after use.
MAX_IDLE_UPSTREAM = 512
# Connections per engine at most: past this a request fails at once (503) instead of queueing unseen.
MAX_UPSTREAM_CONNECTIONS = 16384
# How often requests in flight are checked for an engine that went silent (their idle timeout's resolution).
SWEEP_SECONDS = 0.5

# Request headers not relayed: hop-by-hop and framing ones, the client's token, and SGLang's request overrides
# (`x-override-*`, srt/entrypoints/request_headers.py: honoured where SGLANG_ENABLE_REQUEST_HEADER_OVERRIDES is set in
# an engine's environment; `x-override-priority` would outrank the priority the gateway writes for the key).
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer", b"trailers",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization", b"expect",
    b"x-override-rid", b"x-override-bootstrap-host", b"x-override-bootstrap-port", b"x-override-bootstrap-room",
    b"x-override-conversation-id", b"x-override-routed-dp-rank", b"x-override-disagg-prefill-dp-rank",
    b"x-override-priority",
})
# Response headers not relayed: framing (the gateway frames its own), the engine's identity, its caching (every answer
# to a token holder is `no-store`: `app.gateway.server`) and its CORS answers (SGLang allows every origin with
# credentials; the gateway answers no preflight, so it grants no origin either).
_RESPONSE_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"server",
                            b"cache-control",
                            b"trailer", b"access-control-allow-origin", b"access-control-allow-credentials",
                            b"access-control-allow-methods", b"access-control-allow-headers",
                            b"access-control-expose-headers", b"access-control-max-age"})



_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


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
        self._framing: list[tuple[bytes, bytes]] = []  # (those of them that frame the body)
        self._body: list[bytes] = []  # the body pieces of the read being parsed
        self._head: ResponseHead | None = None  # the response's head, parsed in that read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """One read of the engine's socket. The body pieces the parser finds in it (a stream's chunks: many events of
        a fast engine) are relayed together, as one piece: one write to the client, one chunk frame."""
        if self.exchange is None:  # bytes from an idle connection: it is not in a state to reuse
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._body, self._head = [], None
            if self.exchange is not None:
                self.exchange.failed(UpstreamError(f"malformed response: {exc}"))
            self.close()
            return
        self._relay_body()

    def _relay_body(self) -> None:
        """What the read brought: the response's head (once) with its first body bytes, or body bytes."""
        pieces, self._body = self._body, []
        exchange = self.exchange
        if exchange is None:
            return
        head, self._head = self._head, None
        if head is not None:
            exchange.headers(head)
        elif not pieces:
            return
        exchange.body(pieces[0] if len(pieces) == 1 else b"".join(pieces))  # (empty: the head goes out alone)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.exchange is not None:
            self.exchange.failed(UpstreamError("the engine closed the connection"))

    def on_message_begin(self) -> None:
        self._headers, self._framing = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name in _FRAMING:
            self._framing.append((name, value))

    def on_headers_complete(self) -> None:
        length, chunked = None, False
        for name, value in self._framing:
            if name == b"content-length":
                length = int(value) if length is None and value.isdigit() else length
            else:
                chunked = chunked or b"chunked" in value.lower()
        # handed on with the read's body bytes (`_relay_body`): the client gets both in one write
        self._head = ResponseHead(self.parser.get_status_code(), b"", self._headers, chunked, length)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)  # (relayed once the read is parsed, or when the message ends within it)

    def on_message_complete(self) -> None:
        self._relay_body()
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


class ResponseSink(Protocol):
    """Where an exchange hands what the engine answers (`app.gateway.relay.Relay`)."""

    def response_head(self, head: ResponseHead) -> None:
        """The engine's status and headers; `response_body` follows at once, with what the same read held."""

    def response_body(self, data: bytes) -> bool:
        """A piece of the body, as it arrived (empty: a read held only the head); False when the client is full: the
        engine's socket pauses until `Exchange.resume`."""
        ...

    def response_end(self, exchange: Exchange) -> None:
        """The response ended, or failed (`exchange.error` set; `exchange.head` tells whether it had begun)."""


class Exchange:
    """One request relayed to an engine and its response handed to `sink`, chunk by chunk, on callbacks.

    `sink.response_end(exchange)` is called once: when the response has ended, or failed. `abandon` (the client left)
    ends it without calling it.
    """

    __slots__ = ("sink", "loop", "idle_timeout_s", "head", "first_byte_at", "error", "timed_out", "connection",
                 "finished", "_body", "_last", "_pool")

    def __init__(self, sink: ResponseSink, loop: asyncio.AbstractEventLoop, idle_timeout_s: float):
        self.sink, self.loop, self.idle_timeout_s = sink, loop, idle_timeout_s
        self._body = sink.response_body  # (once: it is called for every chunk)
        self.head: ResponseHead | None = None
        self.first_byte_at: float | None = None
        self.error: UpstreamError | None = None
        self.timed_out = False
        self.finished = False
        self.connection: UpstreamConnection | None = None
        self._last = 0.0
        self._pool: Upstream | None = None

    def send(self, connection: UpstreamConnection, data: bytes) -> None:
        self.connection = connection
        if connection.closed:  # lost after it was opened, before this request went out: nothing else will end it
            self.loop.call_soon(self.failed, UpstreamError("the engine closed the connection"))
            return
        connection.exchange = self
        connection.transport.write(data)  # type: ignore[union-attr]
        self._last = self.loop.time()
        self._pool = connection.pool
        self._pool.watch(self)

    def resume(self) -> None:
        """The client can take more: read the engine again."""
        if self.connection is not None:
            self.connection.resume()

    # ----- from the upstream connection -----

    def headers(self, head: ResponseHead) -> None:
        self._last = self.loop.time()
        self.head = head
        self.sink.response_head(head)  # (the client's goes out with the body's first bytes: `body` follows)

    def body(self, data: bytes) -> None:
        """Body bytes (none: the head came alone)."""
        now = self.loop.time()
        self._last = now
        if self.first_byte_at is None and data:
            self.first_byte_at = now
        if not self._body(data) and self.connection is not None:
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
        self._unwatch()
        self.sink.response_end(self)

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

    def _unwatch(self) -> None:
        if self._pool is not None:
            self._pool.unwatch(self)

    def abandon(self) -> None:
        """The client is gone: close the engine's connection, so the engine aborts the request."""
        self.finished = True
        self._unwatch()
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
