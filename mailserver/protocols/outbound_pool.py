# -*- test-case-name: tests.unit.test_outbound,tests.integration.test_outbound_client -*-
"""Outbound connection reuse: several messages over one SMTP connection.

:class:`OutboundConnectionPool` keeps the connections that
:mod:`mailserver.protocols.outbound` opens alive for a short while after a
message, so the next message to the same destination goes over the same
connection (RSET, then the next transaction).  ``service.build_queue`` makes
one and hands its ``deliver_to_host`` to remote delivery and the router in
place of the module function.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from mailserver.delivery.interfaces import DeliveryReport, OutboundMessage
from mailserver.sansio._client_policy import Destination, Timeouts
from mailserver.sansio.smtp_client import ClientResult
from mailserver.protocols.outbound import (
    HostAttempt, OutboundProtocol, attempt_host, remote_name, unsendable_attempt,
)

__all__ = ["OutboundConnectionPool"]

log = Logger(namespace="mailserver.outbound")  # one log namespace for all outbound SMTP


class OutboundConnectionPool:
    """Connections kept open between messages to the same destination.

    After a message, a connection that is still usable waits ``idle_time``
    seconds (on the reactor's clock) for the next message to the same
    destination (host, port, TLS policy, credentials...).  Reuse starts with
    RSET; when that fails, a fresh connection is opened.  A connection is not
    reused after ``max_messages`` messages or ``max_age`` seconds.  At most
    ``max_idle`` connections wait at once (the one idle longest is closed to
    make room), so a burst to many domains cannot pile up descriptors.
    :meth:`deliver_to_host` has the signature of
    :func:`mailserver.protocols.outbound.deliver_to_host`, so a pool can be
    handed to :class:`~mailserver.delivery.remote.RemoteDelivery` in its
    place.  After :meth:`close` nothing is parked: a connection whose
    delivery ends then is sent QUIT at once.
    """

    def __init__(self, reactor, *, idle_time: float = 5.0, max_messages: int = 100,
                 max_age: float = 300.0, max_idle: int = 64,
                 timeouts: Timeouts = Timeouts()) -> None:
        self.reactor = reactor
        self.max_idle = max_idle
        self.idle_time = idle_time
        self.max_messages = max_messages
        self.max_age = max_age
        self.timeouts = timeouts
        self._idle: Dict[tuple, List[Tuple[OutboundProtocol, Any]]] = {}
        self._closing: List[defer.Deferred] = []
        self._closed = False
        self._busy = 0  # deliveries in flight
        self._drained: List[defer.Deferred] = []  # fired when _busy drops to 0

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    async def deliver_to_host(self, reactor, host: Optional[str], port: Optional[int],
                              message: OutboundMessage, *, helo: str, tls: str = "may",
                              tls_hostname: Optional[str] = None, trust_root: Any = None,
                              auth: Optional[Tuple[str, str]] = None, lmtp: bool = False,
                              unix_path: Optional[str] = None, timeouts: Optional[Timeouts] = None,
                              allow_plaintext_auth: bool = False, tlsa: tuple = (),
                              sts_testing: bool = False) -> HostAttempt:
        """Like :func:`~mailserver.protocols.outbound.deliver_to_host`, reusing an idle
        connection when there is one."""
        dest = Destination(host, port, helo, tls, tls_hostname, trust_root, auth, lmtp,
                           unix_path, allow_plaintext_auth, tlsa, sts_testing)
        self._busy += 1
        try:
            return await self._deliver(reactor, dest, message, timeouts)
        finally:
            self._busy -= 1
            if not self._busy:
                drained, self._drained = self._drained, []
                for d in drained:
                    d.callback(None)

    async def _deliver(self, reactor, dest: Destination, message: OutboundMessage,
                       timeouts: Optional[Timeouts]) -> HostAttempt:
        key = dest.key()
        refused = unsendable_attempt(message)
        if refused is not None:
            return refused
        while (proto := self._take(key)) is not None:
            result: ClientResult = await proto.send_next(message)
            if result.reset_failed:
                log.info("{id}: reusing {remote} failed at RSET; opening a new connection",
                         id=message.queue_id, remote=proto.core.remote)
                self._track(proto.quit())
                continue
            report = DeliveryReport(replies=dict(result.replies),
                                    remote=remote_name(dest, proto), details=dict(result.details))
            self._park(key, proto)
            return HostAttempt(report, result.retry_elsewhere)
        proto, attempt = await attempt_host(reactor or self.reactor, dest, message,
                                        timeouts or self.timeouts)
        if proto is not None:
            self._park(key, proto)
        return attempt

    def _take(self, key: tuple) -> Optional[OutboundProtocol]:
        entries = self._idle.get(key, [])
        while entries:
            proto, timer = entries.pop()
            if timer.active():
                timer.cancel()
            if proto.reusable:
                return proto
        self._idle.pop(key, None)
        return None

    def _park(self, key: tuple, proto: OutboundProtocol) -> None:
        fresh = time.monotonic() - proto.opened < self.max_age
        if self._closed or not (proto.reusable and proto.messages < self.max_messages
                                and fresh):
            self._track(proto.quit())
            return
        if self.idle_count() >= self.max_idle:
            self._evict_oldest()
        timer = self.reactor.callLater(self.idle_time, self._expire, key, proto)
        self._idle.setdefault(key, []).append((proto, timer))

    def _evict_oldest(self) -> None:
        entries = [(timer.getTime(), key, proto, timer)
                   for key, idle in self._idle.items() for proto, timer in idle]
        if entries:
            _, key, proto, timer = min(entries, key=lambda e: e[0])
            timer.cancel()
            self._expire(key, proto)

    def _expire(self, key: tuple, proto: OutboundProtocol) -> None:
        entries = self._idle.get(key, [])
        self._idle[key] = [(p, t) for p, t in entries if p is not proto]
        if not self._idle[key]:
            del self._idle[key]
        self._track(proto.quit())

    def _track(self, closing: defer.Deferred) -> None:
        """Remember a closing connection until it is closed (for :meth:`close`)."""
        self._closing.append(closing)
        closing.addBoth(self._untrack, closing)

    def _untrack(self, result, closing: defer.Deferred):
        if closing in self._closing:
            self._closing.remove(closing)
        return result

    async def close(self, grace: float = 10.0) -> None:
        """QUIT every idle connection and wait until all are closed.

        Deliveries still in flight get up to ``grace`` seconds to finish (the
        queue manager gives them as long at shutdown); their connections are
        then sent QUIT, not parked, and waited for too.
        """
        self._closed = True
        for entries in self._idle.values():
            for proto, timer in entries:
                if timer.active():
                    timer.cancel()
                self._track(proto.quit())
        self._idle.clear()
        if self._busy:
            drained = defer.Deferred()
            self._drained.append(drained)
            timer = self.reactor.callLater(grace, self._give_up_waiting, drained)
            await drained
            if timer.active():
                timer.cancel()
        while self._closing:
            await defer.gatherResults(list(self._closing))

    def _give_up_waiting(self, drained: defer.Deferred) -> None:
        if drained in self._drained:
            self._drained.remove(drained)
            drained.callback(None)
