"""RFC 3461 delivery reports from the real twistd process, asked for with smtplib."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import embedded_directory
from tests.support.server import MailServer, wait_for, maildir_messages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MailServer(tmp_path_factory.mktemp("dsn"), directory=embedded_directory(),
                     queue={"scan_interval": 1.0}).start()
    yield srv
    srv.stop()


def reports_to(server, local, subject):
    return [m for m in maildir_messages(server.maildir(local))
            if m.get_content_type() == "multipart/report" and subject in m.as_string()]



def send(server, sender, rcpt, subject, rcpt_options=(), mail_options=()):
    msg = f"Subject: {subject}\r\nMessage-ID: <{subject}@example.test>\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo("client.example")
        assert s.has_extn("dsn")
        return s.sendmail(sender, [rcpt], msg.encode(), mail_options=list(mail_options),
                          rcpt_options=list(rcpt_options))


def test_notify_success_on_direct_delivery(server):
    """A local recipient delivered at DATA time with NOTIFY=SUCCESS gives the sender a
    "delivered" DSN."""
    assert send(server, "bob@example.test", "alice@example.test", "dsn-success-1",
                rcpt_options=["NOTIFY=SUCCESS", "ORCPT=rfc822;alice@example.test"],
                mail_options=["ENVID=env-1"]) == {}
    [dsn] = wait_for(lambda: reports_to(server, "bob", "dsn-success-1"), "the delivery report")
    assert dsn["Return-Path"] == "<>"
    assert dsn["From"].startswith("Mail Delivery System <MAILER-DAEMON@")
    status = dsn.get_payload()[1].as_string()
    assert "Action: delivered" in status
    assert "Final-Recipient: rfc822; alice@example.test" in status
    assert "Original-Envelope-Id: env-1" in status
    assert "sender success notification" in server.log()


def test_no_report_without_notify_success(server):
    """Without NOTIFY=SUCCESS the sender gets nothing back."""
    send(server, "bob@example.test", "alice@example.test", "dsn-none-1",
         rcpt_options=["NOTIFY=FAILURE"])
    send(server, "bob@example.test", "alice@example.test", "dsn-success-2",
         rcpt_options=["NOTIFY=SUCCESS"])
    wait_for(lambda: reports_to(server, "bob", "dsn-success-2"), "the later report")
    assert reports_to(server, "bob", "dsn-none-1") == []
