#!/usr/bin/env python3
"""What a key's limits add to a request, measured inside one gateway with no socket: the gateway's own objects, its
client connection and its engine connection given transports that only keep what is written to them.

    .venv/bin/python bench/in_process.py [--rounds 60] [--requests 600] [--json]

Each request is the whole of the gateway's Python path: the client's bytes read by its `data_received` (head,
token, route, body, key, limits), relayed to the engine connection, the engine's answer fed to that connection's
`data_received` (parsed, usage found, re-framed, its key's fields written into the head, the key released, the
request recorded), then one turn of the event loop (the deadlines, the head's flush). The keys alternate in blocks of
`--requests` (short blocks: the machine's drift hits both of a round's alike), each round's order rotated; CPU from
`time.thread_time()` (this thread only: nothing else on the machine is counted). What it leaves out is the kernel's
part, the same for every key (one read and one write each way) but for the bytes of the `x-ratelimit-*` fields.
`bench/gateway.py` runs it with its own key kinds and writes its figures beside the wrk ones
(`limits_added_cpu_us_per_request_in_process`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.gateway import Gateway, KeyRing, ModelRoute, RequestStats  # noqa: E402
from app.gateway.connections import TrackedConnection  # noqa: E402
from app.keys import NO_LIMITS, KeyLimits  # noqa: E402

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
COMPLETION = {"id": "x", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "w w w w w w w w"},
                           "finish_reason": "length"}],
              "usage": {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10}}
# The keys measured, by kind: as `bench/gateway.py` serves them (limits never reached).
KINDS = {"gateway": NO_LIMITS, "limits": KeyLimits(rpm=10**9, tpm=10**12, concurrent=10**6),
         "shaped": KeyLimits(max_tokens=10**6, priority=1)}


class Kept(asyncio.Transport):
    """A transport that keeps nothing but the count of bytes written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written += len(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def request_bytes(token: str) -> bytes:
    body = json.dumps(CHAT).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (token.encode(), len(body), body))


def response_bytes() -> bytes:
    body = json.dumps(COMPLETION).encode()
    return (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: keep-alive\r\n\r\n%s" % (len(body), body))


async def measure(kinds: dict[str, KeyLimits], rounds: int, requests: int) -> dict[str, list[float]]:
    """CPU microseconds per request of each kind's key, a figure a round."""
    loop = asyncio.get_running_loop()

    class Engine:
        url, state = "http://127.0.0.1:9", "resident"  # (never connected to: its connection is made here)

    tokens = {kind: f"bench-{kind}-0123456789abcdef" for kind in kinds}
    gateway = Gateway([ModelRoute("m", Engine())], KeyRing([(k, tokens[k], kinds[k]) for k in kinds]),
                      RequestStats())
    await gateway.start("127.0.0.1", 0)  # (binds a port it is never sent to: the routes' engine pools are made)
    try:
        upstream = gateway.routes["m"].upstream
        assert upstream is not None
        engine = upstream_connection(upstream)
        answer = response_bytes()
        clients = {}
        for kind in kinds:
            clients[kind] = TrackedConnection(gateway.handle, loop, gateway.limits, screen=gateway.screen,
                                              on_response=gateway.stats.count_response, table=gateway.connections)
            clients[kind].connection_made(Kept())
        asked = {kind: request_bytes(tokens[kind]) for kind in kinds}

        async def block(kind: str, count: int) -> float:
            client, data = clients[kind], asked[kind]
            begun = time.thread_time()
            for _ in range(count):
                client.data_received(data)
                engine.data_received(answer)
                await asyncio.sleep(0)
            return (time.thread_time() - begun) / count * 1e6

        order = list(kinds)
        for kind in order:
            await block(kind, requests)  # warm-up, not recorded
            if upstream.idle != [engine]:
                raise RuntimeError(f"{kind}: the request was not answered by the engine ({gateway.stats.snapshot()})")
        measured: dict[str, list[float]] = {kind: [] for kind in kinds}
        for round_ in range(rounds):
            shift = round_ % len(order)
            for kind in order[shift:] + order[:shift]:
                measured[kind].append(await block(kind, requests))
        return measured
    finally:
        await gateway.close()


def upstream_connection(upstream):
    """An engine connection for the pool, its transport one that keeps nothing."""
    from app.gateway.upstream import UpstreamConnection

    connection = UpstreamConnection(upstream)
    connection.connection_made(Kept())
    upstream.open += 1
    upstream.idle.append(connection)
    return connection


def added(measured: dict[str, list[float]], kind: str, base: str = "gateway") -> list[float]:
    return [mine - theirs for mine, theirs in zip(measured[kind], measured[base], strict=True)]


def run(rounds: int, requests: int) -> dict[str, list[float]]:
    try:
        import uvloop
        return uvloop.run(measure(KINDS, rounds, requests))
    except ImportError:
        return asyncio.run(measure(KINDS, rounds, requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--requests", type=int, default=600, help="requests of one key in a row, a round")
    parser.add_argument("--json", action="store_true", help="the figures of every round as JSON, nothing else")
    args = parser.parse_args()
    measured = run(args.rounds, args.requests)
    if args.json:
        print(json.dumps(measured))
        return
    for kind, values in measured.items():
        print(f"{kind:8} CPU us/request median {statistics.median(values):.2f} "
              f"({min(values):.2f}-{max(values):.2f})")
    for kind in measured:
        if kind != "gateway":
            diff = added(measured, kind)
            print(f"{kind:8} adds median {statistics.median(diff):+.2f} us ({min(diff):+.2f} to {max(diff):+.2f})")


if __name__ == "__main__":
    main()
