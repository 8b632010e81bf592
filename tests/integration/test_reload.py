"""SIGHUP: new directory settings and certificate without a restart."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import time

import pytest

from tests.conftest import QUICKSTART_LDIF
from tests.support.server import MailServer

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
