"""What the gateway's HTTP/1.1 pieces share: a request as parsed, a connection's limits, how handlers answer, the
status line. It imports none of them: the connection (`app.gateway.server`) uses the reader (`app.gateway.reader`),
both use this."""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from app.gateway.errors import Reply
from app.gateway.routes import Route

if TYPE_CHECKING:
    from app.gateway.keys import KeyState

# Largest request head: every byte of the request line and the header block as received, separators, line ends and
# blank lines before it included (nginx's default large_client_header_buffers: 4 x 8 KiB = 32 KiB). A head is held
# as bytes until it is whole, and parsed only then: a head that never ends costs at most this much.
MAX_HEAD_BYTES = 32 * 1024
# Header fields in one head at most (and trailer fields after a chunked body): real clients send 5 to 20, and each
# becomes a Python object once the head is parsed (Envoy's default max_headers_count is 100).
MAX_HEADER_FIELDS = 100
# A connection that has not sent an authenticated request must start its next request within this long (of opening,
# or of its last answer) and send its whole head within `HEAD_TIMEOUT_SECONDS` of its first byte: a stranger's idle
# or slow connection holds its slot for seconds, not for the 30 s a token holder's request may take to arrive.
FIRST_BYTE_TIMEOUT_SECONDS = 5.0
HEAD_TIMEOUT_SECONDS = 10.0
# A request must arrive whole within this long once it has started (slow-loris clients are cut off).
REQUEST_RECEIVE_TIMEOUT_SECONDS = 30.0
# A keep-alive connection that has sent an authenticated request is closed after this long without another.
KEEPALIVE_TIMEOUT_SECONDS = 75.0
# A client that reads none of its answer for this long is cut off (nginx's send_timeout).
WRITE_TIMEOUT_SECONDS = 60.0
# Requests a client may send ahead of its answers (pipelining); past this the connection takes no more and closes
# once those are answered (RFC 9112 9.3.2: a client retries what was not answered).
MAX_PIPELINED = 16


@functools.lru_cache(maxsize=128)
def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b"Unknown"
    return b"HTTP/1.1 %d %s\r\n" % (status, reason)


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    keep_alive: bool = True
    refusal: Reply | None = None  # answered with this, its body unread, and the connection closes after it
    route: Route | None = None  # what the screen read of its method and path, for the handler
    counted: bool = True  # False for the deployment's own benchmark: in no counter, and not activity
    authenticated: bool = False  # the screen verified its token: its answer is private (never cached)
    key: KeyState | None = None  # the key its token is (None: no token, or the benchmark's)
    rate_headers: bytes = b""  # its key's x-ratelimit-* fields, sent with its answer
    admitted: bool = False  # its key's limits took it in: it holds a place until it ends
    rate_limited: bool = False  # its key's limits refused it (429)
    strip_usage: bool = False  # a stream asked for its usage by the gateway, not by its client

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Limits:
    """What one connection may cost."""

    max_body_bytes: Callable[[], int]  # read when needed: the gateway's limit may change while it serves
    receive_timeout_s: float = REQUEST_RECEIVE_TIMEOUT_SECONDS
    write_timeout_s: float = WRITE_TIMEOUT_SECONDS
    first_byte_timeout_s: float = FIRST_BYTE_TIMEOUT_SECONDS  # (until a request is authenticated)
    head_timeout_s: float = HEAD_TIMEOUT_SECONDS  # (likewise)


class Pending(enum.Enum):
    """A handler's answer is under way on callbacks: it calls `request_done` when it has ended."""

    PENDING = "pending"


PENDING = Pending.PENDING
# A handler answers at once (None), relays on callbacks (PENDING), or must wait for something first (an awaitable
# that ends the same two ways).
Handled = Pending | Awaitable["Pending | None"] | None
Handler = Callable[[Request, "Responder"], Handled]
# Judges a request on its head (its body not read yet): a Reply refuses it.
Screen = Callable[[Request], "Reply | None"]




class Responder(Protocol):
    """What a handler answers through (`app.gateway.server.ServerConnection`): a whole answer (`reply`), or a streamed
    one (`start`, `write`, `end`; `abort` cuts it), then `request_done` where the handler answered `PENDING`."""

    on_lost: Callable[[], None] | None  # told when the client goes away while its request is answered
    on_writable: Callable[[], None] | None  # told when a client that was full can take more

    @property
    def writable(self) -> bool:
        """The client takes what is written (else whoever writes pauses until `on_writable`)."""
        ...

    def reply(self, reply: Reply) -> None: ...

    def start(self, status: int, head: bytes, content_length: int | None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...

    def request_done(self) -> None: ...
