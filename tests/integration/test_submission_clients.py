"""Real mail clients against the submission listeners: swaks and msmtp.

The server is the one ``test_submission`` starts (STARTTLS, implicit TLS and
plaintext-AUTH submission listeners; users from the quick-start LDIF plus a
few test logins), without the sink and without a rate limit that a test
could reach.  Both clients check the server's certificate against the test
CA.  swaks comes with scripts/test.sh; so does msmtp (Debian package
``msmtp``).  Failed logins come from a loopback address of their own, so the
login throttle never sees them as the other tests' client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.test_submission import (
    HOST,
    PASSWORDS,
    SERVER_NAME,
    one_delivered,
    start_submission_server,
)

pytestmark = pytest.mark.slow


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = (f"{tool} is not installed: install the Debian package {package!r} "
                   "(scripts/test.sh does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def sub(tmp_path_factory, tls_files):
    srv = start_submission_server(tmp_path_factory.mktemp("submission-clients"), tls_files)
    yield srv
    srv.server.stop()


# --- swaks --------------------------------------------------------------------------------

def swaks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require("swaks", "swaks"), *args], capture_output=True, text=True,
                          timeout=60)


def swaks_message(port: int, subject: str, *options: str, user: str = "alice",
                  password: str = None) -> subprocess.CompletedProcess:
    return swaks("--server", f"{HOST}:{port}", "--from", f"{user}@example.test",
                 "--to", "bob@example.test", "--auth-user", user,
                 "--auth-password", password or PASSWORDS[user],
                 "--header", f"Subject: {subject}", "--body", f"body of {subject}", *options)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls(sub, tls_files, mechanism):
    """swaks with STARTTLS and AUTH PLAIN or LOGIN, verifying the certificate, exits 0 and the
    message lands."""
    subject = f"swaks-starttls-{mechanism}"
    done = swaks_message(sub.starttls_port, subject, "--tls", "--tls-verify",
                         "--tls-ca-path", tls_files["ca"], "--auth", mechanism)
    assert done.returncode == 0, done.stdout + done.stderr
    # swaks marks lines sent and read over TLS with "~>" and "<~".
    assert f" ~> AUTH {mechanism}" in done.stdout
    assert "<~  235 2.7.0 Authentication successful" in done.stdout
    assert "<~  250 2.0.0 Ok: queued as" in done.stdout
    raw, msg = one_delivered(sub.server, "bob", subject)
    assert raw.startswith(b"Return-Path: <alice@example.test>\n")
    assert f"by {SERVER_NAME} (mailserver) with ESMTPSA id" in msg["Received"]
    assert f"body of {subject}" in msg.get_content()


def test_swaks_tls_on_connect(sub, tls_files):
    """swaks --tls-on-connect on the implicit-TLS port exits 0 and the message lands."""
    done = swaks_message(sub.implicit_port, "swaks-465", "--tls-on-connect", "--tls-verify",
                         "--tls-ca-path", tls_files["ca"], "--auth", "PLAIN")
    assert done.returncode == 0, done.stdout + done.stderr
    _, msg = one_delivered(sub.server, "bob", "swaks-465")
    assert "with ESMTPSA" in msg["Received"]
    # swaks writes its own Message-ID and Date: they are kept, not doubled.
    assert len(msg.get_all("Message-ID")) == 1 and len(msg.get_all("Date")) == 1
    assert not msg["Message-ID"].endswith(f"@{SERVER_NAME}>")


def test_swaks_wrong_password(sub):
    """swaks with a wrong password fails with a non-zero exit and the server's 535 5.7.8."""
    done = swaks_message(sub.starttls_port, "swaks-wrong", "--tls", "--auth", "PLAIN",
                         "--local-interface", "127.0.0.71", password="wrong")
    assert done.returncode == 28, done  # swaks: "error in AUTH"
    assert "<~* 535 5.7.8 " in done.stdout, done.stdout  # "*": an error reply, over TLS


# --- msmtp --------------------------------------------------------------------------------

def msmtprc(path: Path, sub, tls_files, password: str = None) -> Path:
    """An msmtp configuration: account "starttls" (587 style), "implicit"
    (465 style), "bare" (starttls without Message-ID/Date of its own) and
    "wrong" (a wrong password, from a loopback address of its own)."""
    common = [
        "tls on", f"tls_trust_file {tls_files['ca']}", f"tls_host_override {SERVER_NAME}",
        "auth on", "user alice", f"password {password or PASSWORDS['alice']}",
        "from alice@example.test", f"host {HOST}",
    ]
    accounts = {
        "starttls": [f"port {sub.starttls_port}", "tls_starttls on"],
        "implicit": [f"port {sub.implicit_port}", "tls_starttls off"],
        "bare": [f"port {sub.starttls_port}", "tls_starttls on", "auth plain",
                 "set_msgid_header off", "set_date_header off"],
        "wrong": [f"port {sub.starttls_port}", "tls_starttls on", "password wrong-password",
                  "source_ip 127.0.0.72"],
    }
    lines = ["defaults", *common, ""]
    for name, options in accounts.items():
        lines += [f"account {name}", *options, ""]
    path.write_text("\n".join(lines))
    path.chmod(0o600)  # msmtp refuses a configuration with a password others can read
    return path


@pytest.fixture(scope="module")
def rcfile(sub, tls_files, tmp_path_factory):
    require("msmtp", "msmtp")
    return msmtprc(tmp_path_factory.mktemp("msmtp") / "msmtprc", sub, tls_files)


def msmtp(rcfile: Path, account: str, subject: str) -> subprocess.CompletedProcess:
    text = (f"From: Alice <alice@example.test>\nTo: bob@example.test\nSubject: {subject}\n\n"
            f"body of {subject}\n")
    return subprocess.run(["msmtp", "-C", str(rcfile), "-a", account, "bob@example.test"],
                          input=text, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("account", ["starttls", "implicit"])
def test_msmtp_delivers(sub, rcfile, account):
    """msmtp with STARTTLS (587 style) and with TLS from the first byte (465 style), certificate
    checked, exits 0 and the message lands."""
    subject = f"msmtp-{account}"
    done = msmtp(rcfile, account, subject)
    assert done.returncode == 0, done.stdout + done.stderr
    raw, msg = one_delivered(sub.server, "bob", subject)
    assert raw.startswith(b"Return-Path: <alice@example.test>\n")
    assert f"by {SERVER_NAME} (mailserver) with ESMTPSA id" in msg["Received"]
    assert raw.endswith(f"\n\nbody of {subject}\n".encode())


def test_msmtp_without_message_id_and_date(sub, rcfile):
    """When msmtp is told not to add Message-ID and Date, the server adds them."""
    done = msmtp(rcfile, "bare", "msmtp-bare")
    assert done.returncode == 0, done.stdout + done.stderr
    _, msg = one_delivered(sub.server, "bob", "msmtp-bare")
    assert msg.get_all("Message-ID") == [msg["Message-ID"]]
    assert msg["Message-ID"].endswith(f"@{SERVER_NAME}>")
    assert len(msg.get_all("Date")) == 1


def test_msmtp_wrong_password(sub, rcfile):
    """msmtp with a wrong password exits non-zero, names the server's 535 and delivers nothing."""
    done = msmtp(rcfile, "wrong", "msmtp-wrong")
    assert done.returncode == 77, done  # EX_NOPERM (sysexits.h)
    assert "535 5.7.8" in done.stderr, done.stderr
    assert not any(b"msmtp-wrong" in p.read_bytes() for p in sub.server.messages("bob"))
