"""Floods against the endpoint's edge, with raw sockets, and what a well-behaved client sees meanwhile.

Shared by the reliability tier (`tests/reliability/test_floods.py`, the stand-in engine, bounded to seconds) and the
measurement against the real SGLang (`bench/edge.py`, the figures docs/performance.md and the issue quote). Each
attacker runs off the event loop it attacks (threads, or a process of its own where it holds thousands of sockets),
and each observer measures from outside that loop, so a blocked loop shows as time.

    python -m tests.floods idle --port 8000 --source 127.0.0.2 --connections 8000 --seconds 60

holds that many idle connections from that address, opening a new one for each the gateway closes, and prints what
it saw as one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import re
import resource
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")


# ----- what a well-behaved client sees -----

@dataclass
class Timings:
    """Each answer's time, and the answers that were not what was expected."""

    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.seconds, default=0.0)

    def summary(self) -> dict[str, object]:
        ordered = sorted(self.seconds)
        return {"answers": len(ordered), "failures": len(self.failures), "first_failures": self.failures[:5],
                "p50_ms": round(1000 * ordered[len(ordered) // 2], 1) if ordered else None,
                "worst_ms": round(1000 * self.worst, 1)}


class Observer(threading.Thread):
    """Sends one request after another from its own thread, `every_s` apart, and times each answer (a new
    connection each time when `fresh`, else one kept alive and opened again if the gateway closes it)."""

    def __init__(self, port: int, path: str, *, every_s: float, headers: dict[str, str] | None = None,
                 body: bytes | None = None, fresh: bool = False, source: str = "127.0.0.1", timeout_s: float = 10.0):
        super().__init__(daemon=True)
        self.port, self.path, self.every_s, self.fresh, self.source = port, path, every_s, fresh, source
        self.headers = {"Host": "x", **(headers or {})}
        self.body, self.timeout_s = body, timeout_s
        self.timings = Timings()
        self._stop_event = threading.Event()
        self._connection: http.client.HTTPConnection | None = None

    def run(self) -> None:
        while not self._stop_event.is_set():
            started = time.monotonic()
            outcome = self._ask()
            took = time.monotonic() - started
            self.timings.seconds.append(took)
            if outcome is not None:
                self.timings.failures.append(f"{outcome} after {took:.2f} s")
            self._stop_event.wait(max(0.0, self.every_s - took))
        if self._connection is not None:
            self._connection.close()

    def _ask(self) -> str | None:
        for attempt in (1, 2):  # once more on a new connection if a kept-alive one was closed under it
            if self._connection is None:
                self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s,
                                                              source_address=(self.source, 0))
            try:
                self._connection.request("POST" if self.body is not None else "GET", self.path, body=self.body,
                                         headers=self.headers)
                response = self._connection.getresponse()
                response.read()
                if self.fresh or response.will_close:
                    self._connection.close()
                    self._connection = None
                return None if response.status == 200 else f"status {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                self._connection.close()
                self._connection = None
                if attempt == 2 or isinstance(exc, TimeoutError):
                    return type(exc).__name__
        return None

    def stop(self) -> Timings:
        """Stop after the request under way (blocking: never call it on the event loop it watches)."""
        self._stop_event.set()
        self.join(self.timeout_s + 5)
        return self.timings


def health_sampler(port: int) -> Observer:
    """`/healthz` 20 times a second, each on a new connection (as a prober does): every answer's time."""
    return Observer(port, "/healthz", every_s=0.05, fresh=True)


def chat_body(content: str, max_tokens: int = 1) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0}).encode()


# ----- floods -----

def head_flood(port: int, connections: int = 400, head_bytes: int = 240_000, deadline_s: float = 30.0
               ) -> dict[str, object]:
    """`connections` connections, each sending a request line and then `head_bytes` of one-byte header fields
    (`a:` lines) without ever ending the head, then waiting: what the gateway answered each (past the head budget,
    at once; short of it, at the head deadline), and how much it took."""
    line = b"a:\r\n"
    payload = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + line * (head_bytes // len(line))
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    for sock in sockets:
        sock.setblocking(False)
    sent = [0] * connections
    answers: collections.Counter[str] = collections.Counter()
    open_ = set(range(connections))
    end = time.monotonic() + deadline_s
    while open_ and time.monotonic() < end:
        for i in list(open_):
            sock = sockets[i]
            if sent[i] < len(payload):
                try:
                    sent[i] += sock.send(payload[sent[i]:sent[i] + 65536])
                except BlockingIOError:
                    pass
                except OSError:
                    answers["closed while sending"] += 1
                    open_.discard(i)
                    continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            found = _STATUS.search(data)
            answers[found.group(1).decode() if found else "closed"] += 1
            open_.discard(i)
        time.sleep(0.002)
    for sock in sockets:
        sock.close()
    return {"connections": connections, "bytes_sent": sum(sent), "answers": dict(answers),
            "unanswered": len(open_)}


def idle_flood(port: int, source: str, connections: int, seconds: float) -> dict[str, object]:
    """Hold `connections` idle connections from `source`, opening a new one for each the gateway closes."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, connections + 1024), hard))
    selector = selectors.DefaultSelector()
    counts = collections.Counter()

    def open_one() -> None:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_READ)
        counts["opened"] += 1

    for _ in range(connections):
        open_one()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in selector.select(0.1):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except OSError:
                data = b""
            found = _STATUS.search(data)
            counts[f"answered {found.group(1).decode()}" if found else "closed by the gateway"] += 1
            selector.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            open_one()
    held = len(selector.get_map())
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return {"source": source, "connections": connections, "seconds": seconds, "held_at_end": held, **counts}


def start_idle_flood(port: int, source: str, connections: int, seconds: float) -> subprocess.Popen:
    """`idle_flood` in a process of its own (its sockets are not the gateway's, nor its CPU)."""
    return subprocess.Popen([sys.executable, "-m", "tests.floods", "idle", "--port", str(port), "--source", source,
                             "--connections", str(connections), "--seconds", str(seconds)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def finished(flood: subprocess.Popen, timeout_s: float = 60) -> dict[str, object]:
    out, _ = flood.communicate(timeout=timeout_s)
    return json.loads(out.strip().splitlines()[-1])


def post_raw(port: int, path: str, token: str, body: bytes, timeout_s: float = 30.0) -> tuple[int, float, bytes]:
    """POST a body on a new connection as fast as the gateway takes it: (status, seconds to the answer, answer)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with contextlib.suppress(OSError):  # (a refusal may come, and the connection close, before it is all sent)
            sock.sendall(head)
            sock.sendall(body)
        answer = b""
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
    found = _STATUS.search(answer)
    return (int(found.group(1)) if found else 0), time.monotonic() - started, answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flood", choices=["idle"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", default="127.0.0.2")
    parser.add_argument("--connections", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    print(json.dumps(idle_flood(args.port, args.source, args.connections, args.seconds)), flush=True)


if __name__ == "__main__":
    main()
