"""Relaying end to end: our server queues, looks up MX records on a loopback DNS
server, and delivers to a second instance of itself; bounces come back as DSNs."""

from __future__ import annotations

import smtplib
import subprocess
import sys

import pytest

from tests.conftest import embedded_directory
from tests.support.dns import DNSServer
from tests.support.server import MailServer, free_port, twistd_env, wait_for, maildir_messages

pytestmark = pytest.mark.slow



def messages(server, local):
    return maildir_messages(server.maildir(local))


def with_subject(server, local, subject):
    return [m for m in messages(server, local) if m["Subject"] == subject]


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    """A receiving server for example.test, a DNS server pointing its MX records
    at it (the first MX dead), and a sending server that relays for loopback."""
    work = tmp_path_factory.mktemp("relay")
    receiver = MailServer(work / "receiver", directory=embedded_directory()).start()
    dead = "127.0.0.2"  # nothing listens there: the first MX refuses connections
    zones = {
        "example.test": {
            "@": {"MX": [[10, "mx1"], [20, "mx2"]]},
            "mx1": {"A": dead},
            "mx2": {"A": "127.0.0.1"},
        },
        "null.test": {"@": {"MX": [[0, "."]]}},
        "down.test": {"@": {"MX": [[10, "mx"]]}, "mx": {"A": "127.0.0.1"}},
    }
    (work / "dns").mkdir()
    dns = DNSServer(zones, directory=str(work / "dns")).start()
    down_port = free_port()  # nothing listens here until a test starts something
    sender = MailServer(
        work / "sender", directory=embedded_directory(), domains=("sender.test",),
        relay={"trusted_networks": ["127.0.0.0/8"], "nameservers": [dns.nameserver],
               "transports": {"example.test": f"smtp:example.test:{receiver.smtp_port}",
                              "down.test": f"smtp:down.test:{down_port}"}},
        queue={"min_backoff": 3600.0, "scan_interval": 1.0},
    ).start()
    yield {"sender": sender, "receiver": receiver, "dns": dns, "down_port": down_port}
    sender.stop()
    receiver.stop()
    dns.stop()


def send(server, sender, recipients, subject, body=b"hello\r\n"):
    msg = f"Subject: {subject}\r\nMessage-ID: <{subject}@sender.test>\r\n\r\n".encode() + body
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        return s.sendmail(sender, recipients, msg)


def test_relay_through_mx_with_first_mx_down(relay):
    """Mail relayed from a trusted client reaches the second MX when the first is down."""
    send(relay["sender"], "someone@sender.test", ["alice@example.test"], "relayed-1")
    [msg] = wait_for(lambda: with_subject(relay["receiver"], "alice", "relayed-1"),
                     "the relayed message")
    received = msg.get_all("Received")
    assert len(received) == 2  # the receiver's hop on top, ours below
    assert "by mx.example.test (mailserver) with ESMTP" in received[1]
    assert wait_for(lambda: "status=sent" in relay["sender"].log(), "the delivery log line")
    assert "127.0.0.2" in relay["sender"].log()  # the dead first MX was tried


def test_permanent_failure_returns_a_dsn(relay):
    """A recipient the remote refuses (550) produces an RFC 3464 bounce to the sender."""
    send(relay["sender"], "postmaster@example.test", ["nobody@example.test"], "bounce-me")

    def bounce():
        for m in messages(relay["receiver"], "alice"):
            if m.get_content_type() == "multipart/report" and "bounce-me" in m.as_string():
                return m
        return None

    dsn = wait_for(bounce, "the bounce")
    assert dsn["From"].startswith("Mail Delivery System <MAILER-DAEMON@")
    assert dsn["Return-Path"] == "<>"
    status = dsn.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; nobody@example.test" in status
    assert "Action: failed" in status and "Status: 5.1.1" in status
    assert "Remote-MTA: dns; " in status


def test_null_mx_bounces_at_once(relay):
    """A domain with a null MX (RFC 7505) bounces with 5.1.10 without any connection."""
    send(relay["sender"], "postmaster@example.test", ["x@null.test"], "null-mx")

    def bounce():
        return [m for m in messages(relay["receiver"], "alice")
                if m.get_content_type() == "multipart/report" and "null-mx" in m.as_string()]

    [dsn] = wait_for(bounce, "the null MX bounce")
    assert "Status: 5.1.10" in dsn.get_payload()[1].as_string()


def test_deferred_then_flushed_with_the_cli(relay, tmp_path):
    """A down destination defers; once it is up, `mailserverctl queue flush` delivers."""
    sender = relay["sender"]
    send(sender, "someone@sender.test", ["carol@down.test"], "deferred-1")

    def ctl(*args):
        return subprocess.run([sys.executable, "-m", "mailserver.ctl", "queue", *args,
                               "--queue-dir", str(sender.queue_dir)],
                              capture_output=True, text=True, env=twistd_env(), timeout=60)

    listing = wait_for(lambda: (out := ctl("list").stdout) and "carol@down.test" in out
                       and "deferred" in out and out, "the deferred message")
    assert "Connection refused" in listing or "4.4.1" in listing
    # Bring the destination up on the port the transport names, then flush.
    down = MailServer(tmp_path / "down", directory=embedded_directory(), domains=("down.test",),
                      smtp_port=relay["down_port"]).start()
    try:
        flushed = ctl("flush", "--domain", "down.test")
        assert flushed.returncode == 0, flushed.stderr
        # No carol in the quick-start directory: the new destination refuses her, and
        # the sender learns that at once instead of after the 3600 s backoff.
        wait_for(lambda: "carol@down.test" not in ctl("list").stdout, "the flushed attempt")
    finally:
        down.stop()
    assert "to=<carol@down.test>" in sender.log() and "status=bounced" in sender.log()
