# -*- test-case-name: tests.unit.test_sdnotify -*-
"""systemd's readiness protocol (sd_notify(3)), without libsystemd.

A service started with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in its
environment: a UNIX datagram socket, a path, or a name in the abstract
namespace when it begins with ``@``.  Each notification is one datagram of
``KEY=value`` lines: ``READY=1`` once every listener accepts connections,
``RELOADING=1`` / ``READY=1`` around a reload, ``STOPPING=1`` at shutdown.
Without the variable (not under systemd) :func:`notify` does nothing.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping, Optional


def notify(state: str, environ: Optional[Mapping[str, str]] = None) -> bool:
    """Send ``state`` to systemd; True when a datagram left.

    Errors (no listener, a full queue) are swallowed: readiness reports
    must never stop the server.
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def reloading() -> str:
    """The RELOADING message, with the timestamp systemd >= 253 asks for."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return f"RELOADING=1\nMONOTONIC_USEC={usec}"
