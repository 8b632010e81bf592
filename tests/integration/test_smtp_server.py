"""The real twistd process, with real clients: smtplib, swaks, raw sockets."""

from __future__ import annotations

import mailbox
import os
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

pytestmark = pytest.mark.slow


def read_maildir(server, local):
    path = server.maildir(local)
    return [m for m in mailbox.Maildir(str(path), factory=None, create=False)]


def by_subject(server, local, subject):
    if not server.maildir(local).exists():
        return []
    return [m for m in read_maildir(server, local) if m["Subject"] == subject]


class RawClient:
    """A line-oriented SMTP client over a plain socket, for hostile input."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes):
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> str:
        """The final line of the next reply ("250 2.0.0 ...")."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line.decode()

    def close(self):
        self.sock.close()


def test_swaks_delivery(server):
    """swaks gets 250 and the maildir file has Return-Path, Received and Delivered-To."""
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.fail("swaks is not installed (scripts/test.sh installs it)")
    out = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{server.smtp_port}", "--to", "alice@example.test",
         "--from", "sender@example.org", "--header", "Subject: swaks-first", "--body", "from swaks"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "<-  250 2.0.0 Ok: queued as" in out.stdout
    [msg] = by_subject(server, "alice", "swaks-first")
    assert msg["Return-Path"] == "<sender@example.org>"
    assert msg["Delivered-To"] == "alice@example.test"
    assert "by mx.example.test (mailserver) with ESMTP id" in msg["Received"]
    assert "from swaks" in msg.get_payload()


def smtp_source():
    path = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(path):
        pytest.fail("smtp-source is not installed (scripts/test.sh installs postfix)")
    return path


@pytest.mark.parametrize("speak", ["smtp", "lmtp"])
def test_smtp_source_parallel_sessions(server, speak):
    """Postfix's smtp-source: 4 parallel sessions, 10 messages each over one
    connection (-d); every message lands once, with its size and headers."""
    subject = f"smtp-source-{speak}"
    port = server.smtp_port if speak == "smtp" else server.lmtp_port
    args = [smtp_source(), "-s", "4", "-m", "40", "-d", "-l", "2000", "-S", subject,
            "-f", "load@example.org", "-t", "bob@example.test", "-M", "client.example.org"]
    if speak == "lmtp":
        args.append("-L")
    out = subprocess.run(args + [f"127.0.0.1:{port}"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    got = by_subject(server, "bob", subject)
    assert len(got) == 40
    for msg in got:
        assert msg["Return-Path"] == "<load@example.org>"
        assert msg["Delivered-To"] == "bob@example.test"
        body = msg.get_payload().replace("\n", "")  # -l counts CRLFs too
        assert body.startswith("1XXX") and len(body) >= 1900
        with_ = "LMTP" if speak == "lmtp" else "SMTP"
        assert f"with {with_} id" in msg["Received"], msg["Received"]


def test_swaks_starttls(server, tls_files):
    """swaks with STARTTLS: the Received header records ESMTPS and the TLS version."""
    out = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.smtp_port}", "--to", "bob@example.test",
         "--from", "sender@example.org", "--tls", "--header", "Subject: swaks-tls"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    [msg] = by_subject(server, "bob", "swaks-tls")
    assert "with ESMTPS id" in msg["Received"]
    assert "(using TLSv1." in msg["Received"]


def test_smtplib_group_and_alias(server, client_tls):
    """A group reaches each member once; the maildir is readable by mailbox.Maildir."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.starttls(context=client_tls)
        refused = s.sendmail("x@example.org", ["team@example.test", "alice@example.test"],
                             b"Subject: team-mail\r\n\r\nhello team\r\n")
    assert refused == {}
    assert len(by_subject(server, "alice", "team-mail")) == 1
    assert len(by_subject(server, "bob", "team-mail")) == 1


def test_unknown_recipient_refused_at_rcpt(server):
    """Unknown local users get 550 5.1.1 at RCPT; other domains 554 5.7.1."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        assert s.rcpt("nobody@example.test")[0] == 550
        code, text = s.rcpt("someone@example.org")
        assert (code, text[:5]) == (554, b"5.7.1")
        code, text = s.rcpt("../../etc@example.test")
        assert (code, text[:5]) == (501, b"5.1.3")  # not a dot-atom
        code, text = s.rcpt('"../../etc"@example.test')
        assert (code, text[:5]) == (550, b"5.1.1")
    assert not (server.maildir_root.parent / "etc").exists()


def test_lmtp_per_recipient_replies_tcp_and_unix(server):
    """LMTP gives one reply per accepted recipient after DATA, on TCP and UNIX sockets."""
    for host, port in (("127.0.0.1", server.lmtp_port), (server.lmtp_socket, 0)):
        lmtp = smtplib.LMTP(host, port, timeout=30) if port else smtplib.LMTP(host, timeout=30)
        try:
            assert lmtp.ehlo()[0] == 250  # smtplib.LMTP sends LHLO
            assert lmtp.mail("x@example.org")[0] == 250
            assert lmtp.rcpt("alice@example.test")[0] == 250
            assert lmtp.rcpt("nobody@example.test")[0] == 550
            assert lmtp.rcpt("bob@example.test")[0] == 250
            lmtp.putcmd("data")
            assert lmtp.getreply()[0] == 354
            lmtp.send(b"Subject: lmtp-" + str(port).encode() + b"\r\n\r\nbody\r\n.\r\n")
            first = lmtp.getreply()
            second = lmtp.getreply()
            assert first[0] == 250 and b"alice@example.test" in first[1]
            assert second[0] == 250 and b"bob@example.test" in second[1]
            assert lmtp.noop()[0] == 250
        finally:
            lmtp.close()
        subject = f"lmtp-{port}"
        assert len(by_subject(server, "alice", subject)) == 1
        assert len(by_subject(server, "bob", subject)) == 1


SMUGGLING = [
    b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n",
]


@pytest.mark.parametrize("end", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_never_splits_a_message(server, end):
    """A bare-LF/CR fake end of data neither ends the message nor runs the smuggled commands."""
    c = RawClient(server.smtp_port)
    tag = f"smuggle-{SMUGGLING.index(end)}"
    c.send(b"EHLO c\r\n")
    assert c.reply().startswith("250")
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert c.reply().startswith("250")
    assert c.reply().startswith("250")
    assert c.reply().startswith("354")
    c.send(b"Subject: " + tag.encode() + b"\r\n\r\nfirst" + end
           + b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
           + b"Subject: " + tag.encode() + b"-smuggled\r\n\r\nevil\r\n.\r\n")
    assert c.reply().startswith("554 5.6.0")
    c.send(b"NOOP\r\n")
    assert c.reply().startswith("250")
    c.close()
    assert by_subject(server, "bob", tag + "-smuggled") == []
    assert by_subject(server, "alice", tag) == []


def test_starttls_discards_pipelined_plaintext(server, tls_files):
    """Commands sent after STARTTLS but before the handshake are never executed."""
    c = RawClient(server.smtp_port)
    c.send(b"EHLO c\r\n")
    assert c.reply().startswith("250")
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert c.reply().startswith("220")
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    ctx.check_hostname = False
    tls = ctx.wrap_socket(c.sock, server_hostname="mx.example.test")
    c.sock, c.buf = tls, b""
    c.send(b"RCPT TO:<alice@example.test>\r\n")
    # Had the injected MAIL run, this would be a 250; the session is fresh instead.
    assert c.reply().startswith("503 5.5.1")
    c.send(b"EHLO c\r\n")
    ehlo = c.reply()
    assert ehlo.startswith("250")
    c.send(b"QUIT\r\n")
    assert c.reply().startswith("221")
    c.close()


def test_size_limits(server):
    """SIZE is advertised, checked at MAIL, and enforced while data arrives."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        assert s.has_extn("size") and s.esmtp_features["size"] == "200000"
        code, text = s.mail("x@example.org", ["SIZE=300000"])
        assert (code, text[:5]) == (552, b"5.3.4")
        s.mail("x@example.org")
        s.rcpt("alice@example.test")
        code, text = s.data(b"Subject: too-big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 250)
        assert (code, text[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250
    assert by_subject(server, "alice", "too-big") == []


def test_recipient_limit(server):
    """Past max_recipients, RCPT gets 452 4.5.3; the accepted ones still get the mail."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
        s.ehlo()
        s.mail("x@example.org")
        codes = [s.rcpt("alice@example.test")[0] for _ in range(5)]
        code, text = s.rcpt("alice@example.test")
    assert codes == [250] * 5
    assert (code, text[:5]) == (452, b"4.5.3")


def test_error_limit_closes_session(server):
    """Too many errors end the session with 421."""
    c = RawClient(server.smtp_port)
    last = ""
    for _ in range(10):
        c.send(b"BOGUS\r\n")
        last = c.reply()
        if last.startswith("421"):
            break
    assert last.startswith("421 4.7.0")
    c.close()


def test_hostile_input_gets_clear_replies(server):
    """NUL, overlong lines, malformed paths and 8-bit addresses get 5xx with enhanced codes."""
    c = RawClient(server.smtp_port)
    c.send(b"EHLO c\r\n")
    assert c.reply().startswith("250")
    c.send(b"NO\x00OP\r\n")
    assert c.reply().startswith("500 5.5.2")
    c.send(b"NOOP " + b"x" * 600 + b"\r\n")
    assert c.reply().startswith("500 5.5.2")
    c.send(b"MAIL FROM:<bad address>\r\n")
    assert c.reply()[:9] in ("501 5.1.7", "501 5.5.4")
    c.send("MAIL FROM:<jörg@example.org>\r\n".encode())
    assert c.reply().startswith("553 5.6.7")
    c.send("MAIL FROM:<jörg@example.org> SMTPUTF8\r\n".encode())
    assert c.reply().startswith("250")
    c.send(b"QUIT\r\n")
    assert c.reply().startswith("221")
    c.close()
