"""Transport security against a real slapd: StartTLS, ldaps://, verification,
client certificates.

Certificates come from a throw-away trustme CA.  The server's certificate
names 127.0.0.1 unless a test says otherwise; verification (chain and host
name) is always on, so every failure to verify is an outage, never a silent
fall back to clear text.
"""

from __future__ import annotations

import os

import pytest

from mailserver.directory.interfaces import Mailbox
from mailserver.directory.ldap import LDAPDirectory
from mailserver.errors import DirectoryUnavailable
from tests.support.directory import (
    ALICE_DN,
    cases_settings,
    failure_of,
    result_of,
    sync_directory_kwargs,
)
from tests.support.slapd import slapd_factory  # noqa: F401  (fixture)

pytestmark = pytest.mark.ldap

ALICE = Mailbox("alice@example.test", "alice", ALICE_DN)


class Certificates:
    """A trustme CA and PEM files written from it into ``folder``."""

    def __init__(self, folder) -> None:
        trustme = pytest.importorskip("trustme")
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem)

    def _write(self, name, blob) -> str:
        path = str(self.folder / name)
        blob.write_to_path(path)
        os.chmod(path, 0o600)
        return path

    def issue(self, name: str, *identities: str):
        """(certificate file, key file) for ``identities``."""
        cert = self.ca.issue_cert(*identities)
        return (self._write(f"{name}.pem", cert.cert_chain_pems[0]),
                self._write(f"{name}.key", cert.private_key_pem))


@pytest.fixture
def certificates(tmp_path):
    return Certificates(tmp_path)


@pytest.fixture
def tls_server(slapd_factory, certificates):
    """slapd offering StartTLS on its plain port (and ldaps:// on another)."""
    return slapd_factory(tls=certificates.issue("server", "127.0.0.1", "localhost"))


def directory_for(*uris, **overrides) -> LDAPDirectory:
    return LDAPDirectory(cases_settings(uris=uris, **overrides), **sync_directory_kwargs())


def works(directory) -> None:
    try:
        assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
        assert result_of(directory.authenticate("alice", "alice-password")).login == "alice"
        assert result_of(directory.authenticate("alice", "wrong")) is None
    finally:
        directory.close()


def unavailable(directory) -> str:
    """The reason both a lookup and a login fail temporarily."""
    try:
        failure = failure_of(directory.resolve("alice@example.test"), DirectoryUnavailable)
        failure_of(directory.authenticate("alice", "alice-password"), DirectoryUnavailable)
        return str(failure.value)
    finally:
        directory.close()


def test_starttls(tls_server, certificates):
    """With starttls the plain-port connection is upgraded before the bind."""
    directory = directory_for(tls_server.uri, starttls=True, tls_ca_file=certificates.ca_file)
    conn = directory._connector.open()
    try:
        assert conn.tls_started and conn.bound
    finally:
        conn.unbind()
    works(directory)


def test_starttls_verifies_the_chain(tls_server):
    """An unknown CA is an outage (the system's CAs do not know trustme's)."""
    reason = unavailable(directory_for(tls_server.uri, starttls=True))
    assert "CERTIFICATE_VERIFY_FAILED" in reason


def test_starttls_verifies_the_host_name(slapd_factory, certificates):
    """A certificate for another host is refused, even from the right CA."""
    server = slapd_factory(tls=certificates.issue("other", "ldap.other.test"))
    reason = unavailable(directory_for(server.uri, starttls=True,
                                       tls_ca_file=certificates.ca_file))
    assert "doesn't match" in reason


def test_ldaps_verifies_the_host_name(slapd_factory, certificates):
    """ldaps:// checks the host name the same way."""
    server = slapd_factory(tls=certificates.issue("other", "ldap.other.test"))
    unavailable(directory_for(server.ldaps_uri, tls_ca_file=certificates.ca_file))


def test_starttls_refused_fails_over(slapd_factory, tls_server, certificates):
    """A server without TLS refuses StartTLS: it counts as down (never clear
    text), and the next URI is tried."""
    plain = slapd_factory()
    unavailable(directory_for(plain.uri, starttls=True, tls_ca_file=certificates.ca_file))
    works(directory_for(plain.uri, tls_server.uri, starttls=True,
                        tls_ca_file=certificates.ca_file))


def test_starttls_ignored_for_ldaps(tls_server, certificates):
    """An ldaps:// URI is TLS already; starttls does not apply to it."""
    works(directory_for(tls_server.ldaps_uri, starttls=True, tls_ca_file=certificates.ca_file))


def test_server_requiring_tls(slapd_factory, certificates):
    """A server that refuses clear-text operations: without StartTLS lookups
    and logins fail temporarily; with it, everything works."""
    server = slapd_factory(tls=certificates.issue("server", "127.0.0.1"), security="tls=1")
    assert "confidentialityRequired" in unavailable(
        directory_for(server.uri, tls_ca_file=certificates.ca_file))
    works(directory_for(server.uri, starttls=True, tls_ca_file=certificates.ca_file))


def test_bind_refused_for_want_of_tls_is_not_a_wrong_password(slapd_factory, certificates):
    """Searches allowed in clear text, password binds only under TLS: the
    refused bind (confidentialityRequired) is a temporary failure, never
    "wrong password"."""
    server = slapd_factory(tls=certificates.issue("server", "127.0.0.1"),
                           security="simple_bind=1")
    clear = directory_for(server.uri, bind_dn="", bind_password="")
    try:
        assert result_of(clear.resolve("alice@example.test")).mailboxes == (ALICE,)
        failure = failure_of(clear.authenticate("alice", "alice-password"), DirectoryUnavailable)
        assert "result 13" in str(failure.value)
    finally:
        clear.close()
    works(directory_for(server.uri, bind_dn="", bind_password="", starttls=True,
                        tls_ca_file=certificates.ca_file))


@pytest.fixture
def client_cert_server(slapd_factory, certificates):
    """slapd that demands a client certificate signed by the test CA."""
    return slapd_factory(tls=certificates.issue("server", "127.0.0.1"),
                         tls_client_ca=certificates.ca_file)


@pytest.mark.parametrize("transport", ["starttls", "ldaps"])
def test_client_certificate(client_cert_server, certificates, transport):
    """The configured client certificate is presented; without one the
    server refuses the handshake, which is an outage."""
    cert_file, key_file = certificates.issue("client", "mailserver.example.test")
    if transport == "starttls":
        uri, extra = client_cert_server.uri, {"starttls": True}
    else:
        uri, extra = client_cert_server.ldaps_uri, {}
    works(directory_for(uri, tls_ca_file=certificates.ca_file, tls_cert_file=cert_file,
                        tls_key_file=key_file, **extra))
    unavailable(directory_for(uri, tls_ca_file=certificates.ca_file, **extra))


def test_key_without_certificate_is_refused():
    """tls_key_file alone is a configuration error."""
    with pytest.raises(ValueError, match="tls_cert_file"):
        cases_settings(uris=("ldap://127.0.0.1:1",), tls_key_file="/x.key")
