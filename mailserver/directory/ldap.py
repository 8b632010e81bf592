# -*- test-case-name: tests.unit.test_directory_ldif,tests.integration.test_directory_slapd -*-
"""The LDAP directory: address resolution and password checks over ldap3.

:class:`LDAPDirectory` implements :class:`~mailserver.directory.interfaces.IDirectory`.
The same class serves both backends: a network connector talks to real
servers (``LDAPSettings.uris``, tried in order), and the embedded connector in
:mod:`mailserver.directory.ldif` talks to ldap3's in-process MOCK server
loaded from an LDIF file.  Filters, attributes and expansion rules are the
same for both, so the quick start runs the production lookup code.

Threads.  ldap3 blocks, so every call runs on a bounded
:class:`~twisted.python.threadpool.ThreadPool` (``pool_size`` threads) via
``deferToThreadPool``; nothing here touches LDAP on the reactor thread.
Each pool thread owns one plain SYNC connection (kept in a
``threading.local``), which is simpler to reason about than one SAFE_SYNC
connection shared by all threads: no request multiplexing, and a broken
connection is replaced by the thread that noticed.  A search that fails on
a connection-level error is retried once on a fresh connection; a second
failure, or any other ldap3 error, becomes
:class:`~mailserver.errors.DirectoryUnavailable`.

The ``*_sync`` methods are the blocking implementations; tools that run
outside the reactor (``mailserverctl``) may call them directly.
"""

from __future__ import annotations

import math
import ssl
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ldap3 import DEREF_NEVER, LEVEL, NONE, SUBTREE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import (
    LDAPCertificateError,
    LDAPCommunicationError,
    LDAPException,
    LDAPMaximumRetriesError,
    LDAPResponseTimeoutError,
    LDAPServerPoolExhaustedError,
)
from twisted.internet.threads import deferToThreadPool
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailserver.directory.interfaces import Account, IDirectory, Resolution
from mailserver.directory.resolution import Entry, Expansion, first_address
from mailserver.directory.schema import SchemaMapping, build_mapping, render_filter
from mailserver.errors import DirectoryUnavailable

log = Logger()

#: Errors meaning "this connection (or server) is gone": retry once, fresh.
CONNECTION_ERRORS = (
    LDAPCommunicationError,  # socket open/send/receive, session terminated
    LDAPResponseTimeoutError,
    LDAPServerPoolExhaustedError,
    LDAPMaximumRetriesError,
    LDAPCertificateError,  # this server's certificate; the next may be fine
    OSError,  # ssl.SSLError included
)

#: Result codes that say the server cannot answer now, not "no".
TEMPORARY_RESULTS = frozenset({
    3,   # timeLimitExceeded
    11,  # adminLimitExceeded
    51,  # busy
    52,  # unavailable
    80,  # other (OpenLDAP's internal errors)
})

_SUCCESS, _SIZE_LIMIT, _NO_SUCH_OBJECT, _INVALID_DN_SYNTAX = 0, 4, 32, 34
_SCOPES = {"subtree": SUBTREE, "one": LEVEL}


def _as_tuple(value) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


@dataclass(frozen=True)
class LDAPSettings:
    """Everything the directory needs; the config's ``[directory]`` table maps
    onto these fields one to one (``backend`` and ``ldif_file`` choose the
    connector and stay in the config).

    The mapping fields (``address_filter`` ... ``member_attributes``) override
    the preset named by ``schema`` one at a time; empty means "the preset's".
    """

    #: LDAP server URIs (``ldap://host:port``, ``ldaps://...``), tried in order.
    uris: Tuple[str, ...] = ()
    #: Search base for every lookup; the embedded backend defaults it to the
    #: first entry of the LDIF file.
    base_dn: str = ""
    #: PEM CA bundle that signs the servers' certificates, for ``ldaps://``;
    #: empty means the system's CAs.  Certificates are always verified.
    tls_ca_file: str = ""
    #: Service account used for searches; empty means anonymous.
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    #: ``subtree`` or ``one`` (one level below ``base_dn``).
    scope: str = "subtree"
    #: Preset schema mapping (see :mod:`mailserver.directory.schema`).
    schema: str = "openldap"
    address_filter: str = ""
    login_filter: str = ""
    entry_filter: str = ""
    mail_attribute: str = ""
    address_attributes: Tuple[str, ...] = ()
    login_attribute: str = ""
    target_attributes: Tuple[str, ...] = ()
    group_classes: Tuple[str, ...] = ()
    member_attributes: Tuple[str, ...] = ()
    #: Domains delivered here; routing targets elsewhere become forwards.
    #: Not part of ``[directory]``: the service copies ``[domains] local``.
    #: Empty means every domain counts as local (nothing is ever forwarded).
    local_domains: Tuple[str, ...] = ()
    #: Seconds to open a TCP connection to one server.
    connect_timeout: float = 5.0
    #: Seconds to wait for one answer (socket receive and server time limit).
    operation_timeout: float = 10.0
    #: Threads, hence at most this many connections.
    pool_size: int = 4
    #: Alias/group nesting deeper than this is not followed.
    max_depth: int = 10
    #: Entries read while resolving one address, at most.
    max_expansions: int = 1000

    def __post_init__(self) -> None:
        for name in ("uris", "address_attributes", "target_attributes", "group_classes",
                     "member_attributes"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        domains = tuple(d.lower().rstrip(".") for d in _as_tuple(self.local_domains))
        object.__setattr__(self, "local_domains", domains)
        if self.scope not in _SCOPES:
            raise ValueError(f"scope must be one of {', '.join(_SCOPES)}, not {self.scope!r}")
        for name in ("connect_timeout", "operation_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("pool_size", "max_depth", "max_expansions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        self.schema_mapping()  # raises ValueError on a bad preset or filter

    def schema_mapping(self) -> SchemaMapping:
        """The preset with this settings' overrides applied."""
        return build_mapping(
            self.schema,
            address_filter=self.address_filter,
            login_filter=self.login_filter,
            entry_filter=self.entry_filter,
            mail_attribute=self.mail_attribute,
            address_attributes=self.address_attributes,
            login_attribute=self.login_attribute,
            target_attributes=self.target_attributes,
            group_classes=self.group_classes,
            member_attributes=self.member_attributes,
        )


class NetworkConnector:
    """Opens ldap3 connections to real servers, in ``uris`` order (failover)."""

    def __init__(self, settings: LDAPSettings) -> None:
        if not settings.uris:
            raise ValueError("the LDAP backend needs at least one URI")
        self._settings = settings
        self._tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.tls_ca_file or None)

    def describe(self) -> str:
        return ", ".join(self._settings.uris)

    def _connection(self, server: Server, user: Optional[str], password: Optional[str]):
        return Connection(
            server, user=user, password=password, client_strategy=SYNC,
            raise_exceptions=False, read_only=True, auto_referrals=False,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds.
            receive_timeout=max(1, math.ceil(self._settings.operation_timeout)),
        )

    def _each_server(self, attempt: Callable[[Server], object]):
        last: Optional[BaseException] = None
        for uri in self._settings.uris:
            # A new Server each time: ldap3 remembers a failed address and
            # skips it for a few seconds, which would delay recovery.
            server = Server(uri, get_info=NONE, connect_timeout=self._settings.connect_timeout,
                            tls=self._tls)
            try:
                return attempt(server)
            except CONNECTION_ERRORS as e:
                last = e
                log.warn("LDAP server {server} unreachable: {error}", server=server.name, error=e)
        assert last is not None
        raise last

    def open(self) -> Connection:
        """A connection bound as the service account (or anonymous)."""
        s = self._settings

        def attempt(server: Server) -> Connection:
            conn = self._connection(server, s.bind_dn or None, s.bind_password or None)
            try:
                conn.open(read_server_info=False)
                if s.bind_dn and not conn.bind(read_server_info=False):
                    raise DirectoryUnavailable(
                        f"service bind as {s.bind_dn} refused: {conn.result.get('description')}"
                    )
            except BaseException:
                _unbind_quietly(conn)
                raise
            return conn

        return self._each_server(attempt)

    def check_password(self, dn: str, password: str) -> bool:
        """Bind as ``dn`` on a connection of its own; True when accepted."""

        def attempt(server: Server) -> bool:
            conn = self._connection(server, dn, password)
            try:
                conn.open(read_server_info=False)
                ok = conn.bind(read_server_info=False)
                code = (conn.result or {}).get("result")
            finally:
                _unbind_quietly(conn)
            if ok:
                return True
            if code in TEMPORARY_RESULTS:
                raise DirectoryUnavailable(f"bind as {dn}: result {code}")
            return False

        return self._each_server(attempt)


def _unbind_quietly(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # a dead socket cannot be unbound politely
        pass


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

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._own_pool:
            self._pool.stop()
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            _unbind_quietly(conn)

    # -- blocking implementations ----------------------------------------

    def resolve_sync(self, address: str) -> Resolution:
        """Blocking :meth:`resolve`; never call it on the reactor thread."""
        return Expansion(address.strip().lower(), self.search, self.mapping,
                         self.settings).run()

    def authenticate_sync(self, login: str, password: str) -> Optional[Account]:
        """Blocking :meth:`authenticate`: search, require one entry, bind as it."""
        if not password or not login:
            return None
        m = self.mapping
        entries, truncated = self.search(
            render_filter(m.login_filter, login=login), size_limit=2,
            attributes=(m.login_attribute, m.mail_attribute, *m.address_attributes),
        )
        if truncated or len(entries) != 1:
            return None
        entry = entries[0]
        if not self._guard(lambda: self._connector.check_password(entry.dn, password)):
            return None
        address = (entry.first(m.mail_attribute) or first_address(entry, m)).lower()
        return Account(login=entry.first(m.login_attribute) or login, address=address, dn=entry.dn)

    def search(self, search_filter: str, *, base: Optional[str] = None, base_scope: bool = False,
               attributes: Sequence[str] = (), size_limit: int = 0) -> Tuple[List[Entry], bool]:
        """Run one search; returns (entries, truncated by a size limit).

        With ``base_scope`` the search reads the single entry ``base`` and a
        missing entry is an empty answer; otherwise a missing search base is a
        configuration or server problem and raises DirectoryUnavailable.
        """
        s = self.settings
        scope = 0 if base_scope else _SCOPES[s.scope]  # 0 is ldap3's BASE
        base = base if base is not None else s.base_dn

        def operation(conn: Connection):
            conn.search(base, search_filter, scope, dereference_aliases=DEREF_NEVER,
                        attributes=list(attributes) or None, size_limit=size_limit,
                        time_limit=max(1, math.ceil(s.operation_timeout)))
            return conn.result or {}, list(conn.response or [])

        result, response = self._call(operation)
        code = result.get("result")
        if code in (_NO_SUCH_OBJECT, _INVALID_DN_SYNTAX) and base_scope:
            return [], False
        if code not in (_SUCCESS, _SIZE_LIMIT):
            raise DirectoryUnavailable(
                f"search {search_filter} under {base!r}: result {code} {result.get('description')}"
            )
        entries = [_entry(item) for item in response if item.get("type") == "searchResEntry"]
        return entries, code == _SIZE_LIMIT

    # -- connections ------------------------------------------------------

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
        """Run ``operation(conn)`` on this thread's connection, retrying once
        on a fresh connection when the kept one turns out to be dead."""
        if self._closed:
            raise DirectoryUnavailable("directory is closed")
        for _attempt in range(2):
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if fresh:
                conn = self._guard(self._connector.open)
                self._local.conn = conn
                with self._lock:
                    self._connections.add(conn)
            try:
                return operation(conn)
            except CONNECTION_ERRORS as e:
                self._discard(conn)
                if fresh:
                    log.warn("directory unavailable: {error!r}", error=e)
                    raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
            except LDAPException as e:
                log.warn("directory error: {error!r}", error=e)
                raise DirectoryUnavailable(f"{type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")  # the second attempt is always fresh

    def _discard(self, conn: Connection) -> None:
        self._local.conn = None
        with self._lock:
            self._connections.discard(conn)
        _unbind_quietly(conn)


def _entry(item: dict) -> Entry:
    attributes: Dict[str, List[str]] = {}
    for name, values in (item.get("raw_attributes") or {}).items():
        decoded = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                   for v in values]
        attributes.setdefault(name.lower(), []).extend(decoded)
    return Entry(dn=item["dn"], attributes=attributes)
