"""LDAPDirectory against a real OpenLDAP slapd: threads, outages, failover."""

from __future__ import annotations

import os
import signal
import time

import pytest

from mailserver.directory.interfaces import Mailbox
from mailserver.directory.ldap import LDAPDirectory
from mailserver.errors import DirectoryUnavailable
from tests.support import slapd as slapd_support
from tests.support.directory import (
    ALICE_DN,
    BOB_DN,
    QueueReactor,
    cases_settings,
    failure_of,
    result_of,
    sync_directory_kwargs,
)
from tests.support.slapd import FaultyProxy, free_port, slapd_factory, slapd_server  # noqa: F401

pytestmark = pytest.mark.ldap

ALICE = Mailbox("alice@example.test", "alice", ALICE_DN)
BOB = Mailbox("bob@example.test", "bob", BOB_DN)


def _inline(deferred):
    return deferred


def sync_directory(*uris, **overrides):
    return LDAPDirectory(cases_settings(uris=uris, **overrides), **sync_directory_kwargs())


def test_quickstart_with_real_threads(slapd_server):
    """On a real pool thread, the quick-start addresses resolve and log in."""
    reactor = QueueReactor()
    directory = LDAPDirectory(cases_settings(uris=(slapd_server.uri,), pool_size=2),
                              reactor=reactor)
    try:
        def run(d):
            return result_of(reactor.wait(d))

        assert run(directory.resolve("team@example.test")).mailboxes == (ALICE, BOB)
        assert run(directory.resolve("postmaster@example.test")).mailboxes == (ALICE,)
        assert run(directory.authenticate("bob", "bob-password")).login == "bob"
        assert run(directory.authenticate("bob", "alice-password")) is None
    finally:
        directory.close()


def test_anonymous_search(slapd_server):
    """Without a bind DN the searches are anonymous, and search-then-bind works."""
    directory = sync_directory(slapd_server.uri, bind_dn="", bind_password="")
    try:
        assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
        assert result_of(directory.authenticate("alice", "alice-password")).login == "alice"
    finally:
        directory.close()


def assert_unavailable_fast(deferred_call, settle, limit):
    started = time.monotonic()
    failure = failure_of(settle(deferred_call()), DirectoryUnavailable)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"took {elapsed:.1f}s"
    return failure


@pytest.mark.parametrize("threads", ["inline", "pool"])
def test_outage_and_recovery(slapd_factory, threads):
    """A stopped server gives DirectoryUnavailable quickly; once it is back on
    the same port, the same directory object works again."""
    server = slapd_factory()
    settings = cases_settings(uris=(server.uri,), connect_timeout=1.0, operation_timeout=2.0,
                              pool_size=2)
    if threads == "inline":
        directory = LDAPDirectory(settings, **sync_directory_kwargs())

        def settle(d):
            return d
    else:
        reactor = QueueReactor()
        directory = LDAPDirectory(settings, reactor=reactor)
        settle = reactor.wait
    try:
        for _ in range(3):  # with a pool, more than one thread may hold a connection
            assert result_of(settle(directory.resolve("alice@example.test"))).mailboxes == (ALICE,)
        server.stop()
        for _ in range(3):
            assert_unavailable_fast(lambda: directory.resolve("alice@example.test"), settle, 5.0)
        assert_unavailable_fast(lambda: directory.authenticate("alice", "alice-password"),
                                settle, 5.0)
        server.start()
        for _ in range(3):
            assert result_of(settle(directory.resolve("alice@example.test"))).mailboxes == (ALICE,)
        assert result_of(settle(directory.authenticate("alice", "alice-password"))).login == "alice"
    finally:
        directory.close()


def test_restart_between_calls_is_invisible(slapd_factory):
    """A server restart between two calls costs one silent retry, not an error."""
    server = slapd_factory()
    directory = sync_directory(server.uri)
    try:
        assert result_of(directory.resolve("bob@example.test")).mailboxes == (BOB,)
        server.stop()
        server.start()
        assert result_of(directory.resolve("bob@example.test")).mailboxes == (BOB,)
    finally:
        directory.close()


def test_hung_server_times_out(slapd_factory):
    """A server that accepts but never answers fails within the timeouts."""
    server = slapd_factory()
    directory = sync_directory(server.uri, connect_timeout=1.0, operation_timeout=1.0)
    try:
        assert result_of(directory.resolve("alice@example.test")).found
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            assert_unavailable_fast(lambda: directory.resolve("alice@example.test"), _inline, 8.0)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert result_of(directory.resolve("alice@example.test")).found
    finally:
        directory.close()


def test_hung_only_server_costs_one_timeout(slapd_server):
    """With one URI, a lookup on a kept connection to a server that stopped
    answering waits one operation timeout and gives up: it does not open a
    second connection to the same hung server (that would wait a second
    timeout, for the bind).  Once the server answers again, the next
    lookup works on a fresh connection."""
    timeout = 1.0
    with FaultyProxy(slapd_server.port) as proxy:
        directory = sync_directory(proxy.uri, connect_timeout=timeout, operation_timeout=timeout)
        try:
            assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
            assert proxy.connections == 1
            proxy.hang()
            assert_unavailable_fast(lambda: directory.resolve("alice@example.test"), _inline,
                                    2 * timeout)
            assert proxy.connections == 1
            proxy.resume()
            assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
            assert proxy.connections == 2
        finally:
            directory.close()


def test_dropped_connection_is_reopened_once(slapd_server):
    """A kept connection the server closed (restart, idle timeout) is
    replaced within the lookup, on the same single server, without error."""
    with FaultyProxy(slapd_server.port) as proxy:
        directory = sync_directory(proxy.uri)
        try:
            assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
            proxy.drop()
            assert result_of(directory.resolve("bob@example.test")).mailboxes == (BOB,)
            assert proxy.connections == 2
        finally:
            directory.close()


def test_every_hung_server_is_waited_for_once(slapd_server):
    """Two URIs, both hung: the kept connection to the first times out, the
    lookup moves to the second, which times out too; then every server has
    failed in this call and the first is not tried again."""
    timeout = 1.0
    with FaultyProxy(slapd_server.port) as first, FaultyProxy(slapd_server.port) as second:
        directory = sync_directory(first.uri, second.uri, connect_timeout=timeout,
                                   operation_timeout=timeout)
        try:
            assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
            first.hang()
            second.hang()
            assert_unavailable_fast(lambda: directory.resolve("alice@example.test"), _inline,
                                    3 * timeout)
            assert (first.connections, second.connections) == (1, 1)
        finally:
            directory.close()


def test_failover_to_next_uri(slapd_server):
    """When the first URI is down, the next one answers."""
    dead = f"ldap://127.0.0.1:{free_port()}"
    directory = sync_directory(dead, slapd_server.uri, connect_timeout=1.0)
    try:
        assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
        assert result_of(directory.authenticate("alice", "alice-password")).login == "alice"
    finally:
        directory.close()


def test_hung_first_server_costs_one_timeout(slapd_server):
    """A first URI that accepts connections and never answers (anonymous
    searches, so opening succeeds): the lookup moves on to the next server,
    and later lookups and logins go there first, without waiting again."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # the kernel completes the handshakes; nobody reads
    uri = f"ldap://127.0.0.1:{hung.getsockname()[1]}"
    directory = sync_directory(uri, slapd_server.uri, bind_dn="", bind_password="",
                               connect_timeout=1.0, operation_timeout=1.0)
    try:
        started = time.monotonic()
        assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
        assert time.monotonic() - started < 5.0
        started = time.monotonic()
        assert result_of(directory.resolve("bob@example.test")).mailboxes == (BOB,)
        assert result_of(directory.authenticate("alice", "alice-password")).login == "alice"
        assert time.monotonic() - started < 0.9  # less than one operation_timeout
    finally:
        directory.close()
        hung.close()


def test_password_with_control_characters_is_refused(slapd_server):
    """ldap3 will not send such a password (SASLprep): that is a wrong
    password (535), not an outage (454)."""
    directory = sync_directory(slapd_server.uri)
    try:
        for password in ("alice-password\t", "x\x00", "\xad"):
            assert result_of(directory.authenticate("alice", password)) is None
    finally:
        directory.close()


def test_all_servers_down():
    """With every URI down, resolve and authenticate fail temporarily."""
    uris = [f"ldap://127.0.0.1:{free_port()}" for _ in range(2)]
    directory = sync_directory(*uris, connect_timeout=1.0)
    try:
        assert_unavailable_fast(lambda: directory.resolve("alice@example.test"), _inline, 5.0)
        assert_unavailable_fast(lambda: directory.authenticate("alice", "x"), _inline, 5.0)
    finally:
        directory.close()


@pytest.mark.parametrize("overrides", [
    {"bind_password": "wrong"},
    {"base_dn": "dc=nowhere,dc=test"},
])
def test_misconfiguration_is_temporary(slapd_server, overrides):
    """A refused service bind or a missing base is an outage, never "unknown"."""
    directory = sync_directory(slapd_server.uri, **overrides)
    try:
        failure_of(directory.resolve("alice@example.test"), DirectoryUnavailable)
    finally:
        directory.close()


def test_missing_slapd_fails_under_ci(monkeypatch):
    """Without slapd the fixtures skip locally but fail under CI."""
    def missing():
        raise slapd_support.SlapdUnavailable("not installed")

    monkeypatch.setattr(slapd_support, "find_installation", missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        slapd_support.require_slapd()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        slapd_support.require_slapd()


@pytest.fixture
def tls_slapd(slapd_factory, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    os.chmod(tmp_path / "key.pem", 0o600)
    server = slapd_factory(tls=(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")))
    return server, str(tmp_path / "ca.pem")


def test_ldaps_verifies_the_certificate(tls_slapd):
    """ldaps:// works with the right CA, and an unknown CA is an outage."""
    server, ca_file = tls_slapd
    directory = sync_directory(server.ldaps_uri, tls_ca_file=ca_file)
    try:
        assert result_of(directory.resolve("alice@example.test")).mailboxes == (ALICE,)
        assert result_of(directory.authenticate("alice", "alice-password")).login == "alice"
    finally:
        directory.close()
    untrusting = sync_directory(server.ldaps_uri)  # system CAs do not know trustme's
    try:
        failure = failure_of(untrusting.resolve("alice@example.test"), DirectoryUnavailable)
        assert "CERTIFICATE_VERIFY_FAILED" in str(failure.value)
    finally:
        untrusting.close()
