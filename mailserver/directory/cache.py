# -*- test-case-name: tests.unit.test_directory_cache -*-
"""A short-lived answer cache in front of a directory.

A burst of RCPT commands for the same few addresses (a message to a team,
a mailing list fan-in, a spam run) would otherwise cost the same LDAP
searches again and again.  :class:`CachingDirectory` wraps any
:class:`~mailserver.directory.interfaces.IDirectory` and remembers:

* resolutions: an address that was found for ``positive_ttl`` seconds, an
  unknown one for ``negative_ttl`` seconds (shorter, so a newly created
  account starts receiving mail quickly);
* local-domain answers (``is_local_domain``), with the same two TTLs.

What it never remembers: failures (an outage must be retried on the next
command, and recovery must be seen at once), password checks, and the
envelope senders a login may use (both are about who someone is, and a
changed password or a revoked address must take effect immediately).

Lookups of the same key that overlap share one request to the directory.
Every caller still gets a Deferred of its own, so one caller cancelling its
lookup, or raising in its callbacks, does not disturb the others; the shared
request runs to the end and fills the cache even when every caller has gone.

Keys are case-insensitive: the wrapped directory is asked about the
lower-cased address or domain, so that the answer fits every spelling it is
reused for.  The cache holds at most ``max_entries`` answers
and drops the least recently used one first.  :meth:`CachingDirectory.clear`
forgets everything (the service calls it on SIGHUP); a request that was in
flight when ``clear`` ran still answers its callers but is not cached, since
it may have read the directory before the change that prompted the clear.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Tuple

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver.directory.interfaces import IDirectory

_MISS = object()


class TTLCache:
    """A bounded map whose entries expire; least recently used goes first.

    ``now`` is passed in by the caller, so the cache itself knows no clock.
    """

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self.max_entries = max_entries
        self._entries: "OrderedDict[Hashable, Tuple[float, object]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float, default=None):
        """The live value for ``key``, or ``default``; an expired entry is dropped."""
        item = self._entries.get(key)
        if item is None:
            return default
        expires, value = item
        if now >= expires:
            del self._entries[key]
            return default
        self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: object, ttl: float, now: float) -> None:
        """Keep ``value`` until ``now + ttl``; a TTL of 0 or less stores nothing."""
        if ttl <= 0 or self.max_entries == 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = (now + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


class _Flight:
    """One request to the wrapped directory and the callers waiting for it."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.waiters: List[defer.Deferred] = []

    def join(self) -> defer.Deferred:
        """A new Deferred for one caller; cancelling it only drops that caller."""
        waiter = defer.Deferred(canceller=self._leave)
        self.waiters.append(waiter)
        return waiter

    def _leave(self, waiter: defer.Deferred) -> None:
        # Deferred.cancel errbacks the waiter with CancelledError after this.
        if waiter in self.waiters:
            self.waiters.remove(waiter)

    def land(self, result) -> None:
        """Give ``result`` (a value or a Failure) to every caller still waiting."""
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


@implementer(IDirectory)
class CachingDirectory:
    """An :class:`IDirectory` that caches another one's answers (see module doc).

    ``clock`` provides ``seconds()`` (an ``IReactorTime``); None means the
    global reactor, looked up at each call, never at import.  A TTL of 0
    disables that kind of caching while keeping overlapping lookups shared.

    Counters for tests and benchmarks: ``hits`` (answered from the cache),
    ``misses`` (sent to the directory) and ``joined`` (waited for a request
    already in flight).
    """

    def __init__(self, directory, *, clock=None, positive_ttl: float = 60.0,
                 negative_ttl: float = 10.0, max_entries: int = 10000,
                 metrics=None) -> None:
        if positive_ttl < 0 or negative_ttl < 0:
            raise ValueError("cache TTLs must not be negative")
        self.directory = directory
        self.positive_ttl = float(positive_ttl)
        self.negative_ttl = float(negative_ttl)
        self._clock = clock
        self._cache = TTLCache(max_entries)
        self._flights: Dict[Hashable, _Flight] = {}
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.joined = 0
        from mailserver.metrics import NO_METRICS

        # Requests that reach the wrapped directory: count, errors, latency.
        self.metrics = metrics or NO_METRICS

    def __len__(self) -> int:
        return len(self._cache)

    def _now(self) -> float:
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor as clock  # at call time
        return clock.seconds()

    # -- IDirectory -------------------------------------------------------

    def resolve(self, address: str) -> defer.Deferred:
        """The wrapped directory's resolution of ``address``, cached."""
        address = address.strip().lower()
        return self._lookup(("resolve", address), lambda: self.directory.resolve(address),
                            lambda resolution: resolution.found)

    def is_local_domain(self, domain: str) -> defer.Deferred:
        """Whether mail for ``domain`` is delivered here, cached.

        Works once the wrapped directory has ``is_local_domain``; until then
        the Deferred fails with NotImplementedError.
        """
        wrapped = getattr(self.directory, "is_local_domain", None)
        if wrapped is None:
            return defer.fail(NotImplementedError(
                f"{type(self.directory).__name__} has no is_local_domain"))
        domain = domain.strip().lower().rstrip(".")
        return self._lookup(("domain", domain), lambda: wrapped(domain), bool)

    def senders_for(self, login: str) -> defer.Deferred:
        """The envelope senders ``login`` may use (a frozenset), cached like
        a resolution: a login is one directory search, not one per session
        (mail clients reconnect often), and a change of aliases or groups
        reaches sending rights within ``positive_ttl``, as it reaches delivery."""
        wrapped = getattr(self.directory, "senders_for", None)
        if wrapped is None:
            return defer.fail(NotImplementedError(
                f"{type(self.directory).__name__} has no senders_for"))
        return self._lookup(("senders", login),
                            lambda: defer.maybeDeferred(wrapped, login).addCallback(frozenset),
                            bool)

    def authenticate(self, login: str, password: str) -> defer.Deferred:
        """A password check; never cached, never shared."""
        return self._timed("authenticate", defer.maybeDeferred(self.directory.authenticate,
                                                              login, password))

    def _timed(self, kind: str, d: defer.Deferred) -> defer.Deferred:
        """Report how long the wrapped directory took with ``d``, and whether
        it failed (a wrong password is an answer, not an error)."""
        if not self.metrics.enabled:
            return d
        started = self._now()

        def done(result):
            from twisted.cred.error import UnauthorizedLogin

            error = isinstance(result, Failure) and not result.check(UnauthorizedLogin)
            self.metrics.directory_lookup(kind, self._now() - started, error)
            return result

        return d.addBoth(done)

    def close(self) -> None:
        self.clear()
        self.directory.close()

    # -- the cache --------------------------------------------------------

    def clear(self) -> None:
        """Forget every cached answer; requests in flight will not be cached."""
        self._cache.clear()
        self._flights.clear()
        self._generation += 1

    def _lookup(self, key: Hashable, ask: Callable[[], defer.Deferred],
                positive: Callable[[object], bool]) -> defer.Deferred:
        value = self._cache.get(key, self._now(), _MISS)
        if value is not _MISS:
            self.hits += 1
            return defer.succeed(value)
        flight = self._flights.get(key)
        if flight is not None:
            self.joined += 1
            return flight.join()
        self.misses += 1
        flight = self._flights[key] = _Flight(self._generation)
        waiter = flight.join()  # before asking: the answer may come at once
        d = self._timed(key[0], defer.maybeDeferred(ask))
        d.addBoth(self._landed, key, flight, positive)
        return waiter

    def _landed(self, result, key: Hashable, flight: _Flight,
                positive: Callable[[object], bool]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not isinstance(result, Failure) and flight.generation == self._generation:
            ttl = self.positive_ttl if positive(result) else self.negative_ttl
            self._cache.put(key, result, ttl, self._now())
        flight.land(result)
        return None  # the failure, if any, now belongs to the waiters
