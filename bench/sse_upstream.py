#!/usr/bin/env python3
"""An upstream that is never the bottleneck for streams: any POST is answered with an OpenAI-shaped SSE stream of
`max_tokens` events (from the JSON body), each its own chunk, then `data: [DONE]`; every event's bytes are made once.

    python bench/sse_upstream.py PORT [PACE_SECONDS [PROCESSES]]

With a pace of 0 the events are written back to back, one transport write each (how an engine that batches many
tokens at once hands them over); with a pace they come one per pace. uvloop and a bare protocol: no framework, no
task per request while unpaced. `bench/gateway.py` checks in each run that it streams at least three times faster
than the best proxy before it reports any ratio.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys

EVENT = (b'data: {"id":"x","object":"chat.completion.chunk","model":"m",'
         b'"choices":[{"index":0,"delta":{"content":" w"}}]}\n\n')
CHUNK = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
DONE = b"data: [DONE]\n\n"
TAIL = b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE)
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
_TOKENS = re.compile(rb'"max_tokens"\s*:\s*(\d+)')


class Stream(asyncio.Protocol):
    def __init__(self, pace: float):
        self.pace = pace
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = _LENGTH.search(head)
            total = end + 4 + (int(length.group(1)) if length else 0)
            if len(self.buffer) < total:
                return
            body, self.buffer = self.buffer[end + 4:total], self.buffer[total:]
            found = _TOKENS.search(body)
            events = int(found.group(1)) if found else 16
            if not head.startswith(b"POST"):
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")  # type: ignore[union-attr]
            elif self.pace > 0:
                asyncio.get_running_loop().create_task(self._paced(events))
            else:
                write = self.transport.write  # type: ignore[union-attr]
                write(HEAD)
                for _ in range(events):
                    write(CHUNK)
                write(TAIL)

    async def _paced(self, events: int) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(HEAD)
        for _ in range(events):
            if transport.is_closing():
                return
            transport.write(CHUNK)
            await asyncio.sleep(self.pace)
        transport.write(TAIL)


async def main(port: int, pace: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Stream(pace), "127.0.0.1", port, backlog=4096, reuse_address=True,
                                      reuse_port=True)
    async with server:
        await server.serve_forever()


def serve(port: int, pace: float, processes: int) -> None:
    """`processes` servers on one port (SO_REUSEPORT: the kernel spreads the connections), each its own process, so
    that on a many-core machine the upstream is not the bottleneck; the forks die with the first (PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    import uvloop

    for _ in range(processes - 1):
        if os.fork() == 0:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            break
    uvloop.run(main(port, pace))


if __name__ == "__main__":
    serve(int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0,
          int(sys.argv[3]) if len(sys.argv) > 3 else 1)
