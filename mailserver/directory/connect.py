# -*- test-case-name: tests.integration.test_directory_slapd,tests.integration.test_directory_tls -*-
"""Connections to real LDAP servers: failover, TLS, binds.

:class:`NetworkConnector` opens ldap3 connections to ``LDAPSettings.uris``
in order, moving to the next URI when one cannot be reached.  Transport
security comes in three forms, all verifying the server's certificate and
host name against ``tls_ca_file`` (or the system's CAs):

* ``ldaps://`` URIs speak TLS from the first byte;
* with ``starttls = true``, ``ldap://`` connections send the StartTLS
  extended operation first and bind or search only once it succeeded; a
  server that refuses it counts as unreachable (never as a reason to go on
  in clear text);
* ``tls_cert_file``/``tls_key_file`` present a client certificate to
  servers that ask for one.

Password checks bind on a connection of their own, secured the same way,
so a user's password never travels where the service account's would not.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from typing import Callable, Dict, List, Optional, Set

from ldap3 import NONE, SYNC, Connection, Server, Tls
from ldap3.core.exceptions import (
    LDAPCertificateError,
    LDAPCommunicationError,
    LDAPMaximumRetriesError,
    LDAPResponseTimeoutError,
    LDAPSASLPrepError,
    LDAPServerPoolExhaustedError,
    LDAPStartTLSError,
)
from twisted.logger import Logger

from mailserver.directory.settings import LDAPSettings
from mailserver.errors import DirectoryUnavailable

log = Logger()

#: Errors meaning "this connection (or server) is gone": retry once, fresh.
CONNECTION_ERRORS = (
    LDAPCommunicationError,  # socket open/send/receive, session terminated
    LDAPResponseTimeoutError,
    LDAPSASLPrepError,
    LDAPServerPoolExhaustedError,
    LDAPMaximumRetriesError,
    LDAPCertificateError,  # this server's certificate; the next may be fine
    LDAPStartTLSError,  # this server refused or botched StartTLS
    OSError,  # ssl.SSLError included
)

#: Search results that say "this server cannot answer now" (busy,
#: unavailable, timeLimitExceeded, other): the next server may.
UNFIT_RESULTS = frozenset({3, 51, 52, 80})

#: Seconds a failed server stays at the back of the list.
RETRY_AFTER = 30.0


class ServerUnfit(Exception):
    """The server answered, but not usefully (see :data:`UNFIT_RESULTS`)."""


#: Errors meaning "the server, not the connection, failed": it did not answer
#: in time (ldap3 raises its receive error merged with the socket's
#: ``TimeoutError`` when ``receive_timeout`` expires), or answered that it
#: cannot serve.  A fresh connection to the same server would wait, or be
#: refused, again.
SERVER_FAULTS = (TimeoutError, LDAPResponseTimeoutError, ServerUnfit)


#: Bind results that mean "not with this password": a wrong password, an
#: entry that cannot bind.  Any other failure (busy, unavailable,
#: confidentialityRequired, strongerAuthRequired, protocol errors) says the
#: server could not judge the password, which is temporary, never "wrong".
REFUSED_BIND_RESULTS = frozenset({
    32,  # noSuchObject: the entry went away between search and bind
    34,  # invalidDNSyntax
    48,  # inappropriateAuthentication
    49,  # invalidCredentials (AD adds a sub-code for expired or locked accounts)
    50,  # insufficientAccessRights
    53,  # unwillingToPerform
})


def make_tls(settings: LDAPSettings) -> Tls:
    """ldap3 TLS options: verification always required."""
    return Tls(
        validate=ssl.CERT_REQUIRED,
        ca_certs_file=settings.tls_ca_file or None,
        local_certificate_file=settings.tls_cert_file or None,
        local_private_key_file=settings.tls_key_file or None,  # None: in the cert file
        version=None,  # the ssl module's defaults: TLS 1.2 or later
    )


def unbind_quietly(conn: Connection) -> None:
    try:
        conn.unbind()
    except Exception:  # a dead socket cannot be unbound politely
        pass


class Connector:
    """What :class:`~mailserver.directory.ldap.LDAPDirectory` needs from a
    connector: ``open(failed)`` a connection for searches, ``check_password(dn,
    password)``, and these two, for connectors with one server.

    ``failed`` is the set of servers (URIs) one operation has given up on:
    ``open`` tries none of them, adds each server that fails to open, and
    names the server of the connection it returns in ``mailserver_uri``.
    """

    #: How many servers there are to try (the most fresh connections one
    #: operation opens).
    server_count = 1

    def server_failed(self, conn: Connection, error: BaseException) -> None:
        """An operation on ``conn`` failed with ``error`` (a connection error
        or :class:`ServerUnfit`)."""


class NetworkConnector(Connector):
    """Opens ldap3 connections to real servers, in ``uris`` order (failover)."""

    def __init__(self, settings: LDAPSettings, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.uris:
            raise ValueError("the LDAP backend needs at least one URI")
        self._settings = settings
        self._tls = make_tls(settings)
        self._clock = clock
        self._failed: Dict[str, float] = {}  # uri: when it last failed
        self._lock = threading.Lock()

    def describe(self) -> str:
        return ", ".join(self._settings.uris)

    @property
    def server_count(self) -> int:
        return len(self._settings.uris)

    def order(self) -> List[str]:
        """The URIs to try: in configured order, recently failed ones last."""
        now = self._clock()
        with self._lock:
            recent = {u for u, when in self._failed.items() if now - when < RETRY_AFTER}
        uris = self._settings.uris
        return [u for u in uris if u not in recent] + [u for u in uris if u in recent]

    def server_failed(self, conn: Connection, error: BaseException) -> None:
        """``conn``'s server failed an operation: try the others first."""
        uri = getattr(conn, "mailserver_uri", None)
        if uri is not None:
            self._mark(uri, error)

    def _mark(self, uri: str, error: Optional[BaseException]) -> None:
        with self._lock:
            if error is None:  # it works (again)
                self._failed.pop(uri, None)
                return
            self._failed[uri] = self._clock()
        log.warn("LDAP server {server} failed: {error}", server=uri, error=error)

    def _connection(self, server: Server, user: Optional[str], password: Optional[str]):
        return Connection(
            server, user=user, password=password, client_strategy=SYNC,
            raise_exceptions=False, read_only=True, auto_referrals=False,
            # ldap3 packs this into SO_RCVTIMEO as whole seconds.
            receive_timeout=max(1, math.ceil(self._settings.operation_timeout)),
        )

    def _secure(self, conn: Connection, server: Server) -> None:
        """Open ``conn`` and, when configured, upgrade it with StartTLS."""
        conn.open(read_server_info=False)
        if self._settings.starttls and not server.ssl:
            if not conn.start_tls(read_server_info=False):
                raise LDAPStartTLSError(f"StartTLS refused by {server.name}: "
                                        f"{(conn.result or {}).get('description')}")

    def _each_server(self, attempt: Callable[[Server], object],
                     failed: Optional[Set[str]] = None):
        """``attempt(server)`` on each server in :meth:`order` until one
        succeeds; servers in ``failed`` are skipped, and those that fail now
        are added to it."""
        last: Optional[BaseException] = None
        for uri in self.order():
            if failed is not None and uri in failed:
                continue
            # A new Server each time: ldap3 remembers a failed address and
            # skips it for a few seconds, which would delay recovery.
            server = Server(uri, get_info=NONE, connect_timeout=self._settings.connect_timeout,
                            tls=self._tls)
            try:
                outcome = attempt(server)
            except CONNECTION_ERRORS as e:
                last = e
                self._mark(uri, e)
                if failed is not None:
                    failed.add(uri)
                continue
            self._mark(uri, None)
            if isinstance(outcome, Connection):
                outcome.mailserver_uri = uri  # for server_failed()
            return outcome
        if last is None:
            raise DirectoryUnavailable("every LDAP server failed already")
        raise last

    def open(self, failed: Optional[Set[str]] = None) -> Connection:
        """A connection bound as the service account (or anonymous), to a
        server not in ``failed`` (see :class:`Connector`)."""
        s = self._settings

        def attempt(server: Server) -> Connection:
            conn = self._connection(server, s.bind_dn or None, s.bind_password or None)
            try:
                self._secure(conn, server)
                if s.bind_dn and not conn.bind(read_server_info=False):
                    raise DirectoryUnavailable(
                        f"service bind as {s.bind_dn} refused: {conn.result.get('description')}"
                    )
            except BaseException:
                unbind_quietly(conn)
                raise
            return conn

        return self._each_server(attempt, failed)

    def check_password(self, dn: str, password: str) -> bool:
        """Bind as ``dn`` on a connection of its own; True when accepted."""

        def attempt(server: Server) -> bool:
            conn = self._connection(server, dn, password)
            try:
                self._secure(conn, server)
                try:
                    ok = conn.bind(read_server_info=False)
                except LDAPSASLPrepError:
                    return False  # control characters: no such password can match
                code = (conn.result or {}).get("result")
            finally:
                unbind_quietly(conn)
            if ok:
                return True
            if code in REFUSED_BIND_RESULTS:
                return False
            raise DirectoryUnavailable(f"bind as {dn}: result {code}")

        return self._each_server(attempt)
