"""Client connections: a table with a cap, and a share per client address, where a token holder always gets in;
each connection findable again so all can be closed when the gateway stops; the open-file limit raised to what the
cap needs.

When the table is full, a new connection is not refused: a connection is closed to make room (Envoy's overload
manager, nginx's `limit_conn`). If the newcomer's address already holds its share (`per_address`), the room comes
from that address's own connections; otherwise from the whole table. Either way it is the connection that has gone
longest without an authenticated request: one that never sent one before any that did, oldest first; then an idle
one of a token holder, longest idle first; never one with a request under way. Only when every candidate is busy
does the newcomer get 503.

The share applies when the table is full, not before: a cap that closed a connection past it at once would make a
flood churn (every one closed and opened again at once: 7,600 a second measured here, the engine starved of CPU),
while idle strangers cost little until the table is full, and leave on their own at the first-byte deadline.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import resource
import time
from collections.abc import Callable, Iterator

from app.gateway.errors import error_reply
from app.gateway.messages import Handler, Limits, Request, Screen
from app.gateway.relay import RETRY_AFTER_SECONDS
from app.gateway.server import ServerConnection

logger = logging.getLogger(__name__)

# Client connections at most (each proxied one also holds a connection to an engine); the open-file limit is
# raised to what this needs, where the hard limit allows.
MAX_CONNECTIONS = 8192
# Connections one client address may keep once the table is full (an IPv6 client's /64 is one address), an eighth of
# it: a flood from one place holds that share and no more. Behind a proxy or a NAT every client has one address:
# raise it, or 0 for none (the table's own order still lets token holders in).
MAX_CONNECTIONS_PER_ADDRESS = 1024
# Token holders' connections looked at for an idle one to close, when the table holds no stranger's: past these the
# newcomer gets 503 (a table of busy token holders is full for real).
MEMBER_CANDIDATES = 64
# A flood closes thousands of connections a second: the console says so once, then once a minute with the count.
WARNING_INTERVAL_SECONDS = 60.0


def client_address(peer: object) -> str:
    """What the cap per address counts by: the IPv4 address, or an IPv6 address's /64 (one client holds a whole
    /64); an IPv4-mapped IPv6 address is its IPv4 address."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    if ":" not in host:  # (IPv4, as the socket gives it: already its own name)
        return host
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Order:
    """Connections in the order they are closed to make room: strangers (never authenticated) oldest first, then
    token holders' by their last authenticated request."""

    __slots__ = ("strangers", "members")

    def __init__(self) -> None:
        self.strangers: collections.OrderedDict[ServerConnection, None] = collections.OrderedDict()
        self.members: collections.OrderedDict[ServerConnection, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.strangers) + len(self.members)

    def authenticated(self, conn: ServerConnection) -> None:
        if conn in self.strangers:
            del self.strangers[conn]
        elif conn not in self.members:
            return
        self.members[conn] = None
        self.members.move_to_end(conn)

    def discard(self, conn: ServerConnection) -> None:
        self.strangers.pop(conn, None)
        self.members.pop(conn, None)

    def victim(self) -> ServerConnection | None:
        if self.strangers:
            return next(iter(self.strangers))
        for i, conn in enumerate(self.members):
            if i >= MEMBER_CANDIDATES:
                break
            if conn.idle:
                return conn
        return None


class ConnectionTable:
    """The open client connections, within `capacity`, and `per_address` from one client address once the table is
    full (0: no share). `admit` makes room or says there is none; `authenticated` moves a connection back in the
    order."""

    def __init__(self, capacity: int = MAX_CONNECTIONS, per_address: int = MAX_CONNECTIONS_PER_ADDRESS,
                 clock: Callable[[], float] = time.monotonic):
        self.capacity = capacity
        self.per_address = per_address
        self._all = _Order()
        self._by_address: dict[str, _Order] = {}
        self._address: dict[ServerConnection, str] = {}
        self.closed_to_make_room = 0
        self.refused = 0
        self._clock = clock
        self._warned: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._address)

    def __iter__(self) -> Iterator[ServerConnection]:
        return iter(list(self._address))

    def admit(self, conn: ServerConnection, address: str) -> bool:
        """Take `conn` in; where the table is full, close the connection longest without an authenticated request:
        its address's own if that address holds its share, else the table's. False when every candidate is busy
        (nothing was closed)."""
        if len(self._address) >= self.capacity:
            mine = self._by_address.get(address)
            if self.per_address and mine is not None and len(mine) >= self.per_address:
                if not self._make_room(mine, "from one address"):
                    return False
            elif not self._make_room(self._all, "in all"):
                return False
        self._address[conn] = address
        self._all.strangers[conn] = None
        self._by_address.setdefault(address, _Order()).strangers[conn] = None
        return True

    def authenticated(self, conn: ServerConnection) -> None:
        address = self._address.get(conn)
        if address is not None:
            self._all.authenticated(conn)
            self._by_address[address].authenticated(conn)

    def discard(self, conn: ServerConnection) -> None:
        address = self._address.pop(conn, None)
        if address is None:
            return
        self._all.discard(conn)
        mine = self._by_address[address]
        mine.discard(conn)
        if not len(mine):
            del self._by_address[address]

    def fit_open_files(self) -> None:
        """Raise the open-file limit to what the table's capacity needs; where the hard limit is lower, the
        capacity shrinks to what fits."""
        self.capacity = raise_open_file_limit(self.capacity)

    def counts(self) -> tuple[int, int, int]:
        """Connections open now, closed to make room so far, refused so far."""
        return len(self), self.closed_to_make_room, self.refused

    def prometheus(self, counts: tuple[int, int, int] | None = None) -> str:
        """The table in Prometheus text (or `counts`: the gateway workers' tables together): what an operator watches
        while a flood goes on."""
        open_now, closed, refused = counts or self.counts()
        return "\n".join((
            "# HELP clearml_sglang_connections_open Client connections open now.",
            "# TYPE clearml_sglang_connections_open gauge", f"clearml_sglang_connections_open {open_now}",
            "# HELP clearml_sglang_connections_closed_to_make_room_total Connections closed for a new one: the table "
            "(or the address's share of it) was full.",
            "# TYPE clearml_sglang_connections_closed_to_make_room_total counter",
            f"clearml_sglang_connections_closed_to_make_room_total {closed}",
            "# HELP clearml_sglang_connections_refused_total New connections answered 503: every candidate was busy.",
            "# TYPE clearml_sglang_connections_refused_total counter",
            f"clearml_sglang_connections_refused_total {refused}")) + "\n"

    def _make_room(self, order: _Order, where: str) -> bool:
        victim = order.victim()
        if victim is None:
            self.refused += 1
            if self._time_to_warn("refused"):
                logger.warning("%d client connections are open %s, all busy: new ones get 503 (%d so far)",
                               len(order), where, self.refused)
            return False
        stranger = not victim.authenticated_once
        self.discard(victim)
        victim.evict(stranger)
        self.closed_to_make_room += 1
        if self._time_to_warn(where):
            logger.warning("The most client connections allowed %s are open (%d): the one longest without an "
                           "authenticated request is closed for each new one (%d so far)", where, len(order) + 1,
                           self.closed_to_make_room)
        return True

    def _time_to_warn(self, what: str) -> bool:
        now = self._clock()
        if now - self._warned.get(what, -WARNING_INTERVAL_SECONDS) < WARNING_INTERVAL_SECONDS:
            return False
        self._warned[what] = now
        return True


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
    """A server connection in a table: admitted (making room) when it opens, moved back in the table's order by each
    authenticated request, taken out when it closes; the table changes through its own methods only."""

    def __init__(self, handler: Handler, loop: asyncio.AbstractEventLoop, limits: Limits, *, screen: Screen,
                 on_response: Callable[[int, Request], None], table: ConnectionTable):
        super().__init__(handler, loop, limits, screen=screen, on_response=on_response)
        self._table = table

    def _authenticated(self) -> None:
        ServerConnection._authenticated(self)  # (not super(): this runs for every request, and it costs more)
        self._table.authenticated(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self._table.admit(self, client_address(transport.get_extra_info("peername"))):
            self.keep_alive = False
            self.reply(error_reply(503, "Too many connections are open; retry shortly", "too_many_connections",
                                   retry_after_s=RETRY_AFTER_SECONDS))
            self.stop_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._table.discard(self)
        super().connection_lost(exc)
