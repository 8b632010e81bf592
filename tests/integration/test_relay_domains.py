"""The corporate relay end to end: the real server in front of an internal
mail host (Postfix's ``smtp-sink``), recipients checked in an
Active-Directory-shaped slapd (tests/data/ad-tree.ldif).

``corp.example.test`` and ``sales.example.test`` are relay domains (one by
``[relay.internal]``, one by ``internal_host``); ``example.test`` stays a
local domain, so a message that wrongly went to a maildir would be seen.
Nobody is trusted to relay: the MX accepts for the relay domains from anyone,
and a roaming user (ann) relays out through submission after logging in.
"""

from __future__ import annotations

import smtplib

import pytest

from tests.support.directory import AD_SUFFIX, ad_dn, ad_slapd  # noqa: F401  (fixture)
from tests.support.server import MailServer, free_port, wait_for
from tests.support.sink import SmtpSink, require_smtp_sink

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def corp(tmp_path_factory, ad_slapd):  # noqa: F811
    """The relay server, the sink as the internal host, and the slapd."""
    require_smtp_sink()
    work = tmp_path_factory.mktemp("corp")
    sink = SmtpSink(dump_dir=work / "sink").start()
    submission_port = free_port()
    server = MailServer(
        work / "server",
        directory={"backend": "ldap", "uris": [ad_slapd.uri], "base_dn": AD_SUFFIX,
                   "bind_dn": ad_dn("Mail Service"), "bind_password": "service-password",
                   "schema": "activedirectory", "connect_timeout": 2.0,
                   "operation_timeout": 3.0, "negative_cache_ttl": 0.0},
        relay={"internal": {"corp.example.test": f"smtp:[127.0.0.1]:{sink.port}"},
               "internal_host": f"[127.0.0.1]:{sink.port}",
               "transports": {"outside.example": f"smtp:[127.0.0.1]:{sink.port}",
                              "partner.example": f"smtp:[127.0.0.1]:{sink.port}"}},
        queue={"min_backoff": 3600.0, "scan_interval": 1.0},
        extra_tables={"domains": {"local": ["example.test"],
                                  "relay": ["corp.example.test", "sales.example.test"]}},
        extra_listeners=[{"name": "submission", "protocol": "submission",
                          "address": f"{HOST}:{submission_port}", "tls": "none",
                          "plaintext_auth": True}],
    ).start()
    yield {"server": server, "sink": sink, "submission": submission_port, "slapd": ad_slapd}
    server.stop()
    sink.stop()


def send(port, sender, recipients, subject, login=None):
    msg = f"Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP(HOST, port, timeout=30) as s:
        if login:
            s.login(*login)
        return s.sendmail(sender, recipients, msg)


def received(sink, subject):
    """The sink's transactions for ``subject`` (waits for at least one)."""
    def found():
        return [m for m in sink.messages() if m.data and m.header("Subject") == subject]
    return wait_for(found, f"{subject} at the internal host")


def recipients_at_sink(sink, subject, count):
    """Every recipient the sink got ``subject`` for, once there are ``count``."""
    def enough():
        got = {r for m in received(sink, subject) for r in m.recipients}
        return got if len(got) >= count else None
    return wait_for(enough, f"{count} recipients of {subject}")


def maildir_files(server):
    return [p for p in server.maildir_root.rglob("*") if p.is_file()]


def test_known_recipient_is_relayed_to_the_internal_host(corp):
    """Mail from an untrusted client for a relay-domain user reaches the
    internal host with the original sender and the user's address, and no
    maildir is written."""
    send(corp["server"].smtp_port, "someone@far.example", ["Ann.Archer@corp.example.test"],
         "relay-known")
    [msg] = received(corp["sink"], "relay-known")
    assert msg.sender == "someone@far.example"
    assert msg.recipients == ["ann@corp.example.test"]
    assert "mx.example.test" in msg.header("Received")
    assert maildir_files(corp["server"]) == []


def test_unknown_and_disabled_are_refused_at_rcpt(corp):
    """An unknown relay-domain address is 550 5.1.1 and a disabled account
    550 5.2.1, at RCPT time; nothing reaches the internal host."""
    with smtplib.SMTP(HOST, corp["server"].smtp_port, timeout=30) as s:
        s.ehlo("client.far.example")
        s.mail("someone@far.example")
        code, text = s.rcpt("nobody@corp.example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = s.rcpt("dan@corp.example.test")
        assert (code, text[:5]) == (550, b"5.2.1")
    assert "to=<nobody@corp.example.test>" in corp["server"].log()


def test_group_expands_to_relayed_members_and_forwards(corp):
    """A group in the second relay domain expands: members go to the internal
    host by their own addresses, the external contact is forwarded."""
    send(corp["server"].smtp_port, "someone@far.example", ["sales@sales.example.test"],
         "relay-group")
    wanted = {"ann@corp.example.test", "ben.baker@corp.example.test", "pat@partner.example"}
    assert recipients_at_sink(corp["sink"], "relay-group", 3) == wanted
    assert maildir_files(corp["server"]) == []


def test_roaming_user_relays_out_through_submission(corp):
    """A logged-in user's mail to the internet and to a colleague both leave
    through the queue: outside by the transport map, the colleague by the
    relay domain's internal host."""
    send(corp["submission"], "ann@corp.example.test",
         ["someone@outside.example", "ben@corp.example.test"], "roaming",
         login=("ann", "ann-password"))
    assert recipients_at_sink(corp["sink"], "roaming", 2) == {"someone@outside.example",
                                                               "ben.baker@corp.example.test"}


def test_directory_outage_is_temporary(corp):
    """With the directory down a relay-domain recipient is 451 4.4.3, never
    refused for good; it is accepted again once the directory is back."""
    slapd = corp["slapd"]
    slapd.stop()
    try:
        with smtplib.SMTP(HOST, corp["server"].smtp_port, timeout=30) as s:
            s.ehlo("client.far.example")
            s.mail("someone@far.example")
            code, text = s.rcpt("cat@corp.example.test")
            assert (code, text[:5]) == (451, b"4.4.3")
    finally:
        slapd.start()
    send(corp["server"].smtp_port, "someone@far.example", ["cat@corp.example.test"],
         "after-outage")
    [msg] = received(corp["sink"], "after-outage")
    assert msg.recipients == ["cat@corp.example.test"]
