# -*- test-case-name: tests.unit.test_directory_ldif,tests.integration.test_directory_slapd -*-
"""The LDAP directory: address resolution and password checks over ldap3.

:class:`LDAPDirectory` implements :class:`~mailserver.directory.interfaces.IDirectory`.
The same class serves both backends: a network connector
(:mod:`mailserver.directory.connect`) talks to real servers
(``LDAPSettings.uris``, tried in order), and the embedded connector in
:mod:`mailserver.directory.ldif` talks to ldap3's in-process MOCK server
loaded from an LDIF file.  Filters, attributes and expansion rules are the
same for both, so the quick start runs the production lookup code.

Threads.  ldap3 blocks, so every call runs on a bounded
:class:`~twisted.python.threadpool.ThreadPool` (``pool_size`` threads) via
``deferToThreadPool``; nothing here touches LDAP on the reactor thread.
Each pool thread owns one plain SYNC connection (kept in a
``threading.local``), which is simpler to reason about than one SAFE_SYNC
connection shared by all threads: no request multiplexing, and a broken
connection is replaced by the thread that noticed.

Retries.  A kept connection that was dropped (a server restart, an idle
connection closed by the server) is replaced once, silently.  A server that
did not answer in time, or answered that it cannot serve, is given up on for
the rest of the operation, which moves to the next server not yet given up
on; with one URI, or once every URI failed, the operation fails at once, so
a hung server costs one timeout, not a second one for the bind on a fresh
connection to it.  Those failures, and any other ldap3 error, become
:class:`~mailserver.errors.DirectoryUnavailable`.

The ``*_sync`` methods are the blocking implementations; tools that run
outside the reactor (``mailserverctl``) may call them directly.
"""

from __future__ import annotations

import math
import threading
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from ldap3 import DEREF_NEVER, LEVEL, SUBTREE, Connection
from ldap3.core.exceptions import LDAPException
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailserver.directory import accounts
from mailserver.directory.connect import (  # noqa: F401  (re-exported)
    CONNECTION_ERRORS,
    SERVER_FAULTS,
    UNFIT_RESULTS,
    NetworkConnector,
    ServerUnfit,
    unbind_quietly,
)
from mailserver.directory.entries import Entry, first_address, is_disabled
from mailserver.directory.interfaces import Account, IDirectory, Resolution
from mailserver.directory.reader import Reader
from mailserver.directory.resolution import Expansion
from mailserver.directory.schema import render_filter
from mailserver.directory.settings import LDAPSettings  # noqa: F401  (re-exported)
from mailserver.errors import DirectoryUnavailable

log = Logger()

_SUCCESS, _SIZE_LIMIT, _REFERRAL, _NO_SUCH_OBJECT, _INVALID_DN_SYNTAX = 0, 4, 10, 32, 34
_SCOPES = {"subtree": SUBTREE, "one": LEVEL}


@implementer(IDirectory)
class LDAPDirectory:
    """Resolve addresses and check passwords against an LDAP directory.

    ``reactor`` receives results from the pool threads (default: the global
    reactor, looked up at call time).  ``threadpool`` may be shared; when it
    is None the directory starts its own of ``pool_size`` threads and
    :meth:`close` stops it.  ``connector`` opens connections; the default
    talks to ``settings.uris``.
    """

    def __init__(self, settings: LDAPSettings, *, reactor=None, threadpool=None,
                 connector=None) -> None:
        self.settings = settings
        self.mapping = settings.schema_mapping()
        self._connector = connector if connector is not None else NetworkConnector(settings)
        self._reactor = reactor
        self._own_pool = threadpool is None
        if threadpool is None:
            threadpool = ThreadPool(minthreads=0, maxthreads=settings.pool_size, name="ldap")
            threadpool.start()
        self._pool = threadpool
        self._local = threading.local()
        self._connections: set = set()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections currently kept by pool threads (one per thread at most)."""
        with self._lock:
            return len(self._connections)

    # -- IDirectory -------------------------------------------------------

    def resolve(self, address: str):
        return self._defer(self.resolve_sync, address)

    def authenticate(self, login: str, password: str):
        if not password or not login:
            return defer.succeed(None)
        return self._defer(self.authenticate_sync, login, password)

    def is_local_domain(self, domain: str):
        domain = _domain(domain)
        if domain in self.settings.local_domains:
            return defer.succeed(True)
        if not self.settings.domain_filter or not domain:
            return defer.succeed(False)
        return self._defer(self.is_local_domain_sync, domain)

    def senders_for(self, login: str):
        if not login:
            return defer.succeed(frozenset())
        return self._defer(self.senders_for_sync, login)

    def close(self) -> None:
        """Refuse new calls and unbind the kept connections.  Unbinding waits
        for a search in flight on that connection, so it happens on a pool
        thread, never on the caller's (the reactor's)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections, self._connections = self._connections, set()

        def unbind_all():
            for conn in connections:
                unbind_quietly(conn)

        if self._pool.joined:  # the pool stopped first: nothing can be in flight
            unbind_all()
        else:
            self._pool.callInThread(unbind_all)
        if self._own_pool:
            self._pool.stop()

    # -- blocking implementations ----------------------------------------

    def resolve_sync(self, address: str) -> Resolution:
        """Blocking :meth:`resolve`; never call it on the reactor thread."""
        address = address.strip().lower()
        if has_controls(address):
            return Resolution(address=address,
                              trace=(f"{address!r}: control characters, not looked up",))
        is_local = self.is_local_domain_sync if self.settings.domain_filter else None
        return Expansion(address, self.search, self.mapping,
                         self.settings, is_local=is_local).run()

    def authenticate_sync(self, login: str, password: str) -> Optional[Account]:
        """Blocking :meth:`authenticate`: search, require one enabled entry,
        bind as it."""
        if not password or not login or has_controls(login):
            return None
        m = self.mapping
        entry = accounts.find_account(self._reader(login), login)
        if entry is None or is_disabled(entry, m):
            return None
        if not self._guard(lambda: self._connector.check_password(entry.dn, password)):
            return None
        return Account(login=entry.first(m.login_attribute) or login,
                       address=first_address(entry, m), dn=entry.dn)

    def is_local_domain_sync(self, domain: str) -> bool:
        """Blocking :meth:`is_local_domain`."""
        s = self.settings
        domain = _domain(domain)
        if domain in s.local_domains:
            return True
        if not s.domain_filter or not domain or has_controls(domain):
            return False
        entries, truncated = self.search(render_filter(s.domain_filter, domain=domain),
                                         base=s.domain_base_dn or None, size_limit=1,
                                         attributes=("objectClass",))
        return bool(entries) or truncated

    def senders_for_sync(self, login: str) -> FrozenSet[str]:
        """Blocking :meth:`senders_for`."""
        if not login or has_controls(login):
            return frozenset()
        return accounts.senders_for(self._reader(login), login)

    def search(self, search_filter: str, *, base: Optional[str] = None, base_scope: bool = False,
               attributes: Sequence[str] = (), size_limit: int = 0) -> Tuple[List[Entry], bool]:
        """Run one search; returns (entries, truncated by a size limit).

        With ``base_scope`` the search reads the single entry ``base`` and a
        missing entry (or one held elsewhere: a referral, as for a group member
        in another domain of a forest) is an empty answer; otherwise a missing
        search base is a configuration or server problem and raises
        DirectoryUnavailable, after the other servers were tried.
        """
        s = self.settings
        scope = 0 if base_scope else _SCOPES[s.scope]  # 0 is ldap3's BASE
        base = base if base is not None else s.base_dn

        def operation(conn: Connection):
            conn.search(base, search_filter, scope, dereference_aliases=DEREF_NEVER,
                        attributes=list(attributes) or None, size_limit=size_limit,
                        time_limit=max(1, math.ceil(s.operation_timeout)))
            result = conn.result or {}
            code = result.get("result")
            if code in UNFIT_RESULTS or (code == _NO_SUCH_OBJECT and not base_scope):
                raise ServerUnfit(f"search {search_filter} under {base!r}: "
                                  f"result {code} {result.get('description')}")
            return result, list(conn.response or [])

        result, response = self._call(operation)
        code = result.get("result")
        if code in (_NO_SUCH_OBJECT, _INVALID_DN_SYNTAX, _REFERRAL) and base_scope:
            return [], False
        if code not in (_SUCCESS, _SIZE_LIMIT):
            raise DirectoryUnavailable(
                f"search {search_filter} under {base!r}: result {code} {result.get('description')}"
            )
        entries = [_entry(item) for item in response if item.get("type") == "searchResEntry"]
        return entries, code == _SIZE_LIMIT

    # -- connections ------------------------------------------------------

    def _reader(self, subject: str) -> Reader:
        return Reader(self.search, self.mapping, self.settings, subject=subject)

    def _defer(self, function, *args):
        if self._closed:
            return defer.fail(DirectoryUnavailable("directory is closed"))
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # at call time, never at import
        return deferToThreadPool(reactor, self._pool, function, *args)

    def _guard(self, function):
        """Run ``function``; ldap3 and socket errors become DirectoryUnavailable."""
        try:
            return function()
        except DirectoryUnavailable:
            raise
        except (LDAPException, OSError) as e:
            log.warn("directory unavailable: {error!r}", error=e)
            raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e

    def _call(self, operation):
        """Run ``operation(conn)`` on this thread's connection.

        When it fails on a connection error or an unfit server, the
        connection is dropped.  A kept connection that was merely dropped is
        replaced, on any server.  A server that failed on a fresh connection,
        or that timed out or was unfit (:data:`SERVER_FAULTS`), is given up
        on for this operation, which is retried on a server not given up on
        yet, or fails once every server was given up on: never a second
        connection to a server that just failed.
        """
        failed: Set[object] = set()  # servers given up on in this operation
        while True:
            if self._closed:
                raise DirectoryUnavailable("directory is closed")
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if fresh:
                conn = self._keep(self._guard(lambda: self._connector.open(failed)))
            try:
                return operation(conn)
            except CONNECTION_ERRORS + (ServerUnfit,) as e:
                self._discard(conn)
                self._connector.server_failed(conn, e)
                if fresh or isinstance(e, SERVER_FAULTS):
                    # A connector that does not name its servers: count connections.
                    failed.add(getattr(conn, "mailserver_uri", None) or object())
                if len(failed) >= self._connector.server_count:
                    log.warn("directory unavailable: {error}", error=e)
                    raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
            except LDAPException as e:
                log.warn("directory error: {error!r}", error=e)
                raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e

    def _keep(self, conn: Connection) -> Connection:
        """Make ``conn`` this thread's connection, unless the directory closed
        meanwhile (then nobody would ever unbind it)."""
        with self._lock:
            if not self._closed:
                self._connections.add(conn)
                self._local.conn = conn
                return conn
        unbind_quietly(conn)
        raise DirectoryUnavailable("directory is closed")

    def _discard(self, conn: Connection) -> None:
        self._local.conn = None
        with self._lock:
            self._connections.discard(conn)
        unbind_quietly(conn)


def has_controls(text: str) -> bool:
    """True when ``text`` holds a control character (NUL included).

    Such a value is never looked up: escaping keeps it out of the filter's
    syntax, but OpenLDAP compares IA5 strings such as ``mail`` as C strings,
    so ``(mail=alice@example.test\\00junk)`` matches alice.
    """
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _domain(domain: str) -> str:
    return domain.strip().lower().rstrip(".")


def _entry(item: dict) -> Entry:
    """An :class:`Entry` from an ldap3 response item.

    Active Directory answers with at most 1500 values of a large attribute
    (``member`` of a big group), named ``member;range=0-1499``.  Those values
    count as ``member``; the rest are not fetched (a warning says so), so
    groups that large need ``nested_groups = "in_chain"``, which never reads
    ``member``.
    """
    attributes: Dict[str, List[str]] = {}
    for name, values in (item.get("raw_attributes") or {}).items():
        decoded = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                   for v in values]
        base, _, option = name.partition(";")
        if option.lower().startswith("range="):
            log.warn("directory: {dn} has more {attribute} values than one answer holds; "
                     "only the first {count} are used", dn=item.get("dn"), attribute=base,
                     count=len(decoded))
            name = base
        attributes.setdefault(name.lower(), []).extend(decoded)
    return Entry(dn=item["dn"], attributes=attributes)
