"""The engine side of the gateway's proxy at the socket level: an exchange always ends, however its connection goes."""

from __future__ import annotations

import asyncio

from app.gateway.upstream import Exchange, Upstream, UpstreamConnection
from tests.harness import _until

# Bounds the waits below; a broken exchange would otherwise be ended only by its idle timeout (ten minutes).
ANSWER_WITHIN_S = 2.0


class _Sink:
    """What an exchange hands the response to (the relay, in the gateway); its end resolves `done`."""

    def __init__(self, done: asyncio.Future) -> None:
        self.written: list[bytes] = []
        self.done = done

    def response_head(self, head) -> None:
        pass

    def response_body(self, data: bytes) -> bool:
        self.written.append(data)
        return True

    def response_end(self, exchange: Exchange) -> None:
        self.done.set_result(exchange)


async def _closing_engine() -> asyncio.Server:
    """An engine that takes each connection and closes it at once, as one does when it is killed."""
    def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()
    return await asyncio.start_server(close_at_once, "127.0.0.1", 0)


async def _lost(connection: UpstreamConnection) -> bool:
    return connection.closed


def test_a_connection_lost_before_the_request_was_sent_ends_the_exchange_at_once():
    # the race behind clients hanging after an engine crash: a new connection is lost between being opened and the
    # request being written on it, so no callback of that connection is left to end the exchange
    async def scenario() -> None:
        engine = await _closing_engine()
        loop = asyncio.get_running_loop()
        upstream = Upstream("127.0.0.1", engine.sockets[0].getsockname()[1], connect_timeout_s=5, loop=loop)
        connection = await upstream.acquire()
        await _until(lambda: _lost(connection), "the engine to close the connection", ANSWER_WITHIN_S)
        done: asyncio.Future[Exchange] = loop.create_future()
        exchange = Exchange(_Sink(done), loop, 600.0)
        exchange.send(connection, b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        ended = await asyncio.wait_for(done, ANSWER_WITHIN_S)
        assert ended.error is not None and ended.head is None and not ended.timed_out
        assert not upstream.active and upstream.open == 0
        upstream.close()
        engine.close()
        await engine.wait_closed()
    asyncio.run(scenario())


def test_what_one_read_brings_is_relayed_as_one_piece_not_a_piece_a_chunk():
    """A fast engine's stream: 200 events in one write. The sink (the client's side) gets them in one piece a read of
    the socket (one write, one chunk frame to the client), the bytes unchanged."""
    events = [b'data: {"choices":[{"delta":{"content":" w%d"}}]}\n\n' % i for i in range(200)]

    async def scenario() -> None:
        async def fast_engine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n")
            await writer.drain()

        engine = await asyncio.start_server(fast_engine, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        upstream = Upstream("127.0.0.1", engine.sockets[0].getsockname()[1], connect_timeout_s=5, loop=loop)
        done: asyncio.Future[Exchange] = loop.create_future()
        sink = _Sink(done)
        Exchange(sink, loop, 600.0).send(await upstream.acquire(), b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        ended = await asyncio.wait_for(done, ANSWER_WITHIN_S)
        assert ended.error is None and b"".join(sink.written) == b"".join(events)
        assert len(sink.written) <= 3, len(sink.written)  # (one a read: 200 before)
        upstream.close()
        engine.close()
        await engine.wait_closed()

    asyncio.run(scenario())


def test_a_head_is_handed_on_with_the_bodys_first_bytes_or_alone_when_they_come_later():
    """The relay writes the client's head with the first body bytes (one send): the exchange hands it the head and,
    at once, what the same read held of the body; a head that came alone is handed on with an empty piece (the client
    gets it now, not when the engine's next bytes come), and the time to the first byte is the body's."""
    body = b'{"usage":{"prompt_tokens":2}}'

    async def scenario() -> None:
        later = asyncio.Event()

        async def engine_(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")  # the first request: head and body in one write
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await reader.readuntil(b"\r\n\r\n")  # the second: the head, and the body only when told
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await later.wait()
            writer.write(b"5\r\ndata:\r\n0\r\n\r\n")
            await writer.drain()

        engine = await asyncio.start_server(engine_, "127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        upstream = Upstream("127.0.0.1", engine.sockets[0].getsockname()[1], connect_timeout_s=5, loop=loop)
        calls: list[object] = []

        class Recording(_Sink):
            def response_head(self, head) -> None:
                calls.append(head.status)

            def response_body(self, data: bytes) -> bool:
                calls.append(data)
                return True

        done: asyncio.Future[Exchange] = loop.create_future()
        connection = await upstream.acquire()
        Exchange(Recording(done), loop, 600.0).send(connection, b"GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        await asyncio.wait_for(done, ANSWER_WITHIN_S)
        assert calls == [200, body]

        calls.clear()
        done = loop.create_future()
        exchange = Exchange(Recording(done), loop, 600.0)
        exchange.send(await upstream.acquire(), b"GET / HTTP/1.1\r\ncontent-length: 0\r\n\r\n")
        await _until(lambda: _has(calls, 2), "the head to be handed on alone", ANSWER_WITHIN_S)
        assert calls == [200, b""] and exchange.first_byte_at is None
        later.set()
        await asyncio.wait_for(done, ANSWER_WITHIN_S)
        assert calls == [200, b"", b"data:"] and exchange.first_byte_at is not None
        upstream.close()
        engine.close()
        await engine.wait_closed()

    asyncio.run(scenario())


async def _has(calls: list, count: int) -> bool:
    return len(calls) >= count
