# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""Connection limits for the listeners: how many at once, in total and per client.

:class:`ConnectionLimiter` counts one listener's open connections and gives
the 421 that refuses one too many; :class:`ConnectionRateLimiter` counts
connections per client per minute; :func:`client_key` decides what counts as
one client (an IPv4 address, or the /64 around an IPv6 one).
:mod:`mailserver.protocols.smtp` asks both when a connection opens and
closes, and ``service.py`` gives each listener a limiter of its own.
"""

from __future__ import annotations

import ipaddress
from typing import Optional

from mailserver import reply as R


class ConnectionLimiter:
    """Counts connections in total and per client.

    Each listener has its own, so a flood on port 25 cannot take the slots an
    LMTP feed needs.  Clients are keyed by :func:`client_key`.
    """

    def __init__(self, max_total: int, max_per_client: int) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = {}

    def acquire(self, client: str) -> Optional[R.Reply]:
        """Count a new connection, or return the 421 that refuses it."""
        if self.total >= self.max_total:
            return R.TOO_MANY_CONNECTIONS
        if self.per_client.get(client, 0) >= self.max_per_client:
            return R.TOO_MANY_FROM_CLIENT
        self.total += 1
        self.per_client[client] = self.per_client.get(client, 0) + 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.per_client.get(client, 1) - 1
        if left:
            self.per_client[client] = left
        else:
            self.per_client.pop(client, None)


def peer_ip(transport) -> str:
    """The client's IP address, or ``"unix"`` for a UNIX-socket peer."""
    peer = transport.getPeer()
    return getattr(peer, "host", None) or "unix"


def client_key(ip: str) -> str:
    """What the per-client limit counts: the address, or its /64 for IPv6
    (one IPv6 host usually holds a whole /64)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(addr)


class ConnectionRateLimiter:
    """Connections per client per minute (Postfix's anvil
    ``smtpd_client_connection_rate_limit``), one per listener.

    A fixed window per client: the first connection opens a ``window``-second
    window, and past ``limit`` connections in it :meth:`allow` says no until
    it ends.  Clients whose window is over are forgotten (at most once per
    window, in one pass), so the state stays bounded by the clients seen in
    the last minute.  ``limit`` 0 is no limit.  Client addresses in
    ``exempt`` (the trusted networks, as Postfix exempts ``mynetworks``) are
    never limited, nor are UNIX-socket peers (``"unix"``: local processes,
    an LMTP feed, that would otherwise all share one key).  The interface
    is :meth:`allow` alone, so the state can
    move to a supervisor process later (DESIGN.md 9) without changing the
    listeners.
    """

    def __init__(self, limit: int, window: float = 60.0, exempt=()) -> None:
        self.limit = limit
        self.window = window
        self.exempt = exempt
        self._clients: dict[str, tuple[float, int]] = {}  # key -> (window start, count)
        self._swept = 0.0

    def __len__(self) -> int:
        return len(self._clients)

    def allow(self, client: str, now: float, ip: str = "") -> bool:
        """Count a connection from ``client`` (a :func:`client_key`; ``ip`` the
        address itself) at ``now``; False when over the limit."""
        if not self.limit or ip == "unix" or (ip and ip in self.exempt):
            return True
        if now - self._swept >= self.window:
            self._swept = now
            self._clients = {k: v for k, v in self._clients.items()
                             if now - v[0] < self.window}
        start, count = self._clients.get(client, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        self._clients[client] = (start, count)
        return count <= self.limit
