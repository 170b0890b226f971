"""The edge's budgets, one by one, at the protocol level: a client connection fed bytes as a socket would feed them
(its reads cut anywhere), and the connection table making room. Each test is a finding of the flood review
(issue 21) and fails without its budget."""

from __future__ import annotations

import asyncio
import re

import pytest

from app.gateway.connections import MEMBER_CANDIDATES, ConnectionTable, client_address
from app.gateway.errors import error_reply
from app.gateway.messages import MAX_HEAD_BYTES, MAX_HEADER_FIELDS, Limits, Request
from app.gateway.reader import AUTHENTICATED, BEGAN, RequestReader
from app.gateway.server import ServerConnection
from tests.harness import _until

BODY_LIMIT = 1 << 20


class _Transport(asyncio.Transport):
    """A socket as the connection sees it: what was written, whether it was closed or reset, whether it is read."""

    def __init__(self, peer: str = "127.0.0.2") -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False
        self.reset = False
        self.reading = True
        self.peer = peer

    def write(self, data) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.reset = self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name, default=None):
        return (self.peer, 40000) if name == "peername" else default

    def statuses(self) -> list[int]:
        """The status of each answer written (their bodies are short and hold no status line)."""
        return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(self.out))]


def _screen(request: Request):
    """The gateway's screen in small: a token makes a request authenticated; `/secret` needs one."""
    if request.header(b"authorization") == b"Bearer good":
        request.authenticated = True
    elif request.path == "/secret":
        return error_reply(401, "no", "invalid_api_key")
    return None


class _Client:
    """A connection with a handler that answers every request 200 at once, and the requests it was given."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits | None = None, peer: str = "127.0.0.2"):
        self.requests: list[Request] = []
        self.transport = _Transport(peer)
        self.conn = ServerConnection(self._handle, loop, limits or Limits(lambda: BODY_LIMIT), screen=_screen)
        self.conn.connection_made(self.transport)

    def _handle(self, request: Request, conn: ServerConnection):
        self.requests.append(request)
        conn.respond(200, [], b"ok")

    def send(self, data: bytes, piece: int = 65536) -> int:
        """Feed `data` in reads of `piece` bytes, as long as the connection reads; how many bytes it took."""
        taken = 0
        for at in range(0, len(data), piece):
            if self.conn.stopped or self.conn.closed:
                break
            self.conn.data_received(data[at:at + piece])
            taken += len(data[at:at + piece])
        return taken


def _with_client(test, limits: Limits | None = None):
    async def scenario():
        client = _Client(asyncio.get_running_loop(), limits)
        result = test(client)
        if asyncio.iscoroutine(result):
            await result
        client.conn.connection_lost(None)
    asyncio.run(scenario())


def _get(path: str = "/v1/models", extra: bytes = b"", version: bytes = b"1.1") -> bytes:
    host = b"Host: x\r\n" if version == b"1.1" else b""
    return b"GET " + path.encode() + b" HTTP/" + version + b"\r\n" + host + extra + b"\r\n"


# ----- the head: raw bytes, then fields -----

@pytest.mark.parametrize("piece", [1, 7, 4096, 65536])
def test_a_head_of_one_byte_fields_costs_32_kib_and_no_object_per_field(piece):
    # the finding: `a:\r\n` 60,000 times counted one byte each, and each became a Python object before the token
    flood = b"GET /v1/models HTTP/1.1\r\n" + b"a:\r\n" * 60_000

    def test(client: _Client) -> None:
        taken = client.send(flood, piece)
        assert client.transport.statuses() == [431] and client.conn.stopped
        assert taken <= MAX_HEAD_BYTES + piece  # nothing read past the budget (but the read that crossed it)
        assert client.conn._reader._headers == [] and client.requests == []  # (nothing parsed of it)
    _with_client(test)


def test_a_head_is_held_as_bytes_until_its_blank_line_arrives():
    head = _get(extra=b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 100) for i in range(50)))

    def test(client: _Client) -> None:
        client.send(head[:-1], 1)
        reader = client.conn._reader
        assert reader._headers == [] and len(reader._held) == len(head) - 1 and client.requests == []
        client.send(head[-1:])
        assert client.transport.statuses() == [200] and len(client.requests[0].headers) == 51
    _with_client(test)


def test_the_head_budget_counts_every_byte_exactly():
    def head_of(size: int) -> bytes:
        start = _get()[:-2] + b"X-Pad: "
        return start + b"p" * (size - len(start) - 4) + b"\r\n\r\n"

    for size, status in ((MAX_HEAD_BYTES, 200), (MAX_HEAD_BYTES + 1, 431)):
        for piece in (1, 1000, 65536):
            def test(client: _Client, size=size, piece=piece, status=status) -> None:
                client.send(head_of(size), piece)
                assert client.transport.statuses() == [status], (size, piece)
            _with_client(test)


@pytest.mark.parametrize(("data", "status"), [
    (b"\r\n" * 10 + _get(), 200),  # RFC 9112 2.2: blank lines before a request line are ignored
    (b"\r\n" * (MAX_HEAD_BYTES // 2 + 1), 431),  # ... within the head's budget
])
def test_blank_lines_before_a_request_are_skipped_and_counted(data, status):
    def test(client: _Client) -> None:
        client.send(data)
        assert client.transport.statuses() == [status]
    _with_client(test)


@pytest.mark.parametrize(("count", "status"), [(MAX_HEADER_FIELDS - 1, 200), (MAX_HEADER_FIELDS, 431)])
def test_header_fields_are_at_most_100(count, status):
    def test(client: _Client) -> None:  # (Host is one of them)
        client.send(_get(extra=b"".join(b"X-%d: v\r\n" % i for i in range(count))))
        assert client.transport.statuses() == [status]
    _with_client(test)


def test_a_pipelined_head_after_a_body_is_counted_from_its_own_first_byte():
    # a request with a body, then one with a 20 KiB head, in one read: the second head's budget starts at its own
    # first byte (the first request's bytes are not counted against it)
    first = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n" + b"b" * 30000
    second = _get(extra=b"X-Big: " + b"v" * 20_000 + b"\r\n")

    def test(client: _Client) -> None:
        client.send(first + second, 1 << 20)
        assert client.transport.statuses() == [200, 200]
        assert len(client.requests[0].body) == 30000 and client.requests[1].header(b"x-big") == b"v" * 20_000
    _with_client(test)


def test_a_request_pipelined_behind_a_chunked_one_in_the_same_read_is_not_taken():
    chunked = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"

    def test(client: _Client) -> None:
        client.send(chunked + _get())
        assert client.transport.statuses() == [200] and client.requests[0].body == b"abc"
        assert client.conn.stopped and client.transport.closing  # answered, then closed: the client sends it again
    _with_client(test)

    def separately(client: _Client) -> None:  # in a read of its own it is taken as usual
        client.send(chunked)
        client.send(_get())
        assert client.transport.statuses() == [200, 200]
    _with_client(separately)


def test_a_chunked_body_with_its_framing_is_within_the_body_limit():
    def test(client: _Client) -> None:  # one-byte chunks: six bytes of framing for every byte of body
        client.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 400_000)
        assert client.transport.statuses() == [413] and client.conn.stopped
    _with_client(test)


# ----- what HTTP/1.1 itself refuses -----

@pytest.mark.parametrize(("head", "status"), [
    (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),  # no Host (RFC 9112 3.2)
    (b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /v1/models HTTP/1.0\r\n\r\n", 200),  # (HTTP/1.0 has no Host)
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", 501),
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n1\r\na\r\n0\r\n\r\n", 200),
])
def test_host_and_transfer_codings(head, status):
    def test(client: _Client) -> None:
        client.send(head)
        assert client.transport.statuses() == [status]
    _with_client(test)


# ----- deadlines before and after a token -----

FAST = Limits(lambda: BODY_LIMIT, receive_timeout_s=5.0, first_byte_timeout_s=0.1, head_timeout_s=0.2)


async def _closed(client: _Client) -> bool:
    return client.transport.closing


def test_a_stranger_that_sends_nothing_is_closed_after_the_first_byte_deadline():
    async def test(client: _Client) -> None:
        await _until(lambda: _closed(client), "the silent connection to be closed", 2)
        assert client.transport.out == b""  # (no answer: there was no request)
    _with_client(test, FAST)


def test_a_strangers_head_must_arrive_within_the_head_deadline():
    async def test(client: _Client) -> None:
        client.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await _until(lambda: _closed(client), "the slow head to be cut off", 2)
        assert client.transport.statuses() == [408]
    _with_client(test, FAST)


def test_a_token_holder_gets_the_receive_deadline_and_keep_alive():
    async def test(client: _Client) -> None:
        client.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nContent-Length: 5\r\n\r\nab")
        await asyncio.sleep(0.4)  # past both of a stranger's deadlines: its body may still come
        assert not client.transport.closing
        client.send(b"cde")
        await asyncio.sleep(0.4)  # and its connection is kept alive between requests
        assert client.transport.statuses() == [200] and not client.transport.closing
        assert client.conn.authenticated_once
    _with_client(test, FAST)


def test_answers_to_token_holders_are_never_cached():
    def test(client: _Client) -> None:
        client.send(_get("/open") + _get("/open", b"Authorization: Bearer good\r\n"))
        first, second = bytes(client.transport.out).split(b"HTTP/1.1 ")[1:]
        assert b"cache-control" not in first.lower() and b"cache-control: no-store" in second.lower()
    _with_client(test)


# ----- the connection table -----

class _Conn:
    """What the table reads of a connection."""

    def __init__(self, name: str, busy: bool = False):
        self.name, self.busy = name, busy
        self.authenticated_once = False
        self.evicted: bool | None = None

    @property
    def idle(self) -> bool:
        return not self.busy

    def evict(self, stranger: bool) -> None:
        self.evicted = stranger

    def __repr__(self) -> str:
        return self.name


def _member(table: ConnectionTable, conn: _Conn) -> None:
    conn.authenticated_once = True
    table.authenticated(conn)


def test_an_address_over_its_share_of_a_full_table_makes_room_from_its_own_connections():
    table = ConnectionTable(capacity=4, per_address=2)
    flood = [_Conn(f"s{i}") for i in range(3)]
    for conn in flood:  # (room in the table: an address may hold more than its share meanwhile)
        assert table.admit(conn, "10.0.0.2")
    other = _Conn("other")
    assert table.admit(other, "10.0.0.3") and all(c.evicted is None for c in flood)
    newcomer = _Conn("s3")
    assert table.admit(newcomer, "10.0.0.2")  # full: the flood's own oldest goes, though `other` is older
    assert flood[0].evicted is True and other.evicted is None and len(table) == 4
    late = _Conn("late")
    assert table.admit(late, "10.0.0.4")  # an address within its share: the table's oldest stranger
    assert flood[1].evicted is True and other.evicted is None


def test_a_full_table_closes_the_connection_longest_without_an_authenticated_request():
    table = ConnectionTable(capacity=4, per_address=0)
    a, b, c, d = (_Conn(n) for n in "abcd")
    for conn in (a, b, c, d):
        assert table.admit(conn, "10.0.0.2")
    _member(table, a)  # a and b hold tokens (b used its token last); c and d are strangers
    _member(table, b)
    e = _Conn("e")
    assert table.admit(e, "10.0.0.9") and c.evicted is True  # strangers first, oldest first
    f = _Conn("f")
    assert table.admit(f, "10.0.0.9") and d.evicted is True
    _member(table, e)
    _member(table, f)
    _member(table, a)  # a used its token again: b is now the one longest idle
    g = _Conn("g")
    assert table.admit(g, "10.0.0.9") and b.evicted is False  # (closed as a keep-alive connection, not reset)


def test_busy_connections_are_never_closed_to_make_room():
    table = ConnectionTable(capacity=MEMBER_CANDIDATES + 1, per_address=0)
    busy = [_Conn(f"b{i}", busy=True) for i in range(MEMBER_CANDIDATES + 1)]
    for conn in busy:
        table.admit(conn, "10.0.0.2")
        _member(table, conn)
    assert not table.admit(_Conn("late"), "10.0.0.3") and table.refused == 1
    assert all(conn.evicted is None for conn in busy) and len(table) == len(busy)
    assert f"clearml_sglang_connections_open {len(busy)}\n" in table.prometheus()
    assert "clearml_sglang_connections_refused_total 1\n" in table.prometheus()


def test_client_addresses_group_an_ipv6_64():
    assert client_address(("2001:db8:1:2:aaaa::1", 1, 0, 0)) == client_address(("2001:db8:1:2:bbbb::9", 1, 0, 0))
    assert client_address(("2001:db8:1:3::1", 1, 0, 0)) != client_address(("2001:db8:1:2::1", 1, 0, 0))
    assert client_address(("::ffff:10.1.2.3", 1, 0, 0)) == "10.1.2.3" == client_address(("10.1.2.3", 5))


# ----- the reader on its own (no connection: it returns what it found) -----

def test_the_reader_returns_each_request_and_stops_after_it():
    reader = RequestReader(_screen, Limits(lambda: BODY_LIMIT))
    post = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good\r\nContent-Length: 2\r\n\r\nhi"
    found, rest = reader.feed(post + _get())
    assert found[:2] == [BEGAN, AUTHENTICATED] and len(found) == 3 and rest == _get()
    assert (found[2].method, found[2].body, found[2].authenticated) == ("POST", b"hi", True)
    found, rest = reader.feed(rest)
    assert found[0] is BEGAN and found[1].path == "/v1/models" and rest == b"" and not reader.stopped
    found, rest = reader.feed(b"GET /secret HTTP/1.1\r\nHost: x\r\n\r\n" + _get())
    assert found[1].refusal.status == 401 and reader.stopped and rest == b""  # nothing read after a refusal
    assert reader.feed(_get()) == ([], b"")


@pytest.mark.parametrize("target, path, query", [
    (b"/v1/models", "/v1/models", b""),
    (b"/v1/models?limit=2&x=%20", "/v1/models", b"limit=2&x=%20"),
    (b"/v1/a%2Fb?", "/v1/a%2Fb", b""),
    (b"http://gateway:8000/v1/models?limit=2", "/v1/models", b"limit=2"),  # the absolute form (RFC 9112 3.2.2)
    (b"/v1/models?limit=2#part", "/v1/models", b"limit=2"),  # (a fragment is no part of a request's target)
])
def test_a_request_target_is_split_into_its_path_and_query(target, path, query):
    def test(client: _Client) -> None:
        client.send(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.transport.statuses() == [200]
        assert (client.requests[0].path, client.requests[0].query) == (path, query)
    _with_client(test)


def test_a_streamed_answers_head_goes_out_with_its_first_bytes_in_one_write_or_alone_on_an_empty_one():
    writes: list[bytes] = []

    def test(client: _Client) -> None:
        client.transport.write = writes.append  # type: ignore[method-assign]
        conn = client.conn
        conn.start(200, b"HTTP/1.1 200 OK\r\n", None)
        assert writes == []  # (held for the body's first bytes)
        conn.write(b"hello")
        assert len(writes) == 1 and writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(
            b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        conn.start(200, b"HTTP/1.1 200 OK\r\n", 3)
        conn.write(b"")
        assert len(writes) == 2 and writes[1].endswith(b"content-length: 3\r\n\r\n")
        conn.write(b"")  # (nothing held: nothing written)
        conn.write(b"abc")
        assert writes[2:] == [b"abc"]
    _with_client(test)
