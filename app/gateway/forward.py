"""What a gateway worker sends on to the control plane: every request whose answer needs state that one process owns.

A deployment with more than one gateway worker (`app.gateway.worker`) has its workers answer the requests they can
answer alone (the page's files, /healthz, an inference request of a key without rate limits to a model that serves)
and send every other to the deployment's own gateway, the control plane, on its loopback port (`ControlPlane`):
a key with rate limits (its windows and requests in flight have one owner), a model that is not serving (held
through its restart or wake-up there), a model that shares GPUs or loads adapters on request (the residency and the
adapters' leases), and the answers made of the deployment's counters and states (the page's status, /metrics,
/v1/models, /readyz: a model asleep is `sleeping` there, where a worker knows only its engine). The request goes as it
came, its client's own token with it: the control plane authenticates, limits, counts and answers it as it would a
request of its own, and the worker passes the answer back unchanged, counting it nowhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import Handled, Request, Responder
from app.gateway.model_routes import ModelRoute
from app.gateway.relay import Relay, RelayContext
from app.gateway.upstream import Upstream
from app.states import ModelState

# How long a worker waits to connect to the control plane (on this machine's loopback).
CONTROL_CONNECT_TIMEOUT_SECONDS = 5.0


class ControlPlane:
    """The deployment's own gateway, as a worker reaches it."""

    endpoint = "control plane"
    api_key = None
    transparent = True  # its answers go to the client as they are: they are the gateway's own already

    def __init__(self, port: int, always: Collection[str], quiet_token: str):
        """`always`: the endpoints whose every request it answers (models sharing GPUs, adapters on request);
        `quiet_token`: its benchmark's token (`app.gateway.gateway.Gateway.quiet_token`), the worker's too."""
        self.port, self.always, self.quiet_token = port, frozenset(always), quiet_token
        self.upstream: Upstream | None = None
        self.host = b"127.0.0.1:%d" % port

    def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        self.upstream = Upstream("127.0.0.1", self.port, connect_timeout_s=CONTROL_CONNECT_TIMEOUT_SECONDS, loop=loop)

    def takes(self, request: Request, model: ModelRoute) -> bool:
        """The request's answer needs the control plane: its key's rate limits, or its model's state or sharing."""
        key = request.key
        return ((key is not None and key.admits) or model.endpoint in self.always
                or model.state != ModelState.RESIDENT)

    def relay(self, context: RelayContext, request: Request, conn: Responder) -> Handled:
        request.counted = False  # (counted where it is answered)
        path = request.path.encode() + (b"?" + request.query if request.query else b"")
        return Relay(context, request, conn, Forwarded(self, request.header(b"authorization")), path).start()


class Forwarded:
    """One request on its way to the control plane: with its client's own token."""

    __slots__ = ("control", "authorization")

    transparent = True

    def __init__(self, control: ControlPlane, authorization: bytes | None):
        self.control, self.authorization = control, authorization

    endpoint = property(lambda self: self.control.endpoint)
    upstream = property(lambda self: self.control.upstream)
    host = property(lambda self: self.control.host)
    api_key = None

    def leave(self, now: float) -> None:
        pass

    async def after_failure(self) -> Reply | None:
        """The control plane failed before answering: the deployment is going down."""
        return error_reply(502, "The deployment's control plane did not answer", "engine_unreachable")
