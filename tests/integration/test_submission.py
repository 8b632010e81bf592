"""Submission (RFC 6409) against the real ``twistd -n mailserver`` process.

One server for the module: submission with STARTTLS (the 587 role), with TLS
from the first byte (465), and with plaintext AUTH (a loopback-only listener,
for the ESMTPA trace), beside the MX listener (the port 25 role, no AUTH,
nobody trusted to relay).  Users come from an LDIF file: the quick-start
users (alice owns alice@, alice.liddell@ and the postmaster@ alias) plus a
few logins kept for one test each, so that the failed-login throttle and the
rate limit, which count per login and per client address, never spill from
one test into another.  Tests that fail logins connect from a loopback
address of their own (127.0.0.66 and the like) for the same reason.  Mail to
``outside.example`` leaves through the queue for Postfix's ``smtp-sink``.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import os
import smtplib
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from tests.support.server import REPO, MailServer, free_port, wait_for
from tests.support.sink import SmtpSink, require_smtp_sink

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
SERVER_NAME = "mx.example.test"
OUTSIDE = "outside.example"
FAILURE_DELAY = 0.2
MAX_FAILURE_DELAY = 0.4
MAX_FAILURES = 4
MESSAGES_PER_HOUR = 5

PASSWORDS = {uid: f"{uid}-password" for uid in ("alice", "bob", "carol", "dave", "erin", "frank")}

EXTRA_USERS = "".join(f"""
dn: uid={uid},ou=people,dc=example,dc=test
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: inetOrgPerson
uid: {uid}
cn: {uid.title()} Test
sn: Test
mail: {uid}@example.test
userPassword: {uid}-password
""" for uid in ("carol", "dave", "erin", "frank")) + """
dn: cn=shared,ou=groups,dc=example,dc=test
objectClass: top
objectClass: nisMailAlias
objectClass: inetLocalMailRecipient
cn: shared
mailLocalAddress: shared@example.test
rfc822MailMember: alice@example.test
rfc822MailMember: bob@example.test
"""


def write_users(path: Path) -> Path:
    """The quick-start LDIF (alice, bob, the postmaster alias, the team group)
    plus carol, dave, erin and frank, each kept for one test, and an alias
    shared@ routing to alice and bob (a list, nobody's identity)."""
    text = (REPO / "etc" / "quickstart-users.ldif").read_text()
    path.write_text(text.rstrip("\n") + "\n" + EXTRA_USERS)
    return path


@dataclass
class Submission:
    """The server and the ports of its listeners."""

    server: MailServer
    starttls_port: int  # 587 role
    implicit_port: int  # 465 role
    plain_port: int  # submission without TLS, plaintext_auth = true
    sink: Optional[SmtpSink]

    @property
    def mx_port(self) -> int:  # port 25 role
        return self.server.smtp_port


def start_submission_server(workdir: Path, tls_files: dict, *, sink: Optional[SmtpSink] = None,
                            submission: Optional[dict] = None) -> Submission:
    """A server with three submission listeners beside its MX and LMTP ones."""
    ports = [free_port() for _ in range(3)]
    Path(workdir).mkdir(parents=True, exist_ok=True)
    users = write_users(Path(workdir) / "users.ldif")
    relay = {"trusted_networks": []}  # 127.0.0.0/8 is trusted by default: not here
    if sink is not None:
        relay["transports"] = {OUTSIDE: f"smtp:[127.0.0.1]:{sink.port}"}
    server = MailServer(
        workdir,
        directory={"backend": "ldif", "ldif_file": str(users), "base_dn": "dc=example,dc=test"},
        tls={"certificate": tls_files["certificate"], "private_key": tls_files["private_key"]},
        relay=relay,
        queue={"min_backoff": 3600.0, "scan_interval": 1.0},
        extra_tables={
            "auth": {"failure_delay": FAILURE_DELAY, "max_failure_delay": MAX_FAILURE_DELAY,
                     "max_failures": MAX_FAILURES},
            "submission": submission or {},
        },
        extra_listeners=[
            {"name": "submission", "protocol": "submission", "address": f"{HOST}:{ports[0]}"},
            {"name": "submissions", "protocol": "submission", "address": f"{HOST}:{ports[1]}",
             "tls": "implicit"},
            {"name": "submission-plain", "protocol": "submission",
             "address": f"{HOST}:{ports[2]}", "tls": "none", "plaintext_auth": True},
        ],
    )
    server.start()
    return Submission(server, *ports, sink=sink)


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    require_smtp_sink()
    s = SmtpSink(dump_dir=tmp_path_factory.mktemp("sink") / "dumps").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sub(tmp_path_factory, tls_files, sink):
    """One server for the module; only carol and frank are held to the hourly message limit."""
    srv = start_submission_server(
        tmp_path_factory.mktemp("submission"), tls_files, sink=sink,
        submission={"messages_per_hour": MESSAGES_PER_HOUR,
                    "rate_limit_exempt": ["alice", "bob", "dave", "erin"]})
    yield srv
    srv.server.stop()


# --- clients ----------------------------------------------------------------------------

@dataclass
class Answer:
    """One SMTP reply: its code and its lines without the code."""

    code: int
    lines: List[str]

    @property
    def enhanced(self) -> str:
        return self.lines[-1].split(" ", 1)[0]

    @property
    def pair(self) -> tuple:
        """(code, enhanced code), what most assertions compare."""
        return self.code, self.enhanced


class Dialogue:
    """A raw SMTP client: exactly the bytes a test writes go out, whole
    replies come back.  ``source`` binds the client to another loopback
    address (a client of its own for the login throttle)."""

    def __init__(self, port: int, *, context: Optional[ssl.SSLContext] = None,
                 source: Optional[str] = None, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=SERVER_NAME)
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Answer:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(f"connection closed; unread: {self.buf!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8"))
            if line[3:4] != b"-":
                return Answer(int(lines[0][:3]), [x[4:] for x in lines])

    def cmd(self, line: str) -> Answer:
        self.send(line.encode("utf-8") + b"\r\n")
        return self.reply()

    def ehlo(self) -> List[str]:
        answer = self.cmd("EHLO client.example")
        assert answer.code == 250, answer
        return [x.upper() for x in answer.lines[1:]]

    def starttls(self, context: ssl.SSLContext) -> None:
        answer = self.cmd("STARTTLS")
        assert answer.pair == (220, "2.0.0"), answer
        assert self.buf == b""
        self.sock = context.wrap_socket(self.sock, server_hostname=SERVER_NAME)

    def closed_by_server(self) -> bool:
        """True when the server has closed: nothing more to read, then EOF."""
        assert self.buf == b"", self.buf
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLEOFError):
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Dialogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def plain(login: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{login}\0{password}".encode())


def tls_dialogue(sub: Submission, context, **kwargs) -> Dialogue:
    """A session on the STARTTLS submission port, after STARTTLS and EHLO."""
    d = Dialogue(sub.starttls_port, **kwargs)
    d.ehlo()
    d.starttls(context)
    d.ehlo()
    return d


def smtp_starttls(sub: Submission, context) -> smtplib.SMTP:
    s = smtplib.SMTP(HOST, sub.starttls_port, timeout=15)
    s.ehlo("client.example")
    s.starttls(context=context)
    s.ehlo("client.example")
    return s


def message(subject: str, *, sender: str = "alice@example.test", to: str = "bob@example.test",
            extra: str = "", body: str = "Hello from the submission tests.\r\n") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\n{body}").encode()


def data(d: Dialogue, content: bytes) -> Answer:
    """DATA, then ``content`` (CR LF lines, no dot-stuffing needed) and the final dot."""
    assert d.cmd("DATA").code == 354
    d.send(content + b".\r\n")
    return d.reply()


def delivered(server: MailServer, local: str, subject: str) -> list:
    """(raw bytes, parsed message) of the files in local's maildir with that Subject."""
    found = []
    for path in server.messages(local):
        raw = path.read_bytes()
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        if msg["Subject"] == subject:
            found.append((raw, msg))
    return found


def one_delivered(server: MailServer, local: str, subject: str):
    [(raw, msg)] = wait_for(lambda: delivered(server, local, subject), f"{subject} for {local}")
    return raw, msg


def sink_messages(sink: SmtpSink, subject: str) -> list:
    return [m for m in sink.messages() if m.data and m.header("Subject") == subject]


# --- delivery with smtplib ------------------------------------------------------------------

def test_starttls_auth_plain_local_delivery_adds_message_id_and_date(sub, client_tls):
    """AUTH PLAIN after STARTTLS delivers locally with Received "with ESMTPSA" and a Message-ID and
    Date added."""
    with smtp_starttls(sub, client_tls) as s:
        s.user, s.password = "alice", PASSWORDS["alice"]
        code, text = s.auth("PLAIN", s.auth_plain)
        assert (code, text.split()[0]) == (235, b"2.7.0")
        assert s.sendmail("alice@example.test", ["bob@example.test"],
                          message("plain-local")) == {}
    raw, msg = one_delivered(sub.server, "bob", "plain-local")
    assert raw.startswith(b"Return-Path: <alice@example.test>\n")
    received = msg.get_all("Received")
    assert len(received) == 1
    assert f"by {SERVER_NAME} (mailserver) with ESMTPSA id" in received[0]
    [message_id] = msg.get_all("Message-ID")
    assert message_id.endswith(f"@{SERVER_NAME}>") and message_id.startswith("<")
    [date] = msg.get_all("Date")
    assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 300
    # The added fields sit below our Received line, above the client's own.
    header = raw.split(b"\n\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in header.split("\n") if line[:1] not in ("\t", " ")]
    assert names.index("Received") < names.index("Message-ID") < names.index("From")
    assert names.index("Received") < names.index("Date") < names.index("From")
    assert raw.endswith(b"\n\nHello from the submission tests.\n")


def test_starttls_auth_login_keeps_message_id_and_date(sub, client_tls):
    """AUTH LOGIN (both without and with an initial response) works, and a client's Message-ID and
    Date are kept."""
    for initial_response_ok, subject in ((False, "login-kept-1"), (True, "login-kept-2")):
        with smtp_starttls(sub, client_tls) as s:
            s.user, s.password = "alice", PASSWORDS["alice"]
            code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=initial_response_ok)
            assert code == 235
            extra = (f"Message-ID: <{subject}@client.example>\r\n"
                     "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n")
            assert s.sendmail("alice@example.test", ["bob@example.test"],
                              message(subject, extra=extra)) == {}
        _, msg = one_delivered(sub.server, "bob", subject)
        assert msg.get_all("Message-ID") == [f"<{subject}@client.example>"]
        assert msg.get_all("Date") == ["Mon, 01 Jan 2024 10:00:00 +0000"]
        assert "with ESMTPSA" in msg["Received"]


def test_relay_to_a_remote_address_reaches_the_sink(sub, client_tls):
    """An authenticated user relays to an outside domain; the message arrives at the sink with its
    trace."""
    with smtp_starttls(sub, client_tls) as s:
        s.login("alice", PASSWORDS["alice"])
        assert s.sendmail("alice@example.test", [f"carol@{OUTSIDE}"],
                          message("remote-1", to=f"carol@{OUTSIDE}")) == {}
    [m] = wait_for(lambda: sink_messages(sub.sink, "remote-1"), "remote-1 at the sink")
    assert m.sender == "alice@example.test"
    assert m.recipients == [f"carol@{OUTSIDE}"]
    msg = m.message()
    assert f"by {SERVER_NAME} (mailserver) with ESMTPSA id" in msg["Received"]
    assert msg["Message-ID"].endswith(f"@{SERVER_NAME}>")
    assert msg["Date"]


def test_implicit_tls_port(sub, client_tls):
    """On the implicit-TLS port AUTH is offered at once and mail is delivered with ESMTPSA."""
    with smtplib.SMTP_SSL(HOST, sub.implicit_port, context=client_tls, timeout=15) as s:
        s.ehlo("client.example")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        s.login("alice", PASSWORDS["alice"])
        assert s.sendmail("alice@example.test", ["bob@example.test"],
                          message("implicit-1")) == {}
    _, msg = one_delivered(sub.server, "bob", "implicit-1")
    assert f"by {SERVER_NAME} (mailserver) with ESMTPSA id" in msg["Received"]


def test_plaintext_auth_listener_says_esmtpa(sub):
    """On a listener allowing AUTH without TLS the Received line says ESMTPA."""
    with smtplib.SMTP(HOST, sub.plain_port, timeout=15) as s:
        s.ehlo("client.example")
        assert s.has_extn("auth")
        s.login("alice", PASSWORDS["alice"])
        assert s.sendmail("alice@example.test", ["bob@example.test"], message("esmtpa-1")) == {}
    _, msg = one_delivered(sub.server, "bob", "esmtpa-1")
    assert f"by {SERVER_NAME} (mailserver) with ESMTPA id" in msg["Received"]


@pytest.mark.parametrize("login", ["alice", "alice@example.test"])
def test_login_by_uid_or_address(sub, client_tls, login):
    """A user logs in with the uid or the mail address alike, and may then send as itself."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain(login, PASSWORDS['alice'])}").pair == (235, "2.7.0")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")


# --- order of things: TLS first, then AUTH, then MAIL -------------------------------------

def test_auth_before_starttls_is_refused(sub):
    """AUTH before STARTTLS on the 587 listener gets 530 5.7.0."""
    with Dialogue(sub.starttls_port) as d:
        d.ehlo()
        answer = d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}")
        assert answer.pair == (530, "5.7.0")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")


def test_auth_advertised_only_after_tls(sub, client_tls):
    """EHLO offers STARTTLS and no AUTH before TLS, and AUTH PLAIN LOGIN and no STARTTLS after."""
    with smtplib.SMTP(HOST, sub.starttls_port, timeout=15) as s:
        s.ehlo("client.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        s.starttls(context=client_tls)
        s.ehlo("client.example")
        assert s.has_extn("auth") and not s.has_extn("starttls")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


def test_mail_before_auth_is_refused(sub, client_tls):
    """MAIL after STARTTLS but before AUTH gets 530 5.7.0, and nothing is relayed."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")
        assert d.cmd("RCPT TO:<bob@example.test>").code == 503


def test_plaintext_pipelined_after_starttls_is_discarded(sub, client_tls):
    """An AUTH pipelined in clear text behind STARTTLS is never executed (RFC 3207 4.2)."""
    with Dialogue(sub.starttls_port) as d:
        d.ehlo()
        d.send(b"STARTTLS\r\nAUTH PLAIN " + plain("alice", PASSWORDS["alice"]).encode() + b"\r\n")
        assert d.reply().pair == (220, "2.0.0")
        assert d.buf == b""
        d.sock = client_tls.wrap_socket(d.sock, server_hostname=SERVER_NAME)
        # The first reply after the handshake answers EHLO, not the injected AUTH.
        answer = d.cmd("EHLO client.example")
        assert answer.code == 250 and answer.lines[0].startswith(SERVER_NAME)
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")
        assert d.cmd("NOOP").pair == (250, "2.0.0")  # no stray reply was queued


# --- failed logins ------------------------------------------------------------------------

def test_wrong_password_and_unknown_user_look_alike(sub, client_tls):
    """A wrong password and an unknown login both get 535 5.7.8 with the same text, after the
    failure delay."""
    with tls_dialogue(sub, client_tls, source="127.0.0.70") as d:
        started = time.monotonic()
        wrong = d.cmd(f"AUTH PLAIN {plain('erin', 'not-her-password')}")
        assert time.monotonic() - started >= FAILURE_DELAY
        unknown = d.cmd(f"AUTH PLAIN {plain('nosuchuser', 'whatever')}")
        assert wrong.pair == unknown.pair == (535, "5.7.8")
        assert wrong.lines == unknown.lines
        # The session goes on, and the right password still works.
        assert d.cmd(f"AUTH PLAIN {plain('erin', PASSWORDS['erin'])}").pair == (235, "2.7.0")


def test_failed_logins_are_throttled_then_blocked(sub, client_tls):
    """Each failure waits at least failure_delay, growing; the max_failures-th gets 421 4.7.0 and a
    hang-up, and so does the next try from that client or for that account."""
    source = "127.0.0.66"
    with tls_dialogue(sub, client_tls, source=source) as d:
        took = []
        for _ in range(MAX_FAILURES - 1):
            started = time.monotonic()
            assert d.cmd(f"AUTH PLAIN {plain('dave', 'guess')}").pair == (535, "5.7.8")
            took.append(time.monotonic() - started)
        assert all(t >= FAILURE_DELAY for t in took), took
        assert took[1] >= MAX_FAILURE_DELAY, took  # the delay doubled (up to its cap)
        assert d.cmd(f"AUTH PLAIN {plain('dave', 'guess')}").pair == (421, "4.7.0")
        assert d.closed_by_server()
    # The client address is blocked, even with another account's right password...
    with tls_dialogue(sub, client_tls, source=source) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (421, "4.7.0")
        assert d.closed_by_server()
    # ...and the account is blocked, even from another address with its right password.
    with tls_dialogue(sub, client_tls, source="127.0.0.67") as d:
        assert d.cmd(f"AUTH PLAIN {plain('dave', PASSWORDS['dave'])}").pair == (421, "4.7.0")
        assert d.closed_by_server()
    # Other clients and accounts are unaffected.
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")


# --- the SASL exchange over the wire ----------------------------------------------------------

@pytest.mark.parametrize("command, expected", [
    ("AUTH PLAIN !!!notbase64", (501, "5.5.2")),
    ("AUTH PLAIN " + b64(b"alice\0alice-password"), (501, "5.5.2")),  # one NUL
    ("AUTH PLAIN " + b64(b"\0alice\0alice-password\0"), (501, "5.5.2")),  # three NULs
    ("AUTH PLAIN " + b64(b"alicealice-password"), (501, "5.5.2")),  # no NUL
    ("AUTH PLAIN " + b64(b"bob\0alice\0alice-password"), (535, "5.7.8")),  # authzid
    ("AUTH PLAIN " + b64(b"\0alice\0alice-password")[:-1], (501, "5.5.2")),  # bad padding
    ("AUTH CRAM-MD5", (504, "5.5.4")),
], ids=["bad-base64", "missing-nul", "extra-nul", "no-nul", "other-authzid", "bad-padding",
        "unknown-mechanism"])
def test_auth_plain_malformed(sub, client_tls, command, expected):
    """Malformed AUTH PLAIN data is refused with the right code, and the session is not logged
    in."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(command).pair == expected
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")
        # A correct exchange still works in the same session.
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")


def test_auth_plain_response_line_too_long(sub, client_tls):
    """A response line over 12288 octets after the 334 gets 500 5.5.6 and ends the exchange."""
    with tls_dialogue(sub, client_tls) as d:
        answer = d.cmd("AUTH PLAIN")
        assert answer.code == 334 and answer.lines == [""]
        assert d.cmd("A" * 13000).pair == (500, "5.5.6")
        assert d.cmd("NOOP").pair == (250, "2.0.0")  # back to commands
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")


def test_auth_initial_response_too_long(sub, client_tls):
    """An initial response over 12288 octets is malformed (501 5.5.2); a command line past that
    allowance is too long (500 5.5.2)."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd("AUTH PLAIN " + "A" * 12400).pair == (501, "5.5.2")
        assert d.cmd("AUTH PLAIN " + "A" * 13000).pair == (500, "5.5.2")
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")


def test_auth_cancelled_with_star(sub, client_tls):
    """"*" in answer to a challenge cancels the exchange with 501 5.7.0, for PLAIN and LOGIN."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd("AUTH PLAIN").code == 334
        assert d.cmd("*").pair == (501, "5.7.0")
        answer = d.cmd("AUTH LOGIN")
        assert answer.code == 334 and base64.b64decode(answer.lines[0]) == b"Username:"
        answer = d.cmd(b64(b"alice"))
        assert answer.code == 334 and base64.b64decode(answer.lines[0]) == b"Password:"
        assert d.cmd("*").pair == (501, "5.7.0")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (530, "5.7.0")


def test_second_auth_after_success(sub, client_tls):
    """A second AUTH after a successful one gets 503 5.5.1 and the first login stands."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")
        assert d.cmd(f"AUTH PLAIN {plain('bob', PASSWORDS['bob'])}").pair == (503, "5.5.1")
        assert d.cmd("MAIL FROM:<bob@example.test>").pair == (553, "5.7.1")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")


# --- sender ownership ------------------------------------------------------------------

def test_spoofed_envelope_sender_is_refused(sub, client_tls):
    """MAIL FROM an address the login does not own gets 553 5.7.1, also in another case or a remote
    domain."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")
        for sender in ("bob@example.test", "BOB@Example.Test", "team@example.test",
                       f"alice@{OUTSIDE}", "alice@example.test.evil"):
            assert d.cmd(f"MAIL FROM:<{sender}>").pair == (553, "5.7.1"), sender
        assert d.cmd("MAIL FROM:<ALICE@Example.Test>").pair == (250, "2.1.0")


def test_spoofed_from_header_is_refused_after_data(sub, client_tls):
    """Own envelope sender but a From: header naming someone else gets 550 5.7.1 after the data, and
    nothing is delivered."""
    with smtp_starttls(sub, client_tls) as s:
        s.login("alice", PASSWORDS["alice"])
        for subject, sender in (("from-spoof-1", "Bob <bob@example.test>"),
                                ("from-spoof-2", "alice@example.test, bob@example.test")):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("alice@example.test", ["bob@example.test"],
                           message(subject, sender=sender))
            assert refused.value.smtp_code == 550
            assert refused.value.smtp_error.split()[0] == b"5.7.1"
        # The session is usable afterwards.
        assert s.sendmail("alice@example.test", ["bob@example.test"],
                          message("from-spoof-3", sender="Alice <alice@example.test>")) == {}
    one_delivered(sub.server, "bob", "from-spoof-3")
    assert delivered(sub.server, "bob", "from-spoof-1") == []
    assert delivered(sub.server, "bob", "from-spoof-2") == []


def test_null_sender_allowed_but_from_header_checked(sub, client_tls):
    """The null envelope sender is accepted from a login, but its From: header must still be
    owned."""
    with smtp_starttls(sub, client_tls) as s:
        s.login("alice", PASSWORDS["alice"])
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("<>", ["bob@example.test"], message("null-spoof", sender="bob@example.test"))
        assert (refused.value.smtp_code, refused.value.smtp_error.split()[0]) == (550, b"5.7.1")
        assert s.sendmail("<>", ["bob@example.test"], message("null-own")) == {}
    raw, _ = one_delivered(sub.server, "bob", "null-own")
    assert raw.startswith(b"Return-Path: <>\n")
    assert delivered(sub.server, "bob", "null-spoof") == []


def test_shared_alias_is_not_an_identity(sub, client_tls):
    """An alias routing to alice and to bob is no one's identity: 553 5.7.1 as envelope sender, 550
    5.7.1 as From:."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")
        assert d.cmd("MAIL FROM:<shared@example.test>").pair == (553, "5.7.1")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")
        assert d.cmd("RCPT TO:<bob@example.test>").pair == (250, "2.1.5")
        assert data(d, message("shared-from", sender="shared@example.test")).pair == (550, "5.7.1")
    assert delivered(sub.server, "bob", "shared-from") == []


def test_login_survives_ehlo_and_rset(sub, client_tls):
    """A new EHLO or RSET resets the transaction but not the login (RFC 4954 4)."""
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")
        assert d.cmd("RSET").pair == (250, "2.0.0")
        d.ehlo()
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")
        assert d.cmd("RCPT TO:<bob@example.test>").pair == (250, "2.1.5")
        assert data(d, message("after-ehlo")).pair == (250, "2.0.0")
    one_delivered(sub.server, "bob", "after-ehlo")


def from_check_dialogue(sub, client_tls) -> Dialogue:
    """alice logged in, envelope alice -> bob accepted, ready for DATA."""
    d = tls_dialogue(sub, client_tls)
    assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (235, "2.7.0")
    assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")
    assert d.cmd("RCPT TO:<bob@example.test>").pair == (250, "2.1.5")
    return d


def test_from_header_beyond_the_tenth_field_is_checked(sub, client_tls):
    """A From: field after ten owned ones, naming someone else, is refused with 550 5.7.1."""
    extra = "From: alice@example.test\r\n" * 9 + "From: bob@example.test\r\n"
    with from_check_dialogue(sub, client_tls) as d:
        answer = data(d, message("eleven-froms", extra=extra))
    assert delivered(sub.server, "bob", "eleven-froms") == []
    assert answer.pair == (550, "5.7.1")


def test_from_header_address_after_8192_octets_is_checked(sub, client_tls):
    """An unowned From: address hidden past 8192 octets of folded comments is refused with 550
    5.7.1."""
    first = " alice@example.test"
    pads = [" (" + "x" * 897 + ")"] * 9
    pads.append(" (" + "x" * (8192 - len(first) - 900 * 9 - 3) + ")")
    assert len(first + "".join(pads)) == 8192
    raw = ("From:" + first + "\r\n" + "".join(p + "\r\n" for p in pads)
           + " , bob@example.test\r\nTo: bob@example.test\r\nSubject: long-from\r\n\r\nhi\r\n")
    with from_check_dialogue(sub, client_tls) as d:
        answer = data(d, raw.encode())
    assert delivered(sub.server, "bob", "long-from") == []
    assert answer.pair == (550, "5.7.1")


@pytest.mark.parametrize("address", ["postmaster@example.test", "alice.liddell@example.test"])
def test_sending_as_an_owned_alias(sub, client_tls, address):
    """An alias routing only to the user and the user's other address are accepted as envelope
    sender and From:."""
    subject = f"alias-{address.split('@')[0]}"
    with smtp_starttls(sub, client_tls) as s:
        s.login("alice", PASSWORDS["alice"])
        assert s.sendmail(address, ["bob@example.test"],
                          message(subject, sender=f"Alice <{address.upper()}>")) == {}
    raw, msg = one_delivered(sub.server, "bob", subject)
    assert raw.startswith(f"Return-Path: <{address}>\n".encode())


# --- rate limit ----------------------------------------------------------------------------

def test_message_rate_limit(sub, client_tls):
    """The (N+1)th message of a login within the hour gets 450 4.7.1 at MAIL."""
    with smtp_starttls(sub, client_tls) as s:
        s.login("carol", PASSWORDS["carol"])
        for i in range(MESSAGES_PER_HOUR):
            assert s.sendmail("carol@example.test", ["bob@example.test"],
                              message(f"rate-{i}", sender="carol@example.test")) == {}
        code, text = s.mail("carol@example.test")
        assert (code, text.split()[0]) == (450, b"4.7.1")
    # A new session does not reset the count; other logins are not affected.
    with tls_dialogue(sub, client_tls) as d:
        assert d.cmd(f"AUTH PLAIN {plain('carol', PASSWORDS['carol'])}").pair == (235, "2.7.0")
        assert d.cmd("MAIL FROM:<carol@example.test>").pair == (450, "4.7.1")
    for i in range(MESSAGES_PER_HOUR):
        one_delivered(sub.server, "bob", f"rate-{i}")


def test_message_rate_limit_holds_for_concurrent_sessions(sub, client_tls):
    """Six sessions of one login at once, with a limit of five an hour, get at most five messages
    accepted; the rest 450 4.7.1."""
    sessions = [tls_dialogue(sub, client_tls) for _ in range(MESSAGES_PER_HOUR + 1)]
    try:
        answers = []
        for d in sessions:
            assert d.cmd(f"AUTH PLAIN {plain('frank', PASSWORDS['frank'])}").pair == (235, "2.7.0")
        mails = [d.cmd("MAIL FROM:<frank@example.test>") for d in sessions]
        open_ = [d for d, a in zip(sessions, mails) if a.code == 250]
        answers += [a for a in mails if a.code != 250]
        rcpts = [d.cmd("RCPT TO:<bob@example.test>") for d in open_]
        answers += [a for a in rcpts if a.code != 250]
        for d, a in zip(open_, rcpts):
            if a.code == 250:
                answers.append(data(d, message("concurrent", sender="frank@example.test")))
    finally:
        for d in sessions:
            d.close()
    accepted = [a for a in answers if a.code == 250]
    assert all(a.pair == (450, "4.7.1") for a in answers if a.code != 250), answers
    assert len(accepted) <= MESSAGES_PER_HOUR, answers


# --- the MX listener is no open relay ---------------------------------------------------

RELAY_TRICKS = [
    # address, reply: local parts with routing characters are looked up as
    # they are (unknown here); everything else is not local, so relaying.
    ("relaytest%outside.example@example.test", (550, "5.1.1")),
    ("@example.test:relaytest@outside.example", (554, "5.7.1")),
    ("outside.example!relaytest@example.test", (550, "5.1.1")),
    ('"relaytest@outside.example"@example.test', (550, "5.1.1")),
    ("relaytest@outside.example", (554, "5.7.1")),
    ("relaytest@[192.0.2.1]", (554, "5.7.1")),
    ("relaytest@[127.0.0.1]", (554, "5.7.1")),  # our own address is not a local domain
    ("relaytest@[IPv6:2001:db8::1]", (554, "5.7.1")),
]


def queue_is_empty(server: MailServer) -> bool:
    for state in ("incoming", "active", "deferred", "hold", "corrupt"):
        try:
            names = os.listdir(server.queue_dir / state)
        except FileNotFoundError:
            continue
        if any(not n.startswith(".") for n in names):
            return False
    return True


def test_mx_listener_is_not_an_open_relay(sub):
    """From an untrusted client the port 25 listener refuses every relay trick, and nothing reaches
    the sink."""
    with Dialogue(sub.mx_port) as d:
        d.ehlo()
        assert d.cmd("MAIL FROM:<someone@elsewhere.example>").pair == (250, "2.1.0")
        for address, expected in RELAY_TRICKS:
            assert d.cmd(f"RCPT TO:<{address}>").pair == expected, address
        # A trailing dot, and a second @, are not even addresses.
        for address in ("relaytest@outside.example.", "relaytest@example.test@outside.example",
                        "relaytest@outside.example@example.test"):
            assert d.cmd(f"RCPT TO:<{address}>").pair == (501, "5.1.3"), address
        # One local recipient lets the message through, to that recipient only.
        assert d.cmd("RCPT TO:<bob@example.test>").pair == (250, "2.1.5")
        assert d.cmd("DATA").code == 354
        d.send(b"From: someone@elsewhere.example\r\nSubject: relay-tricks\r\n\r\nhi\r\n.\r\n")
        assert d.reply().pair == (250, "2.0.0")
        assert d.cmd("QUIT").code == 221
    raw, _ = one_delivered(sub.server, "bob", "relay-tricks")
    assert b"relaytest" not in raw.split(b"\n\n", 1)[0]
    # The queue drains (mail of other tests included); none of it was ours.
    wait_for(lambda: queue_is_empty(sub.server), "an empty queue")
    assert not [m for m in sub.sink.messages()
                if any("relaytest" in r for r in m.recipients) or
                (m.data and m.header("Subject") == "relay-tricks")]


def test_auth_on_the_mx_listener_is_not_enabled(sub, client_tls):
    """The port 25 listener offers no AUTH, before or after STARTTLS, and answers AUTH with 503
    5.5.1."""
    with Dialogue(sub.mx_port) as d:
        assert not any(x.startswith("AUTH") for x in d.ehlo())
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (503, "5.5.1")
        d.starttls(client_tls)
        assert not any(x.startswith("AUTH") for x in d.ehlo())
        assert d.cmd(f"AUTH PLAIN {plain('alice', PASSWORDS['alice'])}").pair == (503, "5.5.1")
        assert d.cmd("MAIL FROM:<alice@example.test>").pair == (250, "2.1.0")
        assert d.cmd(f"RCPT TO:<relaytest@{OUTSIDE}>").pair == (554, "5.7.1")
