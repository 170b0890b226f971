"""Reading a client connection: its bytes parsed into requests, each judged on its head, and its deadlines.

The reader does no I/O and knows no connection (the shape of h11): it is fed bytes and returns what it found in them,
in order: events (a request began, it is authenticated, it asks for `100 Continue`, take nothing more) and each
request once whole, or refused. The connection (`app.gateway.server`) acts on them; the reader stops after each whole
request, so the connection decides whether it takes the next one.

What a head costs is counted in the bytes that arrive, not in what the parser hands back: a head is held as raw
bytes (at most `MAX_HEAD_BYTES`, every byte counted) until its blank line has arrived, and only then parsed, in one
go, with at most `MAX_HEADER_FIELDS` fields. So a head that never ends, or one of 60,000 empty fields, costs at most
32 KiB and no Python object per field. The parser is then fed exactly what it may take: a `Content-Length` body to
its last byte (so the next pipelined head starts a new count), a chunked body while it lasts, within the body limit
with room for its framing. After a chunked body the parser alone knows where the next request begins; a request
pipelined behind one in the same read is not taken (the connection closes after its answers; RFC 9112 9.3.2: the
client sends it again).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from typing import NamedTuple

import httptools

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import MAX_HEAD_BYTES, MAX_HEADER_FIELDS, Limits, Request, Screen

_END_OF_HEAD = b"\r\n\r\n"


class _Stop(httptools.HttpParserError):
    """Raised in a parser callback: nothing more is parsed from this connection."""


class _Reading(enum.Enum):
    HEAD = "head"  # the bytes are a request head (or the blank lines before one)
    LENGTH = "length"  # a body of `Content-Length` bytes
    CHUNKED = "chunked"  # a chunked body: the parser finds its end


class Event(enum.Enum):
    """What the reader found besides a whole request; the connection acts on each, in order."""

    BEGAN = "began"  # a request's first byte: its head (or all of it, once authenticated) must follow in time
    AUTHENTICATED = "authenticated"  # the request being received has a valid token
    CONTINUE = "continue"  # it asks for `100 Continue` and passed the screen: its body may come
    STOP = "stop"  # take nothing more from this connection (an upgrade, or a request behind a chunked one)


BEGAN, AUTHENTICATED, CONTINUE, STOP = Event.BEGAN, Event.AUTHENTICATED, Event.CONTINUE, Event.STOP
# What `feed` returns, in order: events, and requests (each whole, or refused: `refusal` set, and nothing more is read).
Found = list[Event | Request]

_FRAMING_FIELDS = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})


class _Framing(NamedTuple):
    length: int  # of a Content-Length body (0 for none)
    chunked: bool
    expects_continue: bool


def _framing(fields: list[tuple[bytes, bytes]], version: str) -> _Framing | Reply:
    """How a request's body is framed, from its head's framing fields (which the parser has checked: one
    Content-Length of digits, not beside Transfer-Encoding), or what HTTP/1.1 itself refuses: no Host, or more than
    one (RFC 9112 3.2); a transfer coding other than chunked alone (RFC 9112 6.1: 501)."""
    hosts, length, codings, expect = 0, 0, [], False
    for name, value in fields:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            codings.append(value)
        else:
            expect = value.lower() == b"100-continue"
    if hosts != 1 and version == "1.1":
        return error_reply(400, "An HTTP/1.1 request needs exactly one Host header", "malformed_request")
    if codings and (len(codings) > 1 or codings[0].strip().lower() != b"chunked"):
        shown = b", ".join(codings)[:100].decode("latin-1")
        return error_reply(501, f"Transfer-Encoding {shown!r} is not supported: send the body with Content-Length, "
                           "or chunked alone", "unsupported_transfer_encoding")
    return _Framing(length, bool(codings), expect)


def _target(url: bytes) -> tuple[str, bytes]:
    """A request target's path and query: split at once in the usual form (`/path?query`, RFC 9112 3.2.1), else by
    httptools' URL parser (an absolute URL, a fragment)."""
    if url[:1] == b"/" and b"#" not in url:
        path, _, query = url.partition(b"?")
        return path.decode("utf-8", "replace"), query
    parsed = httptools.parse_url(url)
    return (parsed.path.decode("utf-8", "replace") if parsed.path else "/"), parsed.query or b""


def _head_too_large() -> Reply:
    return error_reply(431, f"Request header fields too large (at most {MAX_HEAD_BYTES} bytes and "
                       f"{MAX_HEADER_FIELDS} fields)", "request_header_fields_too_large")


class RequestReader:
    """Turns a connection's bytes into requests (httptools' callbacks), judging each on its head: a refused one,
    a malformed one or one too large becomes a refusal, and nothing more is read."""

    def __init__(self, screen: Screen | None, limits: Limits):
        self._screen = screen
        self._limits = limits
        # made for the first whole head: a stranger that sends none costs no parser
        self._parser: httptools.HttpRequestParser | None = None
        self._reading = _Reading.HEAD
        self._held = bytearray()  # the part of a head that has arrived, until its blank line does
        self._skipped = 0  # blank lines before the request line (RFC 9112 2.2), counted against the head's budget
        self._parsing_head = False  # the parser is being fed a whole head
        self._left = 0  # bytes of a Content-Length body still to come
        self._chunked_bytes = 0  # raw bytes of a chunked body so far, framing and trailers included
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._framing_fields: list[tuple[bytes, bytes]] = []  # (those of them `_framing` reads)
        self._fields = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._in_trailers = False
        self._found: Found = []  # what the read under way has found
        self._whole = False  # (and whether a request ended in it)
        self.request: Request | None = None  # its head has been read
        self.receiving = False  # a request has begun and is not complete yet
        self.stopped = False  # it refused a request, or was told to take nothing more: it reads nothing more

    def feed(self, data: bytes) -> tuple[Found, bytes]:
        """Read `data` up to the end of the next whole request: what was found, in order, and the bytes after that
        request (to be fed next, unless the connection takes nothing more)."""
        found = self._found = []
        self._whole = False
        try:
            while data and not self.stopped and not self._whole:
                if self._reading is _Reading.HEAD:
                    data = self._take_head(data)
                elif self._reading is _Reading.LENGTH:
                    piece, data = (data, b"") if len(data) <= self._left else (data[:self._left], data[self._left:])
                    self._left -= len(piece)
                    self._parser.feed_data(piece)  # type: ignore[union-attr]
                else:
                    self._chunked_bytes += len(data)
                    if self._chunked_bytes > 2 * self._limits.max_body_bytes() + MAX_HEAD_BYTES:
                        self._refuse(self._too_large())  # (its framing and trailers cost as much as a body)
                        return found, b""
                    self._parser.feed_data(data)  # type: ignore[union-attr]
                    data = b""
        except httptools.HttpParserUpgrade:
            # the request has been taken, to be answered as plain HTTP; what follows it is another protocol
            self._stop()
        except httptools.HttpParserError:
            if not self.stopped:  # (else a callback stopped the parser on purpose)
                self._refuse(error_reply(400, "Malformed HTTP request", "malformed_request"))
        return found, data if not self.stopped else b""

    def _take_head(self, data: bytes) -> bytes:
        """Hold the bytes of a head until its blank line has arrived, then parse it whole; what follows it."""
        held = len(self._held)
        if not held:
            if data[:1] in b"\r\n":  # (blank lines before a request line: rare, so only then a copy)
                start = data.lstrip(b"\r\n")
                self._skipped += len(data) - len(start)
                data = start
                if self._skipped > MAX_HEAD_BYTES:
                    self._refuse(_head_too_large())
                    return b""
                if not data:
                    return b""
            self.receiving = True
            self._found.append(BEGAN)
        budget = MAX_HEAD_BYTES - self._skipped - held  # what this head may still take
        if held:  # (its blank line may have begun in the bytes held)
            tail = bytes(self._held[-3:])
            found = (tail + data[:budget]).find(_END_OF_HEAD)
            end = found + len(_END_OF_HEAD) - len(tail) if found >= 0 else -1  # in `data`, just past the head
        else:
            found = data.find(_END_OF_HEAD, 0, budget)
            end = found + len(_END_OF_HEAD) if found >= 0 else -1
        if end < 0:
            if len(data) >= budget:
                self._refuse(_head_too_large())
                return b""
            self._held += data
            return b""
        head = bytes(self._held) + data[:end] if held else (data if end == len(data) else data[:end])
        self._held = bytearray()
        self._skipped = 0
        if self._parser is None:
            self._parser = httptools.HttpRequestParser(self)
        self._parsing_head = True
        try:
            self._parser.feed_data(head)
        finally:
            self._parsing_head = False
        if self.request is None and self.receiving and not self.stopped:
            raise httptools.HttpParserError("the head ended where the parser did not")
        return data[end:] if end < len(data) else b""

    def refuse(self, reply: Reply) -> Request:
        """The request being received is refused (a placeholder when its head is not whole yet): the request to
        answer with `reply`; nothing more is read."""
        request = self.request or Request("GET", "/", b"", [])
        request.refusal = reply
        self.request = None
        self.receiving = False
        self.stopped = True
        return request

    def _refuse(self, reply: Reply) -> None:
        self._found.append(self.refuse(reply))

    def _stop(self) -> None:
        self.stopped = True
        self._found.append(STOP)

    # ----- httptools callbacks -----

    def on_message_begin(self) -> None:
        if not self._parsing_head:
            # a request pipelined behind a chunked one, in the same read: where its head began is the parser's
            # secret, so its size cannot be counted; the client sends it again once the connection closes
            self._stop()
            raise _Stop
        self._url, self._headers, self._body, self._body_size = b"", [], [], 0
        self._framing_fields = []
        self._fields = 0
        self._in_trailers = False
        self.request = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > MAX_HEADER_FIELDS:
            self._refuse(_head_too_large())
            raise _Stop
        if not self._in_trailers:  # trailer fields arrive after the request was judged: counted and dropped
            name = name.lower()
            self._headers.append((name, value))
            if name in _FRAMING_FIELDS:
                self._framing_fields.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_trailers = True
        self._fields = 0
        parser = self._parser
        assert parser is not None
        path, query = _target(self._url)
        request = self.request = Request(parser.get_method().decode("ascii", "replace"), path, query, self._headers,
                                         keep_alive=parser.should_keep_alive())
        framing = _framing(self._framing_fields, parser.get_http_version())
        refusal = framing if isinstance(framing, Reply) else None
        if refusal is None and self._screen is not None:
            refusal = self._screen(request)
        if refusal is None and framing.length > self._limits.max_body_bytes():  # type: ignore[union-attr]
            refusal = self._too_large()
        if refusal is not None:
            self._refuse(refusal)
            raise _Stop  # its body is never read
        assert isinstance(framing, _Framing)
        if request.authenticated:
            self._found.append(AUTHENTICATED)
        if framing.chunked:
            self._reading, self._chunked_bytes = _Reading.CHUNKED, 0
        else:
            self._reading, self._left = _Reading.LENGTH, framing.length
        if framing.expects_continue:
            self._found.append(CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._limits.max_body_bytes():
            self._refuse(self._too_large())
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        self.receiving = False
        self._reading = _Reading.HEAD
        if request is None:  # pragma: no cover - llhttp completes only messages whose head it read
            return
        request.body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        self._found.append(request)
        self._whole = True

    def _too_large(self) -> Reply:
        limit = self._limits.max_body_bytes()
        return error_reply(413, f"Request body is larger than {limit} bytes (the endpoint's limit: "
                           "general.max_request_body_mib)", "request_too_large")


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
        self._began_at = 0.0  # when the request being received began
        self._timer: asyncio.TimerHandle | None = None

    def began(self, limit_s: float) -> None:
        """A request's first byte: what must follow of it arrives within `limit_s` (the connection is not idle)."""
        self.idle_by = None
        self._began_at = self._loop.time()
        self.receive_by = self._began_at + limit_s
        self.schedule()

    def extend(self, limit_s: float) -> None:
        """The request being received has `limit_s` from its first byte instead."""
        self.receive_by = self._began_at + limit_s

    def idle(self, limit_s: float) -> None:
        """Nothing is under way: the next request must begin within `limit_s`."""
        self.idle_by = self.after(limit_s)
        self.schedule()

    def writing(self, limit_s: float) -> None:
        """The client must take what was written within `limit_s`."""
        self.write_by = self.after(limit_s)
        self.schedule()

    def after(self, seconds: float) -> float:
        return self._loop.time() + seconds

    def passed(self, deadline: float | None) -> bool:
        return deadline is not None and self._loop.time() >= deadline

    def schedule(self) -> None:
        when = None
        for deadline in (self.receive_by, self.idle_by, self.write_by):
            if deadline is not None and (when is None or deadline < when):
                when = deadline
        if when is None:
            return
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
