"""SIGHUP: new directory settings and certificate without a restart."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import time

import pytest

from tests.conftest import QUICKSTART_LDIF
from tests.support.server import MailServer, wait_for

pytestmark = pytest.mark.slow

CAROL = """
dn: uid=carol,ou=people,dc=example,dc=test
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: Carol
mail: carol@example.test
userPassword: carol-password
"""


def wait_for_log(server, text, deadline=20.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if text in server.log():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never logged:\n{server.log()[-2000:]}")


def rcpt(server, address):
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        return s.rcpt(address)[0]


def test_sighup_reloads_directory(tmp_path):
    """After the LDIF gains a user and the server gets SIGHUP, the user is accepted."""
    ldif = tmp_path / "users.ldif"
    shutil.copy(QUICKSTART_LDIF, ldif)
    server = MailServer(tmp_path / "srv", directory={
        "backend": "ldif", "ldif_file": str(ldif), "base_dn": "dc=example,dc=test"}).start()
    try:
        assert rcpt(server, "carol@example.test") == 550  # and now cached as unknown
        ldif.write_text(ldif.read_text() + CAROL)
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for_log(server, "reloaded directory settings")
        assert rcpt(server, "carol@example.test") == 250
        assert rcpt(server, "alice@example.test") == 250
    finally:
        server.stop()


def test_bad_config_on_sighup_keeps_running(tmp_path):
    """A broken file at reload is logged and the running configuration stays."""
    server = MailServer(tmp_path / "srv", directory={
        "backend": "ldif", "ldif_file": QUICKSTART_LDIF, "base_dn": "dc=example,dc=test"}).start()
    try:
        server.config_path.write_text(server.config_path.read_text() + "\n[bogus]\n")
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for_log(server, "reload refused")
        assert rcpt(server, "alice@example.test") == 250
    finally:
        server.stop()


def test_sighup_reloads_certificate_with_a_connection_open(tmp_path):
    """An ACME-style renewal: after the files change and SIGHUP, new TLS
    connections get the new certificate, and one opened before keeps working."""
    import ssl

    import trustme

    from tests.support.server import free_port

    ca = trustme.CA()
    first = ca.issue_cert("mx.example.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(issued):
        issued.private_key_pem.write_to_path(str(key))
        issued.cert_chain_pems[0].write_to_path(str(cert))

    install(first)
    port = free_port()
    server = MailServer(
        tmp_path / "srv", directory={"backend": "ldif", "ldif_file": QUICKSTART_LDIF,
                                     "base_dn": "dc=example,dc=test"},
        tls={"certificate": str(cert), "private_key": str(key)},
        extra_listeners=({"name": "submissions", "protocol": "submission",
                          "address": f"127.0.0.1:{port}", "tls": "implicit"},)).start()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False  # connected by address; the chain is still verified

    def served_certificate(connection):
        return connection.sock.getpeercert(binary_form=True)

    try:
        before = smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30)
        before.ehlo("client.example")
        old = served_certificate(before)
        install(ca.issue_cert("mx.example.test"))
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_for_log(server, "reloaded TLS certificate")
        with smtplib.SMTP_SSL("127.0.0.1", port, context=context, timeout=30) as after:
            assert after.ehlo("client.example")[0] == 250
            assert served_certificate(after) != old
        assert before.noop()[0] == 250  # the connection from before the reload is still up
        assert served_certificate(before) == old
        before.quit()
    finally:
        server.stop()


def test_session_open_across_sighup_completes_its_transaction(tmp_path):
    """A session opened before SIGHUP sends a whole message on the same connection after it."""
    server = MailServer(tmp_path / "srv", directory={
        "backend": "ldif", "ldif_file": QUICKSTART_LDIF, "base_dn": "dc=example,dc=test"}).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            s.ehlo("client.example")
            assert s.mail("x@example.org")[0] == 250
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_for_log(server, "reloaded directory settings")
            assert s.rcpt("alice@example.test")[0] == 250
            assert s.data(b"Subject: across a reload\r\n\r\nhello\r\n")[0] == 250
            assert s.noop()[0] == 250
        assert len(server.messages("alice")) == 1
    finally:
        assert server.stop() == 0


def test_sighup_under_load_refuses_and_cuts_nothing(tmp_path):
    """Clients sending mail on fresh connections while SIGHUP arrives three
    times see no refused connection, no cut session and no error reply."""
    import threading

    server = MailServer(tmp_path / "srv", directory={
        "backend": "ldif", "ldif_file": QUICKSTART_LDIF, "base_dn": "dc=example,dc=test"},
        smtp={"connection_rate_limit": 0}).start()  # the load is one address's fresh connections
    stop = threading.Event()
    sent, failures = [], []

    def client(n):
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
                    s.sendmail("x@example.org", ["bob@example.test"],
                               f"Subject: load {n}\r\n\r\nhello\r\n".encode())
                sent.append(n)
            except Exception as e:  # any refusal, cut or error reply fails the test
                failures.append(repr(e))
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for i in range(1, 4):
            wait_for(lambda: len(sent) >= 10 * i or failures, "mail to flow")
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_for(lambda: server.log().count("reloaded directory settings") == i,
                     f"reload {i}")
        wait_for(lambda: len(sent) >= 40 or failures, "mail after the reloads")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        code = server.stop()
    assert failures == []
    assert len(server.messages("bob")) == len(sent)
    assert code == 0
