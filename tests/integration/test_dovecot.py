"""Dovecot reads the maildirs the real server writes.

The messages go in over SMTP (smtplib) to the real twistd process; then
``doveadm fetch`` reads alice's maildir with a minimal throw-away Dovecot
configuration (no daemon, no userdb: ``USER``/``HOME`` plus ``mail_uid``).

Dovecot will not open mail as root, so when the tests run as root the
maildir is copied (names, modes and bytes unchanged) to a directory under
/tmp owned by ``nobody`` and Dovecot reads the copy as ``nobody``.  Its
index and control files go to a separate directory so the maildir itself
only holds what our server wrote.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SENDER = "sender@example.org"
RCPT = "alice@example.test"

UTF8_LINE = "Grüße aus Köln, naïve café, 日本語, emoji 📬"

# What the client hands to smtplib (CRLF line endings; smtplib dot-stuffs
# every line starting with "." on the wire, so ".leading dot" travels as
# "..leading dot" and "." alone as "..").
MESSAGES = {
    "dovecot-plain": b"From: sender@example.org\r\nTo: alice@example.test\r\n"
                     b"Subject: dovecot-plain\r\n\r\nshort body\r\n",
    "dovecot-utf8": b"From: sender@example.org\r\nTo: alice@example.test\r\n"
                    b"Subject: dovecot-utf8\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
                    + UTF8_LINE.encode("utf-8") + b"\r\nsecond line\r\n",
    "dovecot-dots": b"From: sender@example.org\r\nTo: alice@example.test\r\n"
                    b"Subject: dovecot-dots\r\n\r\nfirst line\r\n"
                    b".leading dot\r\n..two leading dots\r\n.\r\n"
                    b"\r\n   indented line\r\nlast line\r\n",
}

# Name fields in new/: <base>,S=<bytes on disk>,W=<bytes with CRLF>
NAME_SIZES = re.compile(r",S=(\d+),W=(\d+)$")


def doveadm_path() -> str:
    path = shutil.which("doveadm") or next(
        (p for p in ("/usr/bin/doveadm", "/usr/sbin/doveadm") if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("doveadm is not installed (scripts/test.sh installs dovecot-core)")
        pytest.skip("doveadm is not installed (apt-get install dovecot-core)")
    return path


def mail_owner() -> tuple:
    """The uid/gid Dovecot runs as: ourselves, or nobody when we are root."""
    if os.getuid() != 0:
        return os.getuid(), os.getgid()
    try:
        pw = pwd.getpwnam("nobody")
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


class Dovecot:
    """``doveadm`` on one maildir, with a config written next to it."""

    def __init__(self, doveadm: str, root: Path, source: Path, name: str,
                 rename=lambda name: name) -> None:
        self.doveadm = doveadm
        self.root = root
        self.maildir = root / name
        self.index = root / (name + "-index")
        uid, gid = mail_owner()
        # copy tmp/, new/ and cur/ file by file so that ``rename`` can drop name fields
        for sub in ("tmp", "new", "cur"):
            (self.maildir / sub).mkdir(parents=True)
            if (source / sub).is_dir():
                for f in (source / sub).iterdir():
                    shutil.copy2(f, self.maildir / sub / rename(f.name))
            shutil.copystat(source / sub, self.maildir / sub)
        self.index.mkdir()
        for p in [self.maildir, self.index, *self.maildir.rglob("*")]:
            os.chown(p, uid, gid)
        self.config = root / (name + ".conf")
        self.config.write_text(
            f"base_dir = {root / (name + '-run')}\n"
            "log_path = /dev/stderr\n"
            f"mail_location = maildir:{self.maildir}:INDEX={self.index}:CONTROL={self.index}\n"
            f"mail_uid = {uid}\nmail_gid = {gid}\n"
            "first_valid_uid = 1\nfirst_valid_gid = 1\n"
        )

    def run(self, *args: str) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "USER": "alice",
               "HOME": str(self.root), "LANG": "C.UTF-8"}
        return subprocess.run([self.doveadm, "-c", str(self.config), *args], env=env,
                              capture_output=True, timeout=30)

    def fetch(self, fields: str) -> list:
        out = self.run("-f", "json", "fetch", fields, "all")
        stderr = out.stderr.decode(errors="replace")
        assert out.returncode == 0, stderr
        # Dovecot logs size mismatches, broken names and corrupted files as
        # errors or warnings but may still exit 0: any of them is a failure.
        assert "Error" not in stderr and "Warning" not in stderr and "Panic" not in stderr, stderr
        return json.loads(out.stdout.decode("utf-8"))


@pytest.fixture(scope="module")
def doveadm():
    return doveadm_path()


@pytest.fixture(scope="module")
def delivered(server, doveadm):
    """Send MESSAGES to alice; return {subject: path of the file in new/}."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        for content in MESSAGES.values():
            refused = s.sendmail(SENDER, [RCPT], content, mail_options=["BODY=8BITMIME"])
            assert refused == {}
    files = {}
    for path in server.messages("alice"):
        subject = re.search(rb"^Subject: (.*)$", path.read_bytes(), re.M).group(1).decode()
        files[subject] = path
    assert sorted(files) == sorted(MESSAGES), server.log()
    return files


@pytest.fixture
def scratch():
    # Under /tmp rather than tmp_path: pytest's base directory is mode 0700,
    # which an unprivileged Dovecot could not traverse.
    root = Path(tempfile.mkdtemp(prefix="mailserver-dovecot-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def expected_file(content: bytes) -> bytes:
    """The original message as stored: LF line endings, after our trace headers."""
    return content.replace(b"\r\n", b"\n")


def test_dovecot_fetches_our_messages(server, delivered, doveadm, scratch):
    """doveadm sees each delivered message once, with our trace headers and the exact body."""
    source = server.maildir("alice")
    dovecot = Dovecot(doveadm, scratch, source, "alice")
    fetched = dovecot.fetch("guid flags size.physical size.virtual hdr.subject hdr body text")
    by_subject = {m["hdr.subject"]: m for m in fetched}
    assert len(fetched) == len(MESSAGES) == len(by_subject)
    assert sorted(by_subject) == sorted(MESSAGES)

    for subject, content in MESSAGES.items():
        msg = by_subject[subject]
        on_disk = delivered[subject].read_bytes()
        # Dovecot's full text is the file, byte for byte (as UTF-8).
        assert msg["text"].encode("utf-8") == on_disk
        hdr = msg["hdr"]
        assert hdr.startswith(f"Return-Path: <{SENDER}>\nDelivered-To: {RCPT}\n")
        received = re.search(r"^Received: .*(?:\n[ \t].*)*", hdr, re.M)
        assert received, hdr
        assert "by mx.example.test (mailserver) with ESMTP id" in received.group(0)
        assert f"for <{RCPT}>;" in received.group(0)
        original = expected_file(content)
        assert on_disk.endswith(original)
        header_end = original.index(b"\n\n") + 2
        assert msg["body"].encode("utf-8") == original[header_end:]
        assert msg["flags"] == "\\Recent"  # new mail, nothing seen yet
        # The maildir name's size fields are what Dovecot reports
        m = NAME_SIZES.search(delivered[subject].name)
        assert m, delivered[subject].name
        assert (msg["size.physical"], msg["size.virtual"]) == m.groups()
        assert msg["guid"] == delivered[subject].name

    utf8 = by_subject["dovecot-utf8"]["body"]
    assert utf8.split("\n")[:-1] == [UTF8_LINE, "second line"]
    dots = by_subject["dovecot-dots"]["body"].split("\n")[:-1]
    assert dots == ["first line", ".leading dot", "..two leading dots", ".", "",
                    "   indented line", "last line"]

    # Dovecot took the names as they are: nothing renamed, dropped or added
    names = sorted(p.name for p in (dovecot.maildir / "new").iterdir())
    cur = sorted(p.name.split(":")[0] for p in (dovecot.maildir / "cur").iterdir())
    assert sorted(names + cur) == sorted(p.name for p in delivered.values())


def test_dovecot_computes_the_sizes_in_our_names(server, delivered, doveadm, scratch):
    """With ,S= and ,W= stripped, Dovecot measures the files itself and gets our numbers."""
    source = server.maildir("alice")
    dovecot = Dovecot(doveadm, scratch, source, "alice-bare",
                      rename=lambda name: NAME_SIZES.sub("", name))
    fetched = dovecot.fetch("guid size.physical size.virtual hdr.subject")
    assert len(fetched) == len(MESSAGES)
    for msg in fetched:
        path = delivered[msg["hdr.subject"]]
        size, vsize = NAME_SIZES.search(path.name).groups()
        assert msg["guid"] == NAME_SIZES.sub("", path.name)  # the stripped copy
        assert msg["size.physical"] == size == str(path.stat().st_size)
        assert msg["size.virtual"] == vsize
