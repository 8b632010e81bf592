# -*- test-case-name: tests.unit.test_wire -*-
"""Replies handed to the socket at once.

``transport.write`` on a Twisted TCP connection only buffers: it registers
the socket for writability (an ``epoll_ctl``), the reactor calls ``doWrite``
on its next turn, which sends and unregisters again (another
``epoll_ctl``).  For a server whose replies are small and whose socket is
almost always writable, that is two system calls and a loop turn per reply
for nothing.  :func:`write_now` sends straight away when nothing is queued
before it, and leaves whatever the socket does not take (and every error)
to the transport, which then works exactly as it always does.

Only a plain TCP connection (``tcp.Server`` with no TLS started on it)
takes the short way; TLS, UNIX sockets and the test transports get
``transport.write``.
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    """Send ``data`` on ``transport``, now when the socket takes it."""
    t = transport
    if (type(t) is tcp.Server and not t.TLS and t.connected and not t.disconnecting
            and not t._writeDisconnected and not t.dataBuffer and not t._tempDataLen):
        try:
            sent = t.socket.send(data)
        except OSError:  # full (EAGAIN) or broken: the transport finds out
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    t.write(data)
