# -*- test-case-name: tests.unit.test_sessions -*-
"""The live sessions of one listener, and how they end at shutdown.

Each listener's context holds a :class:`Sessions`; its protocols add
themselves when they connect and leave when the connection is lost.  At
SIGTERM the listener service stops listening and calls :meth:`Sessions.drain`:
every session is told to drain (an idle one closes at once with its
protocol's "shutting down" reply; one in a transaction finishes it and closes
at its next command), and the returned Deferred fires when the last one has
gone, or once ``grace`` seconds have passed and whatever is left has been
closed.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer

# After the grace period: how long closed sessions get to go before the
# listener counts as stopped anyway (the process exits right after).
FINAL_WAIT = 2.0


class Sessions:
    """A listener's set of live protocols and its draining state.

    A protocol offers ``drain()`` (close now if idle, else at the end of what
    it is doing) and ``shut_down()`` (close now, whatever it is doing).
    """

    def __init__(self) -> None:
        self.live: set = set()
        self.draining = False
        self._empty: Optional[defer.Deferred] = None
        self._timer = None

    def __len__(self) -> int:
        return len(self.live)

    def add(self, proto) -> None:
        self.live.add(proto)

    def discard(self, proto) -> None:
        self.live.discard(proto)
        if not self.live:
            self._done()

    def drain(self, grace: float, clock) -> defer.Deferred:
        """Drain every session; fires when none is left (at most about
        ``grace`` + :data:`FINAL_WAIT` seconds)."""
        self.draining = True
        if self._empty is None:
            self._empty = defer.Deferred()
            self._timer = clock.callLater(grace, self._expire, clock)
            for proto in list(self.live):
                proto.drain()
        if not self.live:
            self._done()
        return self._empty

    def _expire(self, clock) -> None:
        for proto in list(self.live):
            proto.shut_down()
        self._timer = clock.callLater(FINAL_WAIT, self._done) if self.live else None
        if not self.live:
            self._done()

    def _done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._empty is not None and not self._empty.called:
            self._empty.callback(None)
