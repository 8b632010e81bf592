# -*- test-case-name: tests.unit.test_workers -*-
"""Connection limits that hold across workers.

The SMTP and POP3 adapters decide at ``connectionMade``, synchronously, by
asking their context's ``limiter`` and ``rate_limiter``.  In a worker those
are one :class:`SharedLimits`, and the listener's factory is wrapped in a
:class:`GateFactory`: a new connection first waits (reading paused) for the
supervisor's :class:`~mailserver.workers.channel.ConnectionOpen` answer,
which the gate leaves on :class:`SharedLimits` just before it hands the
connection to the real protocol, whose ``connectionMade`` reads it.  So the
adapters keep their one code path (refusal replies, logs, metrics), and the
count is the supervisor's.  Then the gate steps out of the way: the
transport delivers straight to the protocol.

Under implicit TLS the gate sits inside the TLS layer, so a refusal is
written inside TLS as in one process.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer, protocol
from twisted.logger import Logger

from mailserver import reply as R
from mailserver.protocols.limits import client_key, peer_ip
from mailserver.workers.channel import ConnectionClose, ConnectionOpen

log = Logger(namespace="mailserver")

_REFUSALS = {"": None, "total": R.TOO_MANY_CONNECTIONS, "client": R.TOO_MANY_FROM_CLIENT,
             "down": R.SERVICE_UNAVAILABLE}


class SharedLimits:
    """One listener's ``limiter`` and ``rate_limiter`` in a worker: the
    verdict the gate fetched, and a release that tells the supervisor."""

    def __init__(self, channel, listener: str) -> None:
        self.channel = channel
        self.listener = listener
        self.verdict = ""  # set by the gate just before connectionMade

    # -- ConnectionRateLimiter's interface
    def allow(self, client: str, now: float, ip: str = "") -> bool:
        return self.verdict != "rate"

    # -- ConnectionLimiter's interface
    def acquire(self, client: str) -> Optional[R.Reply]:
        return _REFUSALS.get(self.verdict, R.SERVICE_UNAVAILABLE)

    def release(self, client: str) -> None:
        self.channel.send(ConnectionClose, listener=self.listener, key=client)


class Gate(protocol.Protocol):
    """Holds a new connection until the supervisor has counted it."""

    def __init__(self, factory: "GateFactory", inner) -> None:
        self.gate_factory = factory
        self.inner = inner
        self.buffered = []
        self.lost = False  # the client left while we waited

    def connectionMade(self) -> None:
        f = self.gate_factory
        self.key = client_key(peer_ip(self.transport))
        try:
            self.transport.pauseProducing()
        except Exception:
            pass
        d = f.channel.call(ConnectionOpen, late=self._late, listener=f.limits.listener,
                           key=self.key, ip=peer_ip(self.transport))
        defer.ensureDeferred(d).addCallbacks(
            lambda r: self._decided(r["refusal"]), self._unreachable).addErrback(self._failed)

    def _failed(self, failure) -> None:
        log.failure("connection gate: internal error, closing", failure)
        if self.transport is not None:
            self.transport.abortConnection()

    def _late(self, answer) -> None:
        """The supervisor counted us after we gave up waiting: give it back."""
        if answer["refusal"] == "":
            self.gate_factory.limits.release(self.key)

    def _unreachable(self, failure) -> None:
        log.error("supervisor unreachable (connection limits), refusing: {e}",
                  e=failure.value)
        self._decided("down")

    def _decided(self, verdict: str) -> None:
        f = self.gate_factory
        if self.lost:
            if verdict == "":
                f.limits.release(self.key)
            return
        t = self.transport
        # Reading on again before the protocol starts, so that a pause of
        # its own (back-pressure while it decides) is not undone by us.
        try:
            t.resumeProducing()
        except Exception:
            pass
        # Step out: the transport talks to the real protocol from now on.
        if getattr(t, "protocol", None) is self:
            t.protocol = self.inner
        elif getattr(t, "wrappedProtocol", None) is self:
            t.wrappedProtocol = self.inner
        f.limits.verdict = verdict
        try:
            self.inner.makeConnection(t)
        finally:
            f.limits.verdict = ""
        buffered, self.buffered = self.buffered, []
        for data in buffered:
            self.inner.dataReceived(data)

    def dataReceived(self, data: bytes) -> None:
        if self.inner.transport is None:
            self.buffered.append(data)
        else:  # the transport could not be redirected: pass it on
            self.inner.dataReceived(data)

    def connectionLost(self, reason=None) -> None:
        if self.inner.transport is None:
            self.lost = True
        else:
            self.inner.connectionLost(reason)


class GateFactory(protocol.Factory):
    """Wraps a listener's factory; its protocols start behind a :class:`Gate`."""

    def __init__(self, wrapped, channel, limits: SharedLimits) -> None:
        self.wrapped = wrapped
        self.channel = channel
        self.limits = limits

    def __getattr__(self, name):  # ctx, and whatever else callers read
        return getattr(self.wrapped, name)

    def doStart(self) -> None:
        self.wrapped.doStart()

    def doStop(self) -> None:
        self.wrapped.doStop()

    def buildProtocol(self, addr):
        inner = self.wrapped.buildProtocol(addr)
        if inner is None:
            return None
        return Gate(self, inner)
