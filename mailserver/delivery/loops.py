# -*- test-case-name: tests.unit.test_delivery_remote -*-
"""Loop detection: would a connection to this address and port reach us?

:class:`LocalAddresses` says whether an IP address belongs to this machine;
:class:`OwnListeners` whether ``address:port`` leads to one of our own SMTP
listeners.  ``service.build_queue`` gives an :class:`OwnListeners` to
:class:`~mailserver.delivery.remote.RemoteDelivery` as ``own_endpoint``, and
:class:`~mailserver.delivery.mx.MXResolver` uses it to drop MX hosts that are
this server, so mail is never relayed back to ourselves.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Callable, Dict, Iterable, Optional, Tuple


def _unmapped(text: str):
    """The IP address in ``text`` (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


class LocalAddresses:
    """``address -> bool``: is ``address`` one of this machine's?

    Loopback and unspecified addresses (``0.0.0.0`` and ``::`` connect to
    this machine too) are, without asking; for any other, binding a UDP
    socket to ``(address, 0)`` succeeds only when an interface has it.  No
    packet is sent.  Answers are kept ``ttl`` seconds (addresses come and
    go with DHCP and VPNs), at most ``max_size`` of them.
    """

    def __init__(self, *, ttl: float = 300.0, max_size: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._cache: Dict[str, Tuple[bool, float]] = {}

    def __call__(self, address: str) -> bool:
        ip = _unmapped(address)
        if ip is None:
            return False
        if ip.is_loopback or ip.is_unspecified:
            return True
        key, now = ip.compressed, self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        answer = self._bindable(ip)
        if key not in self._cache and len(self._cache) >= self.max_size:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[key] = (answer, now + self.ttl)
        return answer

    @staticmethod
    def _bindable(ip) -> bool:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((ip.compressed, 0))
        except OSError:  # EADDRNOTAVAIL; EAFNOSUPPORT without IPv6
            return False
        return True


class OwnListeners:
    """``(address, port) -> bool``: would a connection there reach one of our
    SMTP listeners?

    ``listeners``: ``(host, port)`` of each TCP listener, ``host`` empty (or
    ``0.0.0.0``, ``::``) for one on every address.  Such a listener is
    reached through any address of this machine (``is_local``, by default
    :class:`LocalAddresses`) at its port; one bound to an address only
    through that address.  Another port on this machine is somebody else.
    """

    def __init__(self, listeners: Iterable[Tuple[str, int]], *,
                 is_local: Optional[Callable[[str], bool]] = None) -> None:
        self.is_local = is_local or LocalAddresses()
        self._wildcard_ports = set()
        self._bound = set()
        for host, port in listeners:
            ip = _unmapped(host) if host else None
            if not host or (ip is not None and ip.is_unspecified):
                self._wildcard_ports.add(port)
            elif ip is not None:
                self._bound.add((ip, port))

    def __call__(self, address: str, port: int) -> bool:
        ip = _unmapped(address)
        if ip is None:
            return False
        if (ip, port) in self._bound:
            return True
        return port in self._wildcard_ports and self.is_local(ip.compressed)
