"""One proxied request, from the gateway to an engine and back, and what is counted of it.

`Relay` sends a request on a kept-alive connection to the engine (or a new one), relays the answer on the
connections' callbacks, and records it when it ends: complete, failed (502, 504, or an SSE error event once a stream
was under way), or abandoned by its client. It is the one bridge between the engine's side (`Exchange` hands it the
response, as its `ResponseSink`) and the client's (the `Responder` its request came with, whose room to write resumes
the engine's socket). An engine's error (any status from 400) is answered in the one error shape, its message read and
cleaned; a transparent target's (`app.gateway.forward`) as it is. `InFlight` counts requests under way (drain, idle).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.gateway.bodies import MAX_COUNTED_RESPONSE_BYTES, UsageScanner, UsageStripper, text_bytes
from app.gateway.errors import Reply, clean_message, engine_error_message, error_reply, invalid_json, sse_error_event
from app.gateway.messages import PENDING, Handled, Request, Responder
from app.gateway.stats import RequestRecord, RequestStats
from app.gateway.upstream import (
    Exchange,
    PoolExhausted,
    ResponseHead,
    Upstream,
    UpstreamConnection,
    UpstreamError,
    request_bytes,
    response_head,
)

logger = logging.getLogger(__name__)

# Largest error body read from an engine to re-shape it (the message is what is kept).
MAX_ERROR_BODY_BYTES = 64 * 1024
# What a 503 tells clients to wait before retrying (loading, restarting, draining).
RETRY_AFTER_SECONDS = 5

_ENGINE_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 409: "conflict",
                 413: "request_too_large", 422: "invalid_request", 429: "rate_limited"}


class Activity(Protocol):
    """Told when a proxied request starts and ends (the idle policy)."""

    def request_started(self, now: float) -> None: ...

    def request_finished(self, now: float) -> None: ...


class InFlight:
    """The requests under way: how many, whether none (for draining), and the idle policy told of each."""

    def __init__(self, activity: Activity | None):
        self.count = 0
        self._activity = activity
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self, now: float, activity: bool = True) -> None:
        self.count += 1
        self.idle.clear()
        if self._activity is not None and activity:
            self._activity.request_started(now)

    def leave(self, now: float, activity: bool = True) -> None:
        self.count -= 1
        if self._activity is not None and activity:
            self._activity.request_finished(now)
        if self.count == 0:
            self.idle.set()


class Target(Protocol):
    """Where a relayed request goes (`app.gateway.gateway.ModelRoute`)."""

    endpoint: str
    upstream: Upstream | None
    host: bytes
    authorization: bytes | None
    api_key: str | None
    transparent: bool  # its answers are the gateway's own already (`app.gateway.forward`): errors pass as they are

    def leave(self, now: float) -> None:
        """The request has ended (models sharing GPUs count them)."""

    async def after_failure(self) -> Reply | None:
        """The engine failed before answering: None once it serves again (send the request once more), else the
        answer (`ModelRoute.after_failure`)."""


@dataclass
class RelayContext:
    """What every relay of one gateway shares."""

    loop: asyncio.AbstractEventLoop
    clock: Callable[[], float]
    stats: RequestStats
    flight: InFlight
    read_timeout_s: float = field(default=600.0)


class Relay:
    """One proxied request; `start()` is the handler's answer (`PENDING`, or an awaitable while it connects). The
    sink of its exchange with the engine (`response_head`, `response_body`, `response_end`)."""

    __slots__ = ("ctx", "request", "conn", "target", "data", "started", "sent_at", "usage", "status",
                 "streamed", "exchange", "attempt", "reused", "error_body", "stripper", "began", "events", "resent")

    def __init__(self, ctx: RelayContext, request: Request, conn: Responder, target: Target, path: bytes,
                 held_s: float = 0.0):
        """`held_s`: how long the request was held before it could be sent (its latency counts from its arrival)."""
        self.ctx, self.request, self.conn, self.target = ctx, request, conn, target
        self.data = request_bytes(request.method, path, target.host, request.headers, request.body,
                                  target.authorization)
        self.started: float | None = ctx.clock() - held_s
        self.usage = UsageScanner()
        self.status, self.streamed = 502, False
        self.exchange: Exchange | None = None
        self.attempt, self.reused = 0, False
        self.error_body: list[bytes] | None = None  # an engine's error response, read to be re-shaped
        self.stripper = UsageStripper() if request.strip_usage else None  # the usage chunk its client did not ask
        self.began = False  # its answer went out as a success (a failure after it is a stream cut)
        key = request.key
        # a key's tokens per minute: its stream's events are counted, for a stream cut before its usage came
        self.events: int | None = 0 if request.admitted and key is not None and key.limits.tpm is not None else None
        self.sent_at = ctx.loop.time() - held_s  # the exchange's clock, for the time to the first chunk
        self.resent = False  # sent again after its engine failed before answering (once)
        ctx.flight.enter(self.started, request.counted)
        conn.on_lost = self._lost

    def start(self) -> Handled:
        assert self.target.upstream is not None
        connection = self.target.upstream.take_idle()
        if connection is None:
            return self._connect()
        self._send(connection)
        return PENDING

    async def _connect(self) -> Handled:
        assert self.target.upstream is not None
        endpoint = self.target.endpoint
        try:
            connection = await self.target.upstream.acquire()
        except PoolExhausted:
            self.status = 503
            self._answer(error_reply(503, f"Model {endpoint!r} has too many requests open", "overloaded",
                                     retry_after_s=RETRY_AFTER_SECONDS))
            return None
        except UpstreamError as exc:
            if not self.resent:  # its engine may have died a moment ago, not yet noticed: as in `response_end`
                self.resent = True
                self.ctx.loop.create_task(self._resend())
                return PENDING
            self._answer(error_reply(502, f"Model {endpoint!r} is unreachable ({exc})", "engine_unreachable"))
            return None
        except asyncio.CancelledError:
            self._lost()
            raise
        self._send(connection)
        return PENDING

    def _send(self, connection: UpstreamConnection) -> None:
        self.attempt += 1
        self.reused = connection.used
        self.exchange = exchange = Exchange(self, self.ctx.loop, self.ctx.read_timeout_s)
        self.conn.on_writable = exchange.resume
        exchange.send(connection, self.data)

    # ----- the exchange's sink -----

    def response_head(self, head: ResponseHead) -> None:
        self.status = head.status
        if head.status >= 400 and not self.target.transparent:  # read the engine's error to answer it in the one shape
            self.error_body = []
            return
        self.streamed = head.content_length is None or (head.header(b"content-type") or b"").startswith(
            b"text/event-stream")
        self.usage.whole = not self.streamed and (head.content_length or 0) <= MAX_COUNTED_RESPONSE_BYTES
        if not self.streamed:
            self.stripper = None  # (the engine answered whole after all)
            self.events = None  # (only a stream's events are counted)
        self.began = True
        self.conn.start(head.status, response_head(head), None if self.stripper else head.content_length)

    def response_body(self, data: bytes) -> bool:
        if self.error_body is not None:
            if sum(map(len, self.error_body)) < MAX_ERROR_BODY_BYTES:
                self.error_body.append(data)
            return True
        conn = self.conn
        if self.stripper is None:
            conn.write(data)
        else:
            conn.write(self.stripper.feed(data))
        self.usage.feed(data)
        if self.events is not None:
            self.events += data.count(b"data:")
        return conn.writable

    def response_end(self, exchange: Exchange) -> None:
        if exchange.error is not None and exchange.head is None and not exchange.timed_out:
            if self.reused and self.attempt == 1:
                # a kept-alive connection the engine had closed meanwhile: once more, on a fresh one
                result = self.start()
                if result is not PENDING:
                    self.ctx.loop.create_task(self._retry(result))  # type: ignore[arg-type]
                return
            if not self.resent:  # no byte of an answer went out: the client need not know the engine failed
                self.resent = True
                self.ctx.loop.create_task(self._resend())
                return
        if self.error_body is not None:
            assert exchange.head is not None
            reply = engine_error(exchange.head.status, b"".join(self.error_body), self.target, self.request.body)
            self.status = reply.status
            self.conn.reply(reply)
        elif exchange.error is not None:
            self.status = failed(self.conn, exchange, self.target.endpoint)
        else:
            if self.stripper is not None:
                self.conn.write(self.stripper.flush())
            self.conn.end()
        self._finish()
        self.conn.request_done()

    async def _resend(self) -> None:
        """Held through its engine's restart (`Target.after_failure`), then sent once more; or answered as it says."""
        refusal = await self.target.after_failure()
        if self.started is None:
            return  # its client went away meanwhile (recorded as such)
        if refusal is not None:
            self.status = refusal.status
            self._answer(refusal)
            self.conn.request_done()
            return
        self.attempt = 0  # (a kept-alive connection to the engine that died is retried on a fresh one, as ever)
        result = self.start()
        if result is not PENDING:
            await self._retry(result)  # type: ignore[arg-type]

    async def _retry(self, connecting: Awaitable[object]) -> None:
        if await connecting is not PENDING:
            self.conn.request_done()

    def _answer(self, reply: Reply) -> None:
        self.conn.reply(reply)
        self._finish()

    def _lost(self) -> None:
        """The client went away: the engine's connection closes, which makes the engine abort the request."""
        if self.exchange is not None and not self.exchange.finished:
            self.exchange.abandon()
        self.status = 499
        self._finish()

    def _finish(self) -> None:
        if self.started is None:
            return  # recorded already
        ctx, exchange = self.ctx, self.exchange
        ended = ctx.clock()
        counted = self.request.counted
        ctx.flight.leave(ended, counted)
        self.conn.on_lost = self.conn.on_writable = None
        first = exchange.first_byte_at if exchange is not None else None
        ttft = first - self.sent_at if self.streamed and first is not None else None
        found = self.usage.result() or {}
        prompt, completion = found.get("prompt_tokens"), found.get("completion_tokens")
        request = self.request
        key = request.key
        if request.admitted:
            assert key is not None
            request.admitted = False
            key.release(ended, (prompt or 0) + (completion or 0) if found else self._estimate())
        if counted:
            ctx.stats.record(RequestRecord(
                endpoint=self.target.endpoint, status=self.status, latency_s=ended - self.started, ttft_s=ttft,
                prompt_tokens=prompt, completion_tokens=completion, stream=self.streamed,
                key=key.name if key is not None else None, cut=self.began and self.status >= 500,
                sent_status=exchange.head.status if exchange is not None and exchange.head is not None else 200))
        self.started = None
        self.exchange = None  # the exchange's callbacks point back here: no cycle left for the collector
        self.target.leave(ended)

    def _estimate(self) -> int:
        """The tokens of a request ended without the engine's usage (its client left, the engine failed): one per event
        relayed and per 4 bytes of its prompt's text (leaving a stream before its last chunk passes no rate limit)."""
        return (self.events or 0) + text_bytes(self.request.body)[0] // 4 if self.events is not None else 0


def engine_error(status: int, body: bytes, target: Target, request_body: bytes) -> Reply:
    """The engine's error in the one shape, its message cleaned of paths, tracebacks and keys. An engine that
    refuses the gateway's own key is the gateway's fault to report: 502."""
    message = clean_message(engine_error_message(status, body), (target.api_key or "",))
    endpoint = target.endpoint
    if status in (401, 403):
        logger.error("Model %s refused the gateway's key (%d)", endpoint, status)
        return error_reply(502, f"Model {endpoint!r} refused the gateway's request", "engine_refused")
    if status == 503:
        return error_reply(503, f"Model {endpoint!r} is busy: {message}", "engine_unavailable",
                           retry_after_s=RETRY_AFTER_SECONDS)
    if status >= 500:
        return error_reply(status, f"Model {endpoint!r} failed: {message}", "engine_error")
    if status in (400, 422):  # the engine's words for a body that is not JSON name no place in it: ours do
        not_json = invalid_json(request_body)
        if not_json is not None:
            return not_json
    return error_reply(status, message, _ENGINE_CODES.get(status, "invalid_request"))


def failed_before_answering(endpoint: str) -> Reply:
    return error_reply(502, f"Model {endpoint!r} failed before answering", "engine_unreachable")


def failed(conn: Responder, exchange: Exchange, endpoint: str) -> int:
    """The engine failed or went silent: say so in the way the client can still hear; the status recorded."""
    timed_out = exchange.timed_out
    code, reason = (504, "engine_timeout") if timed_out else (502, "engine_crashed")
    what = "stopped answering" if timed_out else "failed mid-response"
    if exchange.head is None:
        if timed_out:
            conn.reply(error_reply(504, f"Model {endpoint!r} did not answer in time", reason))
        else:
            conn.reply(failed_before_answering(endpoint))
        return code
    logger.warning("Response from %s was cut: the engine %s", endpoint, what)
    if (exchange.head.header(b"content-type") or b"").startswith(b"text/event-stream"):
        conn.write(sse_error_event(code, f"Model {endpoint!r} {what}", reason))
        conn.end()
    else:
        conn.abort()  # a body cut short: the client must not take it for a whole one
    return code
