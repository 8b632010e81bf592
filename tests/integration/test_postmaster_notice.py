"""Undeliverable bounces end to end: the postmaster hears of them ([queue]
notify_postmaster, Postfix's 2bounce notice)."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import embedded_directory
from tests.support.server import MailServer, free_port, maildir_messages, wait_for

pytestmark = pytest.mark.slow


def test_undeliverable_bounce_reaches_the_postmaster(tmp_path):
    """A message from <> refused for good is not bounced; postmaster@example.test
    (alice, in the quickstart directory) gets an "Undeliverable bounce" notice."""
    port = free_port()
    server = MailServer(tmp_path / "server", directory=embedded_directory(), smtp_port=port,
                        relay={"trusted_networks": ["127.0.0.0/8"],
                               "transports": {"gone.test": "error:5.1.2 Domain retired"}},
                        queue={"scan_interval": 1.0})
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("", ["x@gone.test"],
                       b"Subject: Undelivered Mail Returned to Sender\r\n"
                       b"Message-ID: <dsn@example.test>\r\n\r\nyour mail failed\r\n")
        [notice] = wait_for(lambda: maildir_messages(server.maildir("alice")) or None,
                            "the postmaster notice")
        assert notice["Subject"] == "Undeliverable bounce"
        assert "<dsn@example.test>" in notice.as_string()
        assert "x@gone.test" in notice.as_string()
        log = server.log()
        assert "undeliverable bounce" in log and "notice to <postmaster@example.test>" in log
    finally:
        server.stop()
