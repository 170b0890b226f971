"""Client connections: at most a cap of them (past it a new one gets 503 and is closed), each findable again so all
can be closed when the gateway stops, and the open-file limit raised to what the cap needs."""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Protocol

from app.gateway.errors import Reply, error_reply
from app.gateway.messages import Handled, Limits, Request
from app.gateway.relay import RETRY_AFTER_SECONDS
from app.gateway.server import ServerConnection
from app.gateway.stats import RequestStats

logger = logging.getLogger(__name__)


class ConnectionOwner(Protocol):
    """What a connection needs of its gateway (`app.gateway.gateway.Gateway`)."""

    limits: Limits
    stats: RequestStats
    connections: set[ServerConnection]
    max_connections: int
    refused_connections: int

    def handle(self, request: Request, conn: ServerConnection) -> Handled: ...

    def screen(self, request: Request) -> Reply | None: ...


def raise_open_file_limit(connections: int) -> int:
    """Raise this process's open-file limit to what `connections` client connections need (each with one to an
    engine, and room for the rest), as far as the hard limit allows; the connections that fit."""
    needed = 2 * connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("Could not raise the open-file limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        fitting = max(1, (soft - 1024) // 2)
        logger.warning("The open-file limit (%d) allows %d client connections, not %d: raise `ulimit -n` for more",
                       soft, fitting, connections)
        return fitting
    return connections


class TrackedConnection(ServerConnection):
    """A server connection the gateway can find again (to close them all when it stops), within its cap."""

    def __init__(self, gateway: ConnectionOwner, loop: asyncio.AbstractEventLoop):
        super().__init__(gateway.handle, loop, gateway.limits, screen=gateway.screen,
                         on_response=gateway.stats.count_response)
        self._gateway = gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gateway = self._gateway
        if len(gateway.connections) >= gateway.max_connections:
            if gateway.refused_connections % 1000 == 0:
                logger.warning("%d client connections are open (the most allowed): new ones get 503",
                               len(gateway.connections))
            gateway.refused_connections += 1
            super().connection_made(transport)
            self.keep_alive = False
            self.reply(error_reply(503, "Too many connections are open; retry shortly", "too_many_connections",
                                   retry_after_s=RETRY_AFTER_SECONDS))
            self.stop_reading()
            return
        gateway.connections.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._gateway.connections.discard(self)
        super().connection_lost(exc)
