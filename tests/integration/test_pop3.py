"""POP3 and POP3S against the real ``twistd -n mailserver`` process, with poplib and raw sockets.

One server for the module: a POP3 listener with STLS (the 110 role), one
with TLS from the first byte (995), and one with STLS that also allows
USER/PASS before TLS (``plaintext_auth``, for raw plaintext dialogues), beside
the MX listener the tests deliver through.  Users come from an LDIF file: the
quick-start users plus one mailbox per test, so that no test sees another's
messages or lock.  Failed logins come from loopback addresses of their own
(127.0.0.77 and the like): the throttle counts per client address.  The
crashed-server test starts a server of its own.
"""

from __future__ import annotations

import contextlib
import os
import poplib
import smtplib
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from tests.conftest import embedded_directory
from tests.support.server import REPO, MailServer, wait_for

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
SERVER_NAME = "mx.example.test"
DOMAIN = "example.test"
MAX_FAILURES = 3
GREETING = b"+OK mx.example.test POP3 ready"
NO_PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed"
BLOCKED = b"-ERR [SYS/TEMP] Too many failed logins, try again later"
IN_USE = b"-ERR [IN-USE] Mailbox is locked by another session"

# One mailbox per test; the password of each is "<uid>-password".
USERS = ("reader", "noeol", "rset", "dele", "drop", "during", "seen", "busy", "dove", "carol",
         "numbers", "big", "fetch-stls", "fetch-keep", "fetch-pop3s", "getmail-keep",
         "getmail-delete", "getmail-plain", "pipe")


def password(uid: str) -> str:
    return f"{uid}-password"


def write_users(path: Path) -> Path:
    """The quick-start LDIF (alice, bob, ...) plus one user per test."""
    extra = "".join(f"""
dn: uid={uid},ou=people,dc=example,dc=test
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: inetOrgPerson
uid: {uid}
cn: {uid} Test
sn: Test
mail: {uid}@{DOMAIN}
userPassword: {password(uid)}
""" for uid in USERS)
    text = (REPO / "etc" / "quickstart-users.ldif").read_text()
    path.write_text(text.rstrip("\n") + "\n" + extra)
    return path


@dataclass
class POP3Server:
    """The server and the ports of its POP3 listeners."""

    server: MailServer
    stls_port: int  # 110 role: STLS, no USER before TLS
    pop3s_port: int  # 995 role
    plain_port: int  # STLS offered, USER/PASS allowed before TLS
    ca: str  # the test CA's certificate (PEM file), for clients that check the server's

    def maildir(self, uid: str) -> Path:
        return self.server.maildir(uid)


@contextlib.contextmanager
def reserved_ports(n: int) -> Iterator[List[int]]:
    """n distinct free ports, kept bound inside the block: a MailServer made there cannot pick
    one of them for its own SMTP and LMTP listeners."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_server(make) -> MailServer:
    """make() -> an unstarted MailServer on fresh free ports; started, with one more try (new
    ports) when another process took a port between choosing and listening."""
    server = make()
    try:
        return server.start()
    except RuntimeError as e:
        if "Address already in use" not in str(e):
            raise
    return make().start()


def start_pop3_server(workdir: Path, tls_files: dict) -> POP3Server:
    """A server with three POP3 listeners beside its MX and LMTP ones."""
    workdir.mkdir(parents=True, exist_ok=True)
    users = write_users(workdir / "users.ldif")
    ports: List[int] = []

    def make() -> MailServer:
        with reserved_ports(3) as chosen:
            ports[:] = chosen
            return make_server()

    def make_server() -> MailServer:
        return MailServer(
            workdir,
            directory={"backend": "ldif", "ldif_file": str(users),
                       "base_dn": "dc=example,dc=test"},
            tls={"certificate": tls_files["certificate"],
                 "private_key": tls_files["private_key"]},
            extra_tables={"auth": {"failure_delay": 0.1, "max_failure_delay": 0.2,
                                   "max_failures": MAX_FAILURES}},
            extra_listeners=[
                {"name": "pop3", "protocol": "pop3", "address": f"{HOST}:{ports[0]}",
                 "tls": "starttls"},
                {"name": "pop3s", "protocol": "pop3", "address": f"{HOST}:{ports[1]}",
                 "tls": "implicit"},
                {"name": "pop3-plain", "protocol": "pop3", "address": f"{HOST}:{ports[2]}",
                 "tls": "starttls", "plaintext_auth": True},
            ],
        )

    server = start_server(make)
    return POP3Server(server, *ports, ca=tls_files["ca"])


@pytest.fixture(scope="module")
def pop(tmp_path_factory, tls_files):
    srv = start_pop3_server(tmp_path_factory.mktemp("pop3"), tls_files)
    yield srv
    srv.server.stop()


# --- delivery and the maildir ---------------------------------------------------------------

def deliver(srv: POP3Server, uid: str, subject: str,
            body: str = "Hello from the POP3 tests.\r\n") -> Path:
    """Send one message to uid through the MX listener; the file it became in new/."""
    text = (f"From: sender@example.org\r\nTo: {uid}@{DOMAIN}\r\nSubject: {subject}\r\n"
            f"\r\n{body}")
    with smtplib.SMTP(HOST, srv.server.smtp_port, timeout=15) as s:
        assert s.sendmail("sender@example.org", [f"{uid}@{DOMAIN}"], text.encode()) == {}
    return wait_for(lambda: find(srv, uid, subject), f"{subject} in {uid}'s new/")


def find(srv: POP3Server, uid: str, subject: str) -> Optional[Path]:
    for sub in ("new", "cur"):
        d = srv.maildir(uid) / sub
        for path in sorted(d.iterdir()) if d.is_dir() else ():
            if f"\nSubject: {subject}\n".encode() in path.read_bytes():
                return path
    return None


def names(srv: POP3Server, uid: str, sub: str) -> List[str]:
    d = srv.maildir(uid) / sub
    return sorted(os.listdir(d)) if d.is_dir() else []


def unique(name: str) -> str:
    """The UIDL the server derives from a file name: up to the first "," or ":"."""
    return name.partition(":")[0].partition(",")[0]


def wire(path: Path) -> bytes:
    """A stored message as RETR sends it (before dot-stuffing): CRLF line ends."""
    return path.read_bytes().replace(b"\n", b"\r\n")


# --- clients --------------------------------------------------------------------------------

class SourcedPOP3(poplib.POP3):
    """poplib.POP3 connecting from a loopback address of the test's own (``source``)."""

    def __init__(self, host: str, port: int, *, source: Optional[str] = None,
                 timeout: float = 15) -> None:
        self.source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0) if self.source else None)


def stls(port: int, ctx: ssl.SSLContext, source: Optional[str] = None) -> poplib.POP3:
    """A poplib session after STLS, from ``source`` if given."""
    p = SourcedPOP3(HOST, port, source=source)
    assert p.getwelcome() == GREETING
    assert p.stls(context=ctx) == b"+OK Begin TLS negotiation"
    return p


def login(srv: POP3Server, ctx: ssl.SSLContext, uid: str) -> poplib.POP3:
    """A session of uid's over STLS, logged in."""
    p = stls(srv.stls_port, ctx)
    assert p.user(uid) == b"+OK send PASS"
    assert p.pass_(password(uid)).startswith(b"+OK ")
    return p


def err(call, *args) -> bytes:
    """The -ERR line poplib raises for call(*args)."""
    with pytest.raises(poplib.error_proto) as info:
        call(*args)
    return info.value.args[0]


def quit_ok(p: poplib.POP3) -> None:
    assert p.quit() == b"+OK Bye"


def drop(p: poplib.POP3) -> None:
    """Close the TCP connection without QUIT."""
    p.file.close()
    p.sock.close()


def closed_by_server(p: poplib.POP3) -> bool:
    """True when the server has closed the session (EOF on read)."""
    try:
        return p.file.readline() == b""
    except (ConnectionResetError, ssl.SSLEOFError):
        return True


def try_login(srv: POP3Server, ctx: ssl.SSLContext, uid: str):
    """A logged-in session, or None while the maildrop is still locked."""
    p = stls(srv.stls_port, ctx)
    p.user(uid)
    try:
        p.pass_(password(uid))
    except poplib.error_proto as e:
        assert e.args[0] == IN_USE
        quit_ok_auth(p)
        return None
    return p


def quit_ok_auth(p: poplib.POP3) -> None:
    """QUIT in the AUTHORIZATION state."""
    assert p.quit() == b"+OK bye"


class Raw:
    """A raw POP3 client: exactly the bytes a test writes go out, lines come back as they are
    on the wire (without CRLF)."""

    def __init__(self, port: int, *, source: Optional[str] = None) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=15,
                                             source_address=(source, 0) if source else None)
        self.buf = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def cmd(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.line()

    def multi(self, line: str) -> tuple:
        """The status line and the raw body of a multi-line answer (up to ".\\r\\n")."""
        self.sock.sendall(line.encode() + b"\r\n")
        status, body = self.multi_answer()
        assert status.startswith(b"+OK"), status
        return status, body

    def multi_answer(self) -> tuple:
        """The next answer's status line and, after +OK, its raw body."""
        status = self.line()
        if not status.startswith(b"+OK"):
            return status, b""
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, self.buf
            self.buf += chunk
        body, self.buf = (b"\r\n" + self.buf).split(b"\r\n.\r\n", 1)
        return status, (body[2:] + b"\r\n" if body else b"")

    def closed_by_server(self) -> bool:
        assert self.buf == b"", self.buf
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- TLS and logging in -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["alice", "alice@example.test"])
def test_stls_then_user_pass(pop, client_tls, name):
    """After STLS, USER and PASS with the uid or the address log alice in with a snapshot count."""
    p = stls(pop.stls_port, client_tls)
    assert p.user(name) == b"+OK send PASS"
    assert p.pass_("alice-password") == b"+OK 0 messages (0 octets)"
    assert p.stat() == (0, 0)
    quit_ok(p)


def test_pop3s_implicit_tls(pop, client_tls):
    """On the POP3S port USER and SASL are offered at once, STLS is not, and alice logs in."""
    p = poplib.POP3_SSL(HOST, pop.pop3s_port, context=client_tls, timeout=15)
    assert p.getwelcome() == GREETING
    caps = p.capa()
    assert "STLS" not in caps
    assert "USER" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    assert err(p._shortcmd, "STLS") == b"-ERR already using TLS"
    p.user("alice")
    assert p.pass_("alice-password").startswith(b"+OK ")
    quit_ok(p)


def test_apop_is_refused(pop, client_tls):
    """The greeting has no APOP timestamp and APOP is answered -ERR, after which USER/PASS works."""
    p = stls(pop.stls_port, client_tls)
    assert b"<" not in p.getwelcome()
    assert err(p._shortcmd, "APOP alice 0123456789abcdef0123456789abcdef") == \
        b"-ERR APOP not supported"
    p.user("alice")
    assert p.pass_("alice-password").startswith(b"+OK ")
    quit_ok(p)


def test_capa_before_and_after_stls(pop, client_tls):
    """Without plaintext_auth, CAPA lists STLS and no USER/SASL before TLS and USER/PASS/AUTH get
    -ERR [AUTH]; after STLS USER and SASL appear and STLS is gone."""
    p = poplib.POP3(HOST, pop.stls_port, timeout=15)
    before = p.capa()
    assert list(before) == ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "STLS",
                            "IMPLEMENTATION"]
    assert err(p.user, "alice") == NO_PLAINTEXT
    assert err(p._shortcmd, "PASS alice-password") == NO_PLAINTEXT
    assert err(p._shortcmd, "AUTH PLAIN") == NO_PLAINTEXT
    assert p.stls(context=client_tls) == b"+OK Begin TLS negotiation"
    after = p.capa()
    assert list(after) == ["TOP", "UIDL", "USER", "SASL", "RESP-CODES", "AUTH-RESP-CODE",
                           "PIPELINING", "IMPLEMENTATION"]
    assert after["SASL"] == ["PLAIN", "LOGIN"]
    assert err(p._shortcmd, "STLS") == b"-ERR already using TLS"
    p.user("alice")
    assert p.pass_("alice-password").startswith(b"+OK ")
    assert "STLS" not in p.capa() and "USER" in p.capa()
    quit_ok(p)


def test_plaintext_auth_listener_offers_user_before_tls(pop):
    """With plaintext_auth, CAPA offers USER, SASL and STLS before TLS and USER/PASS logs in."""
    p = poplib.POP3(HOST, pop.plain_port, timeout=15)
    caps = p.capa()
    assert "USER" in caps and "STLS" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    p.user("alice")
    assert p.pass_("alice-password").startswith(b"+OK ")
    assert "STLS" not in p.capa()
    quit_ok(p)


# --- content -----------------------------------------------------------------------------

DOT_BODY = ("first line\r\n.hidden line starts with a dot\r\n..two dots\r\n.\r\n"
            "after a lone dot\r\nlast line\r\n")
LONG_BODY = "".join(f"body line {i}\r\n" for i in range(1, 11))


def test_stat_list_uidl_top_retr_match_the_delivered_files(pop, client_tls):
    """STAT, LIST, UIDL, TOP and RETR agree with the files delivered: same content with CRLF,
    sizes equal to the octets RETR sends, UIDLs from the file names."""
    paths = [deliver(pop, "reader", "plain"), deliver(pop, "reader", "dots", DOT_BODY),
             deliver(pop, "reader", "long", LONG_BODY)]
    p = login(pop, client_tls, "reader")
    sizes = [len(wire(path)) for path in paths]
    assert p.stat() == (3, sum(sizes))
    status, lines, _ = p.list()
    assert status == b"+OK 3 messages (%d octets)" % sum(sizes)
    assert lines == [b"%d %d" % (i, size) for i, size in enumerate(sizes, 1)]
    assert p.list(2) == b"+OK 2 %d" % sizes[1]
    status, lines, _ = p.uidl()
    assert status == b"+OK unique-id listing follows"
    assert lines == [f"{i} {unique(path.name)}".encode() for i, path in enumerate(paths, 1)]
    assert p.uidl(3) == f"+OK 3 {unique(paths[2].name)}".encode()
    for i, path in enumerate(paths, 1):
        status, lines, octets = p.retr(i)
        assert status == b"+OK %d octets" % sizes[i - 1]
        assert b"\r\n".join(lines) + b"\r\n" == wire(path)
        assert octets == sizes[i - 1]  # poplib counts each line with its CRLF, unstuffed
    header, body = wire(paths[2]).split(b"\r\n\r\n", 1)
    status, lines, _ = p.top(3, 2)
    assert status == b"+OK top of message follows"
    assert lines == header.split(b"\r\n") + [b"", b"body line 1", b"body line 2"]
    assert p.top(3, 0)[1] == header.split(b"\r\n") + [b""]
    assert p.top(3, 100)[1] == wire(paths[2]).split(b"\r\n")[:-1]
    quit_ok(p)


def test_dot_stuffing_on_the_wire(pop):
    """RETR doubles each leading dot on the wire and ends with a lone dot line."""
    path = deliver(pop, "reader", "dots-raw", DOT_BODY)
    with Raw(pop.plain_port) as r:
        assert r.greeting == GREETING
        assert r.cmd("USER reader") == b"+OK send PASS"
        assert r.cmd("PASS reader-password").startswith(b"+OK ")
        number = [line for line in r.multi("UIDL")[1].split(b"\r\n")
                  if line.endswith(b" " + unique(path.name).encode())][0].split()[0]
        status, body = r.multi(f"RETR {number.decode()}")
        stored = wire(path)
        assert status == b"+OK %d octets" % len(stored)
        assert body.endswith(b"\r\nfirst line\r\n..hidden line starts with a dot\r\n"
                             b"...two dots\r\n..\r\nafter a lone dot\r\nlast line\r\n")
        assert body == stored.replace(b"\r\n.", b"\r\n..")
        assert r.cmd("QUIT") == b"+OK Bye"
        assert r.closed_by_server()


def test_message_without_final_newline(pop, client_tls):
    """A stored message without a final newline (written by another program, LF line ends, no
    W= in its name) is sent with CRLF line ends and a CRLF added before the final dot; LIST
    counts the stored lines with CRLF."""
    maildir = pop.maildir("noeol")
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    content = b"Subject: no eol\n\nline one\n.dotted\nno newline at the end"
    (maildir / "new" / "1700000000.M1P1Q1.other.host").write_bytes(content)
    p = login(pop, client_tls, "noeol")
    size = len(content) + content.count(b"\n")
    assert p.list()[:2] == (b"+OK 1 messages (%d octets)" % size, [b"1 %d" % size])
    status, lines, octets = p.retr(1)
    assert status == b"+OK %d octets" % size
    assert lines == [b"Subject: no eol", b"", b"line one", b".dotted", b"no newline at the end"]
    assert octets == size + 2  # the CRLF added to end the last line
    assert p.uidl(1) == b"+OK 1 1700000000.M1P1Q1.other.host"
    quit_ok(p)
    assert names(pop, "noeol", "cur") == ["1700000000.M1P1Q1.other.host:2,S"]


# --- UPDATE: what QUIT applies, and what a lost connection does not --------------------------

def test_dele_rset_quit_deletes_nothing(pop, client_tls):
    """DELE, then RSET, then QUIT deletes nothing."""
    paths = [deliver(pop, "rset", f"rset-{i}") for i in range(2)]
    p = login(pop, client_tls, "rset")
    assert p.dele(1) == b"+OK message 1 deleted"
    assert p.dele(2) == b"+OK message 2 deleted"
    assert p.stat() == (0, 0)
    size = sum(len(wire(path)) for path in paths)
    assert p.rset() == b"+OK maildrop has 2 messages (%d octets)" % size
    quit_ok(p)
    assert names(pop, "rset", "new") == []
    assert names(pop, "rset", "cur") == sorted(path.name + ":2," for path in paths)


def test_dele_quit_deletes_the_file(pop, client_tls):
    """DELE then QUIT removes that message's file from disk and leaves the other."""
    first, second = deliver(pop, "dele", "dele-1"), deliver(pop, "dele", "dele-2")
    p = login(pop, client_tls, "dele")
    assert p.dele(1) == b"+OK message 1 deleted"
    quit_ok(p)
    assert not first.exists()
    assert names(pop, "dele", "new") == []
    assert names(pop, "dele", "cur") == [second.name + ":2,"]
    p = login(pop, client_tls, "dele")
    assert p.uidl()[1] == [f"1 {unique(second.name)}".encode()]
    quit_ok(p)


def test_dropped_connection_deletes_nothing_and_releases_the_lock(pop, client_tls):
    """DELE then closing the socket without QUIT deletes nothing, moves nothing and frees the
    lock: a new session logs in and sees every message."""
    paths = [deliver(pop, "drop", f"drop-{i}") for i in range(2)]
    p = login(pop, client_tls, "drop")
    assert p.dele(1) == b"+OK message 1 deleted"
    p.retr(2)
    drop(p)
    p = wait_for(lambda: try_login(pop, client_tls, "drop"), "the lock to be released")
    assert p.stat()[0] == 2
    assert names(pop, "drop", "new") == sorted(path.name for path in paths)
    assert names(pop, "drop", "cur") == []
    quit_ok(p)


def test_mail_delivered_during_a_session_waits_for_the_next(pop, client_tls):
    """A message delivered while a session is open is not in its snapshot; the next session
    sees it."""
    first = deliver(pop, "during", "during-1")
    p = login(pop, client_tls, "during")
    stat = p.stat()
    assert stat == (1, len(wire(first)))
    second = deliver(pop, "during", "during-2")
    total = stat[1] + len(wire(second))
    assert p.stat() == stat
    assert p.list()[1] == [b"1 %d" % stat[1]]
    assert err(p.retr, 2) == b"-ERR no such message"
    quit_ok(p)
    assert names(pop, "during", "new") == [second.name]
    p = login(pop, client_tls, "during")
    assert p.stat() == (2, total)
    assert p.uidl()[1] == [f"1 {unique(first.name)}".encode(),
                           f"2 {unique(second.name)}".encode()]
    quit_ok(p)


def test_quit_moves_seen_messages_to_cur_and_keeps_uidls(pop, client_tls):
    """After QUIT every message is in cur/ with ":2,", the RETRieved one (not the TOPped one)
    with ":2,S"; the bytes and the UIDLs do not change, also across a later flag change."""
    paths = [deliver(pop, "seen", f"seen-{i}") for i in range(3)]
    contents = [path.read_bytes() for path in paths]
    p = login(pop, client_tls, "seen")
    uidls = p.uidl()[1]
    assert uidls == [f"{i} {unique(path.name)}".encode() for i, path in enumerate(paths, 1)]
    p.retr(1)
    p.top(2, 0)
    quit_ok(p)
    assert names(pop, "seen", "new") == []
    assert names(pop, "seen", "cur") == sorted(
        [paths[0].name + ":2,S", paths[1].name + ":2,", paths[2].name + ":2,"])
    cur = pop.maildir("seen") / "cur"
    assert [(cur / name).read_bytes() for name in
            (paths[0].name + ":2,S", paths[1].name + ":2,", paths[2].name + ":2,")] == contents
    p = login(pop, client_tls, "seen")
    assert p.uidl()[1] == uidls
    p.retr(3)
    quit_ok(p)
    assert names(pop, "seen", "cur") == sorted(
        [paths[0].name + ":2,S", paths[1].name + ":2,", paths[2].name + ":2,S"])
    p = login(pop, client_tls, "seen")
    assert p.uidl()[1] == uidls
    quit_ok(p)


# --- the lock -------------------------------------------------------------------------------

def test_second_session_gets_in_use_until_the_first_quits(pop, client_tls):
    """While one session holds the mailbox a second one (STLS or POP3S) gets -ERR [IN-USE] and may
    try again; once the first has QUIT, the second logs in."""
    deliver(pop, "busy", "busy-1")
    first = login(pop, client_tls, "busy")
    second = stls(pop.stls_port, client_tls)
    second.user("busy")
    assert err(second.pass_, password("busy")) == IN_USE
    pop3s = poplib.POP3_SSL(HOST, pop.pop3s_port, context=client_tls, timeout=15)
    pop3s.user("busy@example.test")
    assert err(pop3s.pass_, password("busy")) == IN_USE
    quit_ok_auth(pop3s)
    assert first.dele(1) == b"+OK message 1 deleted"
    quit_ok(first)
    # The lock is released before QUIT is answered: no waiting needed.
    assert second.user("busy") == b"+OK send PASS"
    assert second.pass_(password("busy")) == b"+OK 0 messages (0 octets)"
    quit_ok(second)


def test_lock_of_a_killed_server_is_gone_after_restart(tmp_path, tls_files, client_tls):
    """SIGKILL while a session holds the lock (and has a DELE pending): the restarted server logs
    the user in and the message is still there."""
    port = 0

    def make() -> MailServer:
        nonlocal port
        with reserved_ports(1) as [port]:
            return MailServer(
                tmp_path / "srv", directory=embedded_directory(),
                tls={"certificate": tls_files["certificate"],
                     "private_key": tls_files["private_key"]},
                extra_listeners=[{"name": "pop3", "protocol": "pop3",
                                  "address": f"{HOST}:{port}"}])

    server = start_server(make)
    try:
        with smtplib.SMTP(HOST, server.smtp_port, timeout=15) as s:
            s.sendmail("sender@example.org", ["alice@example.test"],
                       b"Subject: crash\r\n\r\nbody\r\n")
        [path] = wait_for(lambda: server.messages("alice"), "the message in alice's new/")
        p = stls(port, client_tls)
        p.user("alice")
        assert p.pass_("alice-password").startswith(b"+OK 1 messages")
        assert p.dele(1) == b"+OK message 1 deleted"
        other = stls(port, client_tls)
        other.user("alice")
        assert err(other.pass_, "alice-password") == IN_USE
        server.kill()
        drop(p)
        drop(other)
        assert (server.maildir("alice") / ".mailserver-pop3.lock").exists()
        server.start()
        p = stls(port, client_tls)
        p.user("alice")
        assert p.pass_("alice-password") == b"+OK 1 messages (%d octets)" % len(wire(path))
        assert p.uidl(1) == f"+OK 1 {unique(path.name)}".encode()
        quit_ok(p)
        assert server.messages("alice") == []
        assert os.listdir(server.maildir("alice") / "cur") == [path.name + ":2,"]
    finally:
        server.stop()


# --- dovecot-uidlist --------------------------------------------------------------------------

def test_dovecot_uidlist_is_honoured(pop, client_tls):
    """A version-3 dovecot-uidlist gives a listed message Dovecot's UIDL (%08Xu%08Xv, or its saved
    P field); an unlisted one keeps its own; the file is left as it was."""
    paths = [deliver(pop, "dove", f"dove-{i}") for i in range(3)]
    uidlist = pop.maildir("dove") / "dovecot-uidlist"
    text = f"3 V1234 N3\n1 :{paths[0].name}\n2 Pcustom-uidl-2 :{paths[1].name}\n"
    uidlist.write_text(text)
    expected = [b"1 00000001000004D2", b"2 custom-uidl-2", f"3 {unique(paths[2].name)}".encode()]
    p = login(pop, client_tls, "dove")
    assert p.uidl()[1] == expected
    assert p.uidl(2) == b"+OK 2 custom-uidl-2"
    p.retr(1)
    quit_ok(p)
    # After the move to cur/ the records still match by base name.
    p = login(pop, client_tls, "dove")
    assert p.uidl()[1] == expected
    quit_ok(p)
    assert uidlist.read_text() == text


# --- failed logins ------------------------------------------------------------------------------

def test_wrong_password_and_unknown_user_get_the_same_answer(pop, client_tls):
    """A wrong password and an unknown login both get "-ERR [AUTH] Authentication failed", and the
    session may log in afterwards."""
    p = stls(pop.stls_port, client_tls, source="127.0.0.78")
    p.user("carol")
    assert err(p.pass_, "not-the-password") == AUTH_FAILED
    p.user("nobody-at-all")
    assert err(p.pass_, "not-the-password") == AUTH_FAILED
    assert err(p.pass_, password("carol")) == b"-ERR USER first"  # PASS forgot the USER
    p.user("carol")
    assert p.pass_(password("carol")).startswith(b"+OK ")
    quit_ok(p)


def test_failed_logins_are_blocked_per_client_address(pop, client_tls):
    """The max_failures-th failure from one address is answered -ERR [SYS/TEMP] and the connection
    closed; the next attempt from that address is refused the same way even with the right
    password, while other addresses log in."""
    source = "127.0.0.77"
    p = stls(pop.stls_port, client_tls, source)
    for i in range(MAX_FAILURES - 1):
        p.user(f"ghost{i}")
        assert err(p.pass_, "guess") == AUTH_FAILED
    p.user("ghost-last")
    assert err(p.pass_, "guess") == BLOCKED
    assert closed_by_server(p)
    p.close()
    p = stls(pop.stls_port, client_tls, source)
    p.user("alice")
    assert err(p.pass_, "alice-password") == BLOCKED
    assert closed_by_server(p)
    p.close()
    quit_ok(login(pop, client_tls, "alice"))


# --- bad arguments --------------------------------------------------------------------------------

def test_invalid_message_numbers_get_err_and_the_session_goes_on(pop, client_tls):
    """Message numbers 0, n+1 and "x", a deleted message and a negative TOP count get -ERR, the
    session goes on and QUIT applies only the DELE."""
    paths = [deliver(pop, "numbers", f"numbers-{i}") for i in range(2)]
    p = login(pop, client_tls, "numbers")
    # Nine -ERRs: the tenth would be the last before the session is closed (max_errors).
    for command in ("LIST 0", "RETR 3", "UIDL x", "TOP 3 1"):
        assert err(p._shortcmd, command) == b"-ERR no such message", command
    assert err(p._shortcmd, "TOP 1 -1") == b"-ERR invalid line count"
    assert p.dele(1) == b"+OK message 1 deleted"
    for command in ("RETR 1", "LIST 1", "DELE 1", "TOP 1 0"):
        assert err(p._shortcmd, command) == b"-ERR message 1 already deleted", command
    assert p.noop() == b"+OK"
    assert p.stat() == (1, len(wire(paths[1])))
    assert p.list()[1] == [b"2 %d" % len(wire(paths[1]))]
    assert b"\r\n".join(p.retr(2)[1]) + b"\r\n" == wire(paths[1])
    quit_ok(p)
    assert not paths[0].exists()
    assert names(pop, "numbers", "cur") == [paths[1].name + ":2,S"]


# --- a large mailbox ---------------------------------------------------------------------------

def test_mailbox_of_3000_messages(pop, client_tls):
    """A maildir of 3000 messages (files written directly, named as the store names them) opens,
    LIST and UIDL return 3000 lines and QUIT moves them all to cur/."""
    count = 3000
    maildir = pop.maildir("big")
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    sizes = []
    for n in range(count):
        content = f"Subject: big {n}\n\n" + "x" * (n % 97) + "\n"
        data = content.encode()
        wsize = len(data) + data.count(b"\n")
        name = (f"{1700000000 + n // 1000}.M{n % 1000:06d}P1Q{n}R{n:016x}.{SERVER_NAME}"
                f",S={len(data)},W={wsize}")
        (maildir / "new" / name).write_bytes(data)
        sizes.append(wsize)
    p = login(pop, client_tls, "big")
    assert p.stat() == (count, sum(sizes))
    status, lines, _ = p.list()
    assert len(lines) == count
    assert lines == [b"%d %d" % (i, size) for i, size in enumerate(sizes, 1)]
    uidls = p.uidl()[1]
    assert len(uidls) == count and len({line.split()[1] for line in uidls}) == count
    assert p.retr(count)[1][0] == f"Subject: big {count - 1}".encode()
    quit_ok(p)
    assert names(pop, "big", "new") == []
    assert len(names(pop, "big", "cur")) == count


def test_pipelined_retrs_of_a_client_that_reads_late(pop):
    """300 RETRs (1.5 MB of answers) sent in one write before reading anything are answered
    whole and in order (the answers go to the socket at once, and wait while the server's
    write buffer is full), then QUIT."""
    count = 300
    maildir = pop.maildir("pipe")
    for sub in ("new", "cur", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    for n in range(count):
        data = (f"Subject: pipe {n}\r\n\r\n" + f"line {n} of text\r\n" * 250).encode()
        name = f"{1700000000 + n}.M{n:06d}P1Q{n}R{n:016x}.{SERVER_NAME},S={len(data)}"
        (maildir / "new" / name).write_bytes(data)
    with Raw(pop.plain_port) as r:
        assert r.cmd("USER pipe") == b"+OK send PASS"
        assert r.cmd("PASS pipe-password").startswith(b"+OK ")
        r.sock.sendall(b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1)))
        for n in range(count):
            status, body = r.multi_answer()
            assert status.startswith(b"+OK "), (n, status)
            assert body.startswith(b"Subject: pipe %d\r\n" % n) and body.count(b"\r\n") == 252
        assert r.cmd("QUIT") == b"+OK Bye"
        assert r.closed_by_server()


def test_too_many_errors_close_the_session(pop):
    """Ten refused commands are answered one by one; the eleventh -ERR is "-ERR too many errors"
    and the server closes the connection."""
    with Raw(pop.plain_port) as r:
        for _ in range(10):
            assert r.cmd("BOGUS") == b"-ERR unknown command"
        assert r.cmd("STAT") == b"-ERR too many errors"
        assert r.closed_by_server()
