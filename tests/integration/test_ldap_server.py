"""The real server against a real OpenLDAP slapd: lookups, an outage, recovery."""

from __future__ import annotations

import mailbox
import smtplib

import pytest

from tests.support.server import MailServer
from tests.support.slapd import slapd_factory  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.ldap]


@pytest.fixture
def ldap_mail(tmp_path, slapd_factory):  # noqa: F811
    slapd = slapd_factory()
    server = MailServer(tmp_path / "srv", directory={
        "backend": "ldap", "uris": [slapd.uri], "base_dn": "dc=example,dc=test",
        "bind_dn": "cn=mailserver,dc=example,dc=test", "bind_password": "mailserver-password",
        "connect_timeout": 1.0, "operation_timeout": 2.0,
    }).start()
    yield server, slapd
    server.stop()


def test_ldap_resolution_and_delivery(ldap_mail):
    """Users, alternate addresses, aliases and groups resolve through slapd; mail lands."""
    server, _ = ldap_mail
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("nobody@example.test")[:1] == (550,)
        for rcpt in ("alice.liddell@example.test", "postmaster", "team@example.test"):
            assert s.rcpt(rcpt)[0] == 250, rcpt
        code, text = s.data(b"Subject: via-ldap\r\n\r\nhello\r\n")
        assert code == 250 and b"queued as" in text
    alice = list(mailbox.Maildir(str(server.maildir("alice")), factory=None, create=False))
    bob = list(mailbox.Maildir(str(server.maildir("bob")), factory=None, create=False))
    assert [m["Subject"] for m in alice] == ["via-ldap"]  # one copy despite three routes
    assert [m["Delivered-To"] for m in bob] == ["bob@example.test"]


def test_outage_is_451_then_recovers(ldap_mail):
    """With slapd stopped RCPT gets 451 4.4.3 (never 5xx); after restart, 250 again."""
    server, slapd = ldap_mail
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("alice@example.test")[0] == 250
        slapd.stop()
        code, text = s.rcpt("bob@example.test")
        assert (code, text[:5]) == (451, b"4.4.3")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text[:5]) == (451, b"4.4.3")
        slapd.start()
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.data(b"Subject: after-outage\r\n\r\nok\r\n")[0] == 250
    assert len(list(server.messages("bob"))) == 1
