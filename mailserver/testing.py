"""Test doubles shipped with the product (after treq.testing).

:class:`FakeDirectory` is an in-memory :class:`~mailserver.directory.interfaces.IDirectory`
whose answers a test controls: fixed entries, an outage switch, and a "slow"
mode that hands back Deferreds the test fires in any order it likes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from twisted.internet import defer
from zope.interface import implementer

from mailserver.directory.interfaces import (
    Account, IDirectory, Mailbox, Resolution, SenderRestriction,
)
from mailserver.errors import DirectoryUnavailable


@implementer(IDirectory)
class FakeDirectory:
    """Addresses map to mailboxes (targets in ``local_domains``) and forwards
    (other targets); ``down`` makes every call fail temporarily."""

    def __init__(self, entries: Optional[Dict[str, Tuple[str, ...]]] = None,
                 passwords: Optional[Dict[str, str]] = None,
                 local_domains: Tuple[str, ...] = ("example.test",)) -> None:
        self.local_domains = frozenset(local_domains)
        self.disabled: set = set()  # addresses of disabled accounts
        self.restricted: Dict[str, SenderRestriction] = {}
        # address -> addresses of the mailboxes it reaches
        self.entries = {k.lower(): tuple(v) for k, v in (entries or {}).items()}
        self.passwords = dict(passwords or {})
        self.down = False
        self.slow = False
        self.pending: List[Tuple[str, defer.Deferred]] = []
        self.calls: List[Tuple[str, str]] = []

    def _answer(self, address: str) -> Resolution:
        if address.lower() in self.disabled:
            return Resolution(address=address, disabled=True)
        targets = self.entries.get(address.lower())
        if targets is None:
            return Resolution(address=address)
        local = [t for t in targets if "@" not in t or t.rpartition("@")[2] in self.local_domains]
        return Resolution(
            address=address,
            mailboxes=tuple(Mailbox(address=t, login=t.split("@")[0]) for t in local),
            forwards=tuple(t for t in targets if t not in local),
            restriction=self.restricted.get(address.lower()),
        )

    def resolve(self, address: str) -> defer.Deferred:
        self.calls.append(("resolve", address))
        if self.slow:
            d = defer.Deferred()
            self.pending.append((address, d))
            return d
        if self.down:
            return defer.fail(DirectoryUnavailable("fake outage"))
        return defer.succeed(self._answer(address))

    def release(self, index: int) -> None:
        """Answer the ``index``-th pending slow lookup."""
        address, d = self.pending[index]
        d.callback(self._answer(address))

    def is_local_domain(self, domain: str) -> defer.Deferred:
        if self.down:
            return defer.fail(DirectoryUnavailable("fake outage"))
        return defer.succeed(domain.lower() in self.local_domains)

    def senders_for(self, login: str) -> defer.Deferred:
        if self.down:
            return defer.fail(DirectoryUnavailable("fake outage"))
        return defer.succeed(frozenset(a for a, t in self.entries.items() if t == (login,)))

    def authenticate(self, login: str, password: str) -> defer.Deferred:
        self.calls.append(("authenticate", login))
        if self.down:
            return defer.fail(DirectoryUnavailable("fake outage"))
        if password and self.passwords.get(login) == password:
            return defer.succeed(Account(login=login, address=login))
        return defer.succeed(None)

    def close(self) -> None:
        pass


class SynchronousThreadPool:
    """A stand-in for ``ThreadPool`` that runs the work at once, in this thread."""

    def callInThreadWithCallback(self, onResult, func, *args, **kw):
        from twisted.python.failure import Failure

        try:
            result = func(*args, **kw)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)

    joined = False

    def callInThread(self, func, *args, **kw) -> None:
        func(*args, **kw)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class ImmediateReactor:
    """Just enough reactor for ``deferToThreadPool`` with the pool above."""

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


class RecordingOutbox:
    """An outbox that records what would be queued; ``fail`` makes it refuse."""

    def __init__(self) -> None:
        self.queued: list = []
        self.flushed: list = []
        self.fail: Optional[BaseException] = None

    def enqueue(self, **kw) -> defer.Deferred:
        if self.fail is not None:
            return defer.fail(self.fail)
        with open(kw["source_path"], "rb") as f:
            kw["content"] = kw["prefix"] + f.read()
        self.queued.append(kw)
        return defer.succeed(kw.get("queue_id") or "QUEUED")

    def flush(self, domain=None) -> defer.Deferred:
        self.flushed.append(domain)
        return defer.succeed(["ONE"] if domain == "example.org" else [])
