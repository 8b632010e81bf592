# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""Connection limits for the listeners: how many at once, in total and per client.

:class:`ConnectionLimiter` counts one listener's open connections and gives
the 421 that refuses one too many; :func:`client_key` decides what counts as
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
