"""Tests for mailserver.sansio.pop3: the sans-IO POP3 server core.

Bytes go in, events and response bytes come out; the application side is
played by small answer functions.
"""

from __future__ import annotations

import base64
import dataclasses
import re
from typing import Callable, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver import sasl
from mailserver.sansio.pop3 import (
    COMMANDS,
    MAX_COMMAND,
    TRANSITIONS,
    POP3ServerConnection,
    State,
    UsageError,
)
from mailserver.sansio.pop3_events import (
    CLOSED_BY_APPLICATION,
    NEED_DATA,
    PAUSED,
    TOO_LONG,
    TOO_MANY_ERRORS,
    Authenticate,
    Closing,
    ConnectionClosed,
    Event,
    LoginFailed,
    MessageInfo,
    Quit,
    Retrieve,
    StartTLS,
    Update,
)
from mailserver.sansio.pop3_stuffer import whole

HOST = "pop.example.test"
NO_PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
NOT_NOW = b"-ERR command not valid in this state\r\n"
NO_SUCH = b"-ERR no such message\r\n"
STORED = [
    b"Subject: one\n\nbody one\n",
    b"Subject: two\r\n\r\n.dot line\r\nsecond\r\n",
    b"Subject: three\nX: y\n\nline1\nline2\nline3\n",
]


def wire_size(stored: bytes) -> int:
    return len(stored.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))


MESSAGES = [MessageInfo(wire_size(m), f"uid-{i + 1}") for i, m in enumerate(STORED)]
TOTAL = sum(m.size for m in MESSAGES)

Answer = Callable[[POP3ServerConnection, Event], Optional[bytes]]


def accept(conn: POP3ServerConnection, event: Event) -> Optional[bytes]:
    """Answer every decision positively (STORED is the mailbox, streamed in one
    go); return what the application wrote straight to the transport."""
    if isinstance(event, Authenticate):
        conn.logged_in(MESSAGES, identity=event.credentials.login.lower())
    elif isinstance(event, Retrieve):
        conn.send_ok()
        content = conn.stuff(STORED[event.index])
        conn.finish_retrieve()
        return content
    else:
        conn.send_ok()
    return None


def new(**kwargs) -> POP3ServerConnection:
    """A connection (TLS active unless told otherwise) with its greeting drained."""
    kwargs.setdefault("tls_active", True)
    conn = POP3ServerConnection(hostname=HOST, **kwargs)
    conn.greeting()
    conn.data_to_send()
    return conn


def run(conn: POP3ServerConnection, data: bytes = b"", answer: Answer = accept):
    """Feed ``data``, take events until NEED_DATA answering every decision,
    and return the events and every byte written (responses and content)."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    out = b""
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events, out + conn.data_to_send()
        assert event is not PAUSED, "run() answers every decision"
        events.append(event)
        if event.NEEDS_REPLY:
            out += conn.data_to_send()
            out += answer(conn, event) or b""


def logged_in(**kwargs) -> POP3ServerConnection:
    """A connection in TRANSACTION with MESSAGES, logged in by USER/PASS."""
    conn = new(**kwargs)
    run(conn, b"USER alice\r\nPASS secret\r\n")
    assert conn.state is State.TRANSACTION
    return conn


def kinds(events: list[Event]) -> list[type]:
    return [type(e) for e in events]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(login: bytes = b"alice", password: bytes = b"secret", authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\0" + login + b"\0" + password)


class ConstructionTests:
    """The constructor, the values and the tables."""

    def test_greeting(self) -> None:
        """The greeting names the host and carries no APOP timestamp."""
        conn = POP3ServerConnection(hostname=HOST)
        conn.greeting()
        assert conn.data_to_send() == b"+OK pop.example.test POP3 ready\r\n"

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"auth_mechanisms": ("CRAM-MD5",)},
            {"expire": "soon"},
            {"login_delay": -1},
            {"implementation": "a\r\nb"},
            {"hostname": ""},
        ],
    )
    def test_bad_configuration(self, kwargs: dict) -> None:
        """Unknown mechanisms and malformed CAPA values are refused at construction."""
        kwargs.setdefault("hostname", HOST)
        with pytest.raises(ValueError):
            POP3ServerConnection(**kwargs)

    @pytest.mark.parametrize("size, uid", [(-1, "a"), (1, ""), (1, "a b"), (1, "x" * 71)])
    def test_message_info_validates(self, size: int, uid: str) -> None:
        """MessageInfo refuses negative sizes and UIDs outside RFC 1939's grammar."""
        with pytest.raises(ValueError):
            MessageInfo(size, uid)

    def test_events_are_frozen(self) -> None:
        """Events are immutable values."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            Update((1,)).deleted = ()  # type: ignore[misc]

    def test_transition_table_covers_every_state(self) -> None:
        """Every state can close, and every target is a State."""
        assert set(TRANSITIONS) == set(State)
        for row in TRANSITIONS.values():
            assert row["CLOSE"] is State.CLOSED
            assert all(isinstance(s, State) for s in row.values())

    def test_verb_table(self) -> None:
        """The verb table holds exactly the supported commands."""
        assert set(COMMANDS) == {
            "CAPA", "QUIT", "STLS", "USER", "PASS", "APOP", "AUTH",
            "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "RSET", "NOOP",
        }


AUTHORIZATION_CASES = [
    (b"STAT\r\n", NOT_NOW),
    (b"LIST\r\n", NOT_NOW),
    (b"UIDL 1\r\n", NOT_NOW),
    (b"RETR 1\r\n", NOT_NOW),
    (b"TOP 1 1\r\n", NOT_NOW),
    (b"DELE 1\r\n", NOT_NOW),
    (b"RSET\r\n", NOT_NOW),
    (b"NOOP\r\n", NOT_NOW),
    (b"APOP alice 0123456789abcdef\r\n", b"-ERR APOP not supported\r\n"),
    (b"USER alice\r\n", b"+OK send PASS\r\n"),
    (b"user   alice  \r\n", b"+OK send PASS\r\n"),
    (b"USER\r\n", b"-ERR invalid user name\r\n"),
    (b"USER a b\r\n", b"-ERR invalid user name\r\n"),
    (b"USER a\x01b\r\n", b"-ERR invalid user name\r\n"),
    (b"PASS secret\r\n", b"-ERR USER first\r\n"),
    (b"STLS\r\n", b"-ERR already using TLS\r\n"),
    (b"AUTH CRAM-MD5\r\n", b"-ERR Unsupported authentication mechanism\r\n"),
    (b"AUTH PLAIN a b\r\n", b"-ERR syntax error\r\n"),
    (b"AUTH\r\n", b"+OK SASL mechanisms follow\r\nPLAIN\r\n.\r\n"),
    (b"CAPA now\r\n", b"-ERR no arguments expected\r\n"),
    (b"FROB\r\n", b"-ERR unknown command\r\n"),
    (b"\r\n", b"-ERR unknown command\r\n"),
    (b"N\xc3\xa9OP\r\n", b"-ERR unknown command\r\n"),
    (b"NO\x00OP\r\n", b"-ERR NUL in command\r\n"),
]


class AuthorizationTests:
    """Commands in the AUTHORIZATION state."""

    @pytest.mark.parametrize("data, expected", AUTHORIZATION_CASES)
    def test_command(self, data: bytes, expected: bytes) -> None:
        """Each command gets its response and the session stays in AUTHORIZATION."""
        conn = new()
        events, out = run(conn, data)
        assert (events, out) == ([], expected)
        assert conn.state is State.AUTHORIZATION

    @pytest.mark.parametrize("data", [b"USER alice\r\n", b"PASS x\r\n", b"AUTH PLAIN\r\n",
                                      b"AUTH PLAIN " + plain() + b"\r\n", b"AUTH\r\n"])
    def test_plaintext_auth_disallowed(self, data: bytes) -> None:
        """Without TLS or plaintext_auth, USER, PASS and AUTH are refused with [AUTH]."""
        conn = new(tls_active=False, tls_available=True)
        events, out = run(conn, data + b"PASS secret\r\n")
        assert events == []
        assert out == NO_PLAINTEXT * 2

    def test_plaintext_auth_allowed(self) -> None:
        """plaintext_auth lets USER/PASS run without TLS."""
        conn = new(tls_active=False, plaintext_auth=True)
        events, _ = run(conn, b"USER alice\r\nPASS secret\r\n")
        assert kinds(events) == [Authenticate]

    def test_quit(self) -> None:
        """QUIT in AUTHORIZATION says bye, emits Quit and ignores what follows."""
        conn = new()
        events, out = run(conn, b"QUIT\r\nNOOP\r\n")
        assert (events, out) == ([Quit()], b"+OK bye\r\n")
        assert conn.closed
        conn.receive_data(b"CAPA\r\n")
        assert run(conn) == ([], b"")

    def test_eof(self) -> None:
        """EOF gives ConnectionClosed."""
        conn = new()
        conn.receive_data(b"")
        assert run(conn) == ([ConnectionClosed()], b"")
        assert conn.closed


class CapaTests:
    """CAPA in every situation."""

    BASE_HEAD = ["TOP", "UIDL"]
    BASE_TAIL = ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]

    def capa(self, conn: POP3ServerConnection) -> list[str]:
        _, out = run(conn, b"CAPA\r\n")
        lines = out.decode().split("\r\n")
        assert lines[0] == "+OK Capability list follows" and lines[-2:] == [".", ""]
        return lines[1:-2]

    def test_before_tls(self) -> None:
        """Before TLS: STLS, and no USER or SASL."""
        conn = new(tls_active=False, tls_available=True)
        assert self.capa(conn) == [
            *self.BASE_HEAD, *self.BASE_TAIL, "STLS", "IMPLEMENTATION mailserver"
        ]

    def test_plaintext_auth_without_tls(self) -> None:
        """plaintext_auth advertises USER and SASL before TLS too."""
        conn = new(tls_active=False, tls_available=True, plaintext_auth=True,
                   auth_mechanisms=("PLAIN", "LOGIN"))
        assert self.capa(conn) == [
            *self.BASE_HEAD, "USER", "SASL PLAIN LOGIN", *self.BASE_TAIL, "STLS",
            "IMPLEMENTATION mailserver",
        ]

    def test_implicit_tls(self) -> None:
        """With TLS active: USER and SASL, no STLS."""
        assert self.capa(new()) == [
            *self.BASE_HEAD, "USER", "SASL PLAIN", *self.BASE_TAIL, "IMPLEMENTATION mailserver"
        ]

    def test_after_stls(self) -> None:
        """After STLS and the handshake: USER and SASL appear, STLS goes."""
        conn = new(tls_active=False, tls_available=True)
        run(conn, b"STLS\r\n")
        conn.tls_started()
        assert self.capa(conn) == self.capa(new())

    def test_transaction(self) -> None:
        """In TRANSACTION the AUTHORIZATION capabilities stay (RFC 2449 §5), STLS does not."""
        kwargs = {"tls_active": False, "tls_available": True, "plaintext_auth": True}
        assert "STLS" in self.capa(new(**kwargs))
        assert self.capa(logged_in(**kwargs)) == self.capa(new())

    def test_configured_values(self) -> None:
        """EXPIRE, LOGIN-DELAY and IMPLEMENTATION follow the configuration; no
        mechanisms, no SASL."""
        conn = new(expire="NEVER", login_delay=900, implementation="acme-pop", auth_mechanisms=())
        assert self.capa(conn) == [
            *self.BASE_HEAD, "USER", *self.BASE_TAIL, "EXPIRE NEVER", "LOGIN-DELAY 900",
            "IMPLEMENTATION acme-pop",
        ]


class StartTLSTests:
    """STLS (RFC 2595)."""

    def test_pipelined_plaintext_discarded(self) -> None:
        """Commands pipelined after STLS never run, even after the handshake."""
        conn = new(tls_active=False, tls_available=True, plaintext_auth=True)
        conn.receive_data(b"STLS\r\nUSER a\r\nPASS b\r\n")
        assert conn.next_event() == StartTLS()
        assert conn.next_event() is PAUSED
        conn.send_ok()
        assert conn.data_to_send() == b"+OK Begin TLS negotiation now\r\n"
        conn.receive_data(b"PASS c\r\n")  # still before the handshake
        assert conn.next_event() is NEED_DATA
        conn.tls_started()
        assert conn.tls_active
        assert run(conn) == ([], b"")
        assert run(conn, b"PASS d\r\n") == ([], b"-ERR USER first\r\n")

    def test_refused_resumes_plaintext(self) -> None:
        """A negative answer keeps the session in plaintext; pipelined bytes are still gone."""
        conn = new(tls_active=False, tls_available=True)
        conn.receive_data(b"STLS\r\nNOOP\r\n")
        assert conn.next_event() == StartTLS()
        conn.send_err("TLS is broken", code="SYS/TEMP")
        assert conn.data_to_send() == b"-ERR [SYS/TEMP] TLS is broken\r\n"
        assert conn.next_event() is NEED_DATA
        assert run(conn, b"CAPA\r\n")[1].startswith(b"+OK")
        assert not conn.tls_active

    def test_forgets_user(self) -> None:
        """A USER given before STLS is forgotten by the handshake."""
        conn = new(tls_active=False, tls_available=True, plaintext_auth=True)
        run(conn, b"USER alice\r\nSTLS\r\n")
        conn.tls_started()
        assert run(conn, b"PASS secret\r\n") == ([], b"-ERR USER first\r\n")

    @pytest.mark.parametrize(
        "kwargs, data, expected",
        [
            ({"tls_available": False}, b"STLS\r\n", b"-ERR STLS not available\r\n"),
            ({"tls_available": True}, b"STLS now\r\n", b"-ERR no arguments expected\r\n"),
        ],
    )
    def test_refused_by_core(self, kwargs: dict, data: bytes, expected: bytes) -> None:
        """STLS without TLS configured, or with an argument, is -ERR."""
        assert run(new(tls_active=False, **kwargs), data) == ([], expected)

    def test_stls_in_transaction(self) -> None:
        """STLS after login is out of state."""
        conn = logged_in(tls_active=False, tls_available=True, plaintext_auth=True)
        assert run(conn, b"STLS\r\n") == ([], NOT_NOW)

    def test_tls_started_without_stls(self) -> None:
        """tls_started() without an accepted STLS is a usage error."""
        with pytest.raises(UsageError):
            new(tls_active=False).tls_started()


class LoginTests:
    """USER/PASS and AUTH produce Authenticate; the answers."""

    def decide(self, conn: POP3ServerConnection, data: bytes) -> tuple[list, bytes]:
        """Feed ``data`` and take events up to the first PAUSED or NEED_DATA."""
        conn.receive_data(data)
        events = []
        while (event := conn.next_event()) not in (PAUSED, NEED_DATA):
            events.append(event)
        return events, conn.data_to_send()

    @pytest.mark.parametrize(
        "data, credentials, challenges",
        [
            (b"USER alice\r\nPASS  two words \r\n",
             sasl.Credentials("USER", "alice", " two words "), b"+OK send PASS\r\n"),
            (b"AUTH PLAIN " + plain() + b"\r\n", sasl.Credentials("PLAIN", "alice", "secret"), b""),
            (b"auth plain\r\n" + plain() + b"\r\n",
             sasl.Credentials("PLAIN", "alice", "secret"), b"+ \r\n"),
            (b"AUTH PLAIN " + plain(authzid=b"alice") + b"\r\n",
             sasl.Credentials("PLAIN", "alice", "secret", "alice"), b""),
            (b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n",
             sasl.Credentials("LOGIN", "alice", "secret"),
             b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"),
            (b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\n",
             sasl.Credentials("LOGIN", "alice", "secret"), b"+ UGFzc3dvcmQ6\r\n"),
        ],
    )
    def test_authenticate(self, data: bytes, credentials: sasl.Credentials,
                          challenges: bytes) -> None:
        """USER/PASS, AUTH PLAIN (initial response or continuation) and AUTH LOGIN
        produce Authenticate with the client's credentials."""
        conn = new(auth_mechanisms=("PLAIN", "LOGIN"))
        events, out = self.decide(conn, data)
        assert events == [Authenticate(credentials)]
        assert out == challenges
        assert conn.next_event() is PAUSED

    def test_repr_hides_password(self) -> None:
        """Authenticate's repr never shows the password."""
        text = repr(Authenticate(sasl.Credentials("USER", "alice", "hunter2")))
        assert "hunter2" not in text and "alice" in text

    def test_logged_in(self) -> None:
        """logged_in() records the identity, enters TRANSACTION and reports the maildrop."""
        conn = new()
        self.decide(conn, b"USER Alice\r\nPASS secret\r\n")
        conn.logged_in(MESSAGES, identity="alice@example.test")
        assert conn.user == "alice@example.test"
        assert conn.state is State.TRANSACTION
        assert conn.data_to_send() == b"+OK 3 messages (%d octets)\r\n" % TOTAL
        assert conn.next_event() is NEED_DATA

    def test_logged_in_text(self) -> None:
        """logged_in() takes its own response text."""
        conn = new()
        self.decide(conn, b"USER a\r\nPASS b\r\n")
        conn.logged_in([], "welcome", identity="a")
        assert conn.data_to_send() == b"+OK welcome\r\n"

    @pytest.mark.parametrize("code", ["AUTH", "SYS/TEMP", "IN-USE"])
    def test_refused(self, code: str) -> None:
        """A refusal keeps the session in AUTHORIZATION and forgets USER."""
        conn = new()
        self.decide(conn, b"USER alice\r\nPASS wrong\r\nPASS again\r\n")
        conn.send_err("nope", code=code)
        assert conn.data_to_send() == b"-ERR [%s] nope\r\n" % code.encode()
        assert run(conn) == ([], b"-ERR USER first\r\n")
        assert conn.state is State.AUTHORIZATION and conn.user is None
        assert conn.errors == 2

    @pytest.mark.parametrize("kwargs", [{"code": "LOGIN-DELAY"}, {"code": "AUTH", "close": True}])
    def test_refused_and_closed(self, kwargs: dict) -> None:
        """LOGIN-DELAY or close=True ends the session after the -ERR."""
        conn = new()
        self.decide(conn, b"USER alice\r\nPASS wrong\r\nNOOP\r\n")
        conn.send_err("go away", **kwargs)
        assert conn.data_to_send() == b"-ERR [%s] go away\r\n" % kwargs["code"].encode()
        assert run(conn) == ([Closing(CLOSED_BY_APPLICATION)], b"")
        assert conn.closed

    @pytest.mark.parametrize(
        "data, failure, out",
        [
            (b"AUTH PLAIN\r\n*\r\n", LoginFailed("PLAIN", sasl.CANCELLED),
             b"+ \r\n-ERR Authentication cancelled\r\n"),
            (b"AUTH LOGIN\r\n" + b64(b"a") + b"\r\n*\r\n", LoginFailed("LOGIN", sasl.CANCELLED),
             b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR Authentication cancelled\r\n"),
            (b"AUTH PLAIN !!!!\r\n", LoginFailed("PLAIN", sasl.MALFORMED),
             b"-ERR Malformed authentication data\r\n"),
            (b"AUTH PLAIN\r\nnot base64\r\n", LoginFailed("PLAIN", sasl.MALFORMED),
             b"+ \r\n-ERR Malformed authentication data\r\n"),
            (b"AUTH PLAIN *\r\n", LoginFailed("PLAIN", sasl.MALFORMED),
             b"-ERR Malformed authentication data\r\n"),
            (b"AUTH PLAIN " + plain(authzid=b"bob") + b"\r\n", LoginFailed("PLAIN", sasl.AUTHZID),
             b"-ERR [AUTH] Authentication failed\r\n"),
            (b"AUTH PLAIN\r\n" + b"A" * (sasl.MAX_RESPONSE + 1) + b"\r\n",
             LoginFailed("PLAIN", TOO_LONG), b"+ \r\n-ERR Authentication line too long\r\n"),
            (b"AUTH PLAIN\r\n" + b"A" * sasl.MAX_RESPONSE + b"\r\n",
             LoginFailed("PLAIN", sasl.MALFORMED),
             b"+ \r\n-ERR Malformed authentication data\r\n"),
            (b"USER alice\r\nPASS\r\n", LoginFailed("USER", sasl.MALFORMED),
             b"+OK send PASS\r\n-ERR Malformed authentication data\r\n"),
            (b"USER alice\r\nPASS \xff\xfe\r\n", LoginFailed("USER", sasl.MALFORMED),
             b"+OK send PASS\r\n-ERR Malformed authentication data\r\n"),
        ],
    )
    def test_core_ends_exchange(self, data: bytes, failure: LoginFailed, out: bytes) -> None:
        """Cancel, malformed data, a foreign authzid and over-long lines end the
        exchange in the core with -ERR and LoginFailed; the session goes on."""
        conn = new(auth_mechanisms=("PLAIN", "LOGIN"))
        events, got = run(conn, data + b"CAPA\r\n")
        assert events == [failure]
        assert got.startswith(out) and got[len(out):].startswith(b"+OK Capability")
        assert conn.state is State.AUTHORIZATION

    def test_long_initial_response(self) -> None:
        """An AUTH line longer than 255 octets still carries its initial response."""
        password = b"p" * 400
        conn = new()
        events, _ = self.decide(conn, b"AUTH PLAIN " + plain(password=password) + b"\r\n")
        assert events == [Authenticate(sasl.Credentials("PLAIN", "alice", password.decode()))]

    def test_usage_errors(self) -> None:
        """Wrong answers to Authenticate, or answers with nothing pending, are usage errors."""
        conn = new()
        with pytest.raises(UsageError):
            conn.send_ok()
        self.decide(conn, b"USER a\r\nPASS b\r\n")
        with pytest.raises(UsageError):
            conn.send_ok()
        with pytest.raises(UsageError):
            conn.logged_in([], identity="")
        with pytest.raises(UsageError):
            conn.logged_in([], identity=None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            conn.logged_in(["x"], identity="a")  # type: ignore[list-item]
        with pytest.raises(UsageError):
            conn.send_err("bad", code="not a code")
        with pytest.raises(UsageError):
            conn.send_err("two\r\nlines")
        assert conn.next_event() is PAUSED  # still waiting


def transaction_cases() -> list[tuple[bytes, bytes]]:
    sizes = [m.size for m in MESSAGES]
    listing = b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes))
    uids = b"".join(b"%d uid-%d\r\n" % (i + 1, i + 1) for i in range(3))
    return [
        (b"STAT\r\n", b"+OK 3 %d\r\n" % TOTAL),
        (b"STAT 1\r\n", b"-ERR no arguments expected\r\n"),
        (b"LIST\r\n", b"+OK 3 messages (%d octets)\r\n" % TOTAL + listing + b".\r\n"),
        (b"LIST 2\r\n", b"+OK 2 %d\r\n" % sizes[1]),
        (b"list   3 \r\n", b"+OK 3 %d\r\n" % sizes[2]),
        (b"LIST 02\r\n", b"+OK 2 %d\r\n" % sizes[1]),
        (b"LIST 0\r\n", NO_SUCH),
        (b"LIST 4\r\n", NO_SUCH),
        (b"LIST abc\r\n", NO_SUCH),
        (b"LIST -1\r\n", NO_SUCH),
        (b"LIST +1\r\n", NO_SUCH),
        (b"LIST 99999999999999\r\n", NO_SUCH),
        (b"LIST 1 2\r\n", b"-ERR syntax error\r\n"),
        (b"UIDL\r\n", b"+OK unique-id listing follows\r\n" + uids + b".\r\n"),
        (b"UIDL 3\r\n", b"+OK 3 uid-3\r\n"),
        (b"UIDL 9\r\n", NO_SUCH),
        (b"NOOP\r\n", b"+OK\r\n"),
        (b"NOOP x\r\n", b"-ERR no arguments expected\r\n"),
        (b"RSET\r\n", b"+OK maildrop has 3 messages (%d octets)\r\n" % TOTAL),
        (b"DELE\r\n", b"-ERR syntax error: DELE msg\r\n"),
        (b"DELE 4\r\n", NO_SUCH),
        (b"RETR\r\n", b"-ERR syntax error: RETR msg\r\n"),
        (b"RETR 1 2\r\n", b"-ERR syntax error: RETR msg\r\n"),
        (b"RETR 0\r\n", NO_SUCH),
        (b"RETR 4\r\n", NO_SUCH),
        (b"RETR abc\r\n", NO_SUCH),
        (b"RETR -1\r\n", NO_SUCH),
        (b"TOP 1\r\n", b"-ERR syntax error: TOP msg n\r\n"),
        (b"TOP 1 -1\r\n", b"-ERR invalid line count\r\n"),
        (b"TOP 1 x\r\n", b"-ERR invalid line count\r\n"),
        (b"TOP 4 1\r\n", NO_SUCH),
        (b"USER alice\r\n", NOT_NOW),
        (b"PASS secret\r\n", NOT_NOW),
        (b"AUTH PLAIN\r\n", NOT_NOW),
        (b"APOP a b\r\n", NOT_NOW),
        (b"STLS\r\n", NOT_NOW),
        (b"HELO x\r\n", b"-ERR unknown command\r\n"),
    ]


class TransactionTests:
    """Commands the core answers itself in TRANSACTION."""

    @pytest.mark.parametrize("data, expected", transaction_cases())
    def test_command(self, data: bytes, expected: bytes) -> None:
        """Each command gets its response, no event, and the session goes on."""
        conn = logged_in()
        assert run(conn, data) == ([], expected)
        assert conn.state is State.TRANSACTION
        assert run(conn, b"NOOP\r\n") == ([], b"+OK\r\n")

    def test_deletion_marks(self) -> None:
        """DELE marks a message: counts and listings skip it, references to it
        fail, and RSET brings everything back."""
        conn = logged_in()
        s1, _, s3 = (m.size for m in MESSAGES)
        steps = [
            (b"DELE 2\r\n", b"+OK message 2 deleted\r\n"),
            (b"DELE 2\r\n", b"-ERR message 2 already deleted\r\n"),
            (b"STAT\r\n", b"+OK 2 %d\r\n" % (s1 + s3)),
            (b"LIST\r\n",
             b"+OK 2 messages (%d octets)\r\n1 %d\r\n3 %d\r\n.\r\n" % (s1 + s3, s1, s3)),
            (b"LIST 2\r\n", b"-ERR message 2 already deleted\r\n"),
            (b"UIDL\r\n", b"+OK unique-id listing follows\r\n1 uid-1\r\n3 uid-3\r\n.\r\n"),
            (b"UIDL 2\r\n", b"-ERR message 2 already deleted\r\n"),
            (b"RETR 2\r\n", b"-ERR message 2 already deleted\r\n"),
            (b"TOP 2 0\r\n", b"-ERR message 2 already deleted\r\n"),
            (b"RSET\r\n", b"+OK maildrop has 3 messages (%d octets)\r\n" % TOTAL),
            (b"LIST 2\r\n", b"+OK 2 %d\r\n" % MESSAGES[1].size),
        ]
        for data, expected in steps:
            assert run(conn, data) == ([], expected), data
        assert conn.deleted == set()

    def test_empty_maildrop(self) -> None:
        """An empty snapshot lists nothing and has no message 1."""
        conn = new()
        run(conn, b"USER a\r\nPASS b\r\n", answer=lambda c, e: c.logged_in([], identity="a"))
        assert run(conn, b"STAT\r\nLIST\r\nRETR 1\r\n") == (
            [], b"+OK 0 0\r\n+OK 0 messages (0 octets)\r\n.\r\n" + NO_SUCH
        )


class RetrieveTests:
    """RETR and TOP become Retrieve decisions; the content is streamed."""

    def test_retr(self) -> None:
        """RETR emits Retrieve; send_ok, stuff and finish_retrieve frame the content."""
        conn = logged_in()
        conn.receive_data(b"RETR 2\r\nNOOP\r\n")
        assert conn.next_event() == Retrieve(2, 1, MESSAGES[1], None)
        assert conn.next_event() is PAUSED
        conn.send_ok()
        assert conn.next_event() is PAUSED  # until finish_retrieve
        out = conn.stuff(STORED[1][:20]) + conn.stuff(STORED[1][20:])
        assert conn.next_event() is PAUSED
        conn.finish_retrieve()
        out += conn.data_to_send()
        assert out == (b"+OK %d octets\r\n" % MESSAGES[1].size
                       + b"Subject: two\r\n\r\n..dot line\r\nsecond\r\n.\r\n")
        assert run(conn) == ([], b"+OK\r\n")
        assert conn.retrieved == {1}

    def test_top(self) -> None:
        """TOP emits Retrieve with the line count; TOP is not counted as retrieved."""
        conn = logged_in()
        events, out = run(conn, b"TOP 3 1\r\n")
        assert events == [Retrieve(3, 2, MESSAGES[2], 1)]
        assert out == b"+OK top of message follows\r\nSubject: three\r\nX: y\r\n\r\nline1\r\n.\r\n"
        assert conn.retrieved == set()

    def test_refused(self) -> None:
        """send_err answers Retrieve with -ERR and the session goes on."""
        conn = logged_in()
        conn.receive_data(b"RETR 1\r\nSTAT\r\n")
        assert isinstance(conn.next_event(), Retrieve)
        conn.send_err("message vanished", code="SYS/TEMP")
        assert run(conn) == ([], b"-ERR [SYS/TEMP] message vanished\r\n+OK 3 %d\r\n" % TOTAL)
        assert conn.retrieved == set()

    def test_usage_errors(self) -> None:
        """stuff and finish_retrieve need an accepted Retrieve; no second answer."""
        conn = logged_in()
        with pytest.raises(UsageError):
            conn.stuff(b"x")
        with pytest.raises(UsageError):
            conn.finish_retrieve()
        conn.receive_data(b"RETR 1\r\n")
        conn.next_event()
        conn.send_ok()
        with pytest.raises(UsageError):
            conn.send_ok()
        with pytest.raises(UsageError):
            conn.send_err("late")


def stuffed(chunks: list[bytes], lines: Optional[int] = None) -> tuple[bytes, list[bool]]:
    """Stream ``chunks`` through RETR 1 (or TOP 1 ``lines``); return the content
    after the +OK line and ``retrieve_done`` after each chunk."""
    conn = new()
    run(conn, b"USER a\r\nPASS b\r\n",
        answer=lambda c, e: c.logged_in([MessageInfo(0, "u")], identity="a"))
    conn.receive_data(b"RETR 1\r\n" if lines is None else b"TOP 1 %d\r\n" % lines)
    assert isinstance(conn.next_event(), Retrieve)
    conn.send_ok()
    conn.data_to_send()
    out, done = b"", []
    for chunk in chunks:
        out += conn.stuff(chunk)
        done.append(conn.retrieve_done)
    conn.finish_retrieve()
    return out + conn.data_to_send(), done


STUFF_CASES = [
    ([b"a\nb\n"], b"a\r\nb\r\n"),
    ([b"a\r\nb\r\n"], b"a\r\nb\r\n"),
    ([b".a\n..b\nc.d\n"], b"..a\r\n...b\r\nc.d\r\n"),
    ([b".\n"], b"..\r\n"),
    ([b"a\n", b".b\n"], b"a\r\n..b\r\n"),
    ([b"a\n", b".", b"b\n"], b"a\r\n..b\r\n"),
    ([b"a", b".b\n"], b"a.b\r\n"),
    ([b"a\r", b"\nb\n"], b"a\r\nb\r\n"),
    ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n"),
    ([b"a\r", b"", b"\n"], b"a\r\n"),
    ([b"abc"], b"abc\r\n"),
    ([b"a\nabc"], b"a\r\nabc\r\n"),
    ([b"a\r"], b"a\r\n"),
    ([b"a\rb\n"], b"a\rb\r\n"),
    ([b"a\r", b"b\n"], b"a\rb\r\n"),
    ([b""], b""),
    ([], b""),
    ([b"\n\n"], b"\r\n\r\n"),
]


class StuffTests:
    """stuff(): stored message to wire form, across chunk boundaries."""

    @pytest.mark.parametrize("chunks, content", STUFF_CASES)
    def test_retr(self, chunks: list[bytes], content: bytes) -> None:
        """LF and CRLF become CRLF, leading dots are doubled, and the end is CRLF "." CRLF."""
        assert stuffed(chunks)[0] == content + b".\r\n"

    @pytest.mark.parametrize(
        "lines, content",
        [
            (0, b"H: 1\r\nH: 2\r\n\r\n"),
            (1, b"H: 1\r\nH: 2\r\n\r\n..l1\r\n"),
            (2, b"H: 1\r\nH: 2\r\n\r\n..l1\r\nl2\r\n"),
            (3, b"H: 1\r\nH: 2\r\n\r\n..l1\r\nl2\r\nl3\r\n"),
            (9, b"H: 1\r\nH: 2\r\n\r\n..l1\r\nl2\r\nl3\r\n"),
        ],
    )
    def test_top_limit(self, lines: int, content: bytes) -> None:
        """TOP passes the headers, the blank line and that many body lines."""
        out, done = stuffed([b"H: 1\nH: 2\n\n.l1\nl2\nl3\n"], lines)
        assert out == content + b".\r\n"
        assert done == [lines <= 3]

    def test_top_done_across_chunks(self) -> None:
        """retrieve_done turns True once TOP has its lines, and later chunks give nothing."""
        out, done = stuffed([b"H: 1\n", b"\nl1\nl", b"2 and more", b"\nl3\n", b"l4\n"], 2)
        assert out == b"H: 1\r\n\r\nl1\r\nl2 and more\r\n.\r\n"
        assert done == [False, False, False, True, True]

    def test_top_without_body(self) -> None:
        """A message without a blank line is all headers: TOP passes it whole."""
        assert stuffed([b"H: 1\nH: 2"], 0) == (b"H: 1\r\nH: 2\r\n.\r\n", [False])

    def test_stuff_hands_out_queued_response_first(self) -> None:
        """The +OK line comes out of stuff() when data_to_send() was not drained."""
        conn = logged_in()
        conn.receive_data(b"RETR 1\r\n")
        conn.next_event()
        conn.send_ok("here")
        assert conn.stuff(b"x\n") == b"+OK here\r\nx\r\n"


def reference(message: bytes, lines: Optional[int] = None) -> bytes:
    """The wire form computed line by line from the whole message."""
    parts = message.split(b"\n")
    text = [p[:-1] if p.endswith(b"\r") else p for p in parts[:-1]]
    if parts[-1]:
        text.append(parts[-1][:-1] if parts[-1].endswith(b"\r") else parts[-1])
    if lines is not None and b"" in text:
        blank = text.index(b"")
        text = text[: blank + 1 + lines]
    return b"".join((b"." + t if t.startswith(b".") else t) + b"\r\n" for t in text) + b".\r\n"


@settings(max_examples=300, deadline=None)
@given(
    message=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"b c"]),
                     max_size=30).map(b"".join),
    cuts=st.lists(st.integers(0, 60), max_size=8),
    lines=st.one_of(st.none(), st.integers(0, 4)),
)
def test_stuff_any_chunking(message: bytes, cuts: list[int], lines: Optional[int]) -> None:
    """Any chunking of a stored message gives the same wire bytes as the line-by-line reference."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(message)), len(message)]
    chunks = [message[a:b] for a, b in zip(bounds, bounds[1:])]
    assert stuffed(chunks, lines)[0] == reference(message, lines)



@settings(max_examples=300, deadline=None)
@given(
    message=st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"b c"]),
                     max_size=30).map(b"".join),
    lines=st.one_of(st.none(), st.integers(0, 4)),
)
def test_send_whole_matches_the_reference(message: bytes, lines: Optional[int]) -> None:
    """send_whole(whole(message)) answers a Retrieve with the +OK line and the
    same wire bytes as the line-by-line reference, and releases it."""
    conn = logged_in()
    conn.receive_data(b"RETR 1\r\n" if lines is None else b"TOP 1 %d\r\n" % lines)
    event = conn.next_event()
    assert isinstance(event, Retrieve)
    conn.send_whole(whole(message, lines), "here")
    assert conn.data_to_send() == b"+OK here\r\n" + reference(message, lines)
    assert conn.next_event() is NEED_DATA
    assert (event.index in conn.retrieved) == (lines is None)

class EndingTests:
    """QUIT, UPDATE and EOF."""

    def test_quit_in_transaction(self) -> None:
        """QUIT emits Update with the deleted and retrieved indexes, then Quit."""
        conn = logged_in()
        run(conn, b"DELE 3\r\nRETR 2\r\nTOP 1 0\r\nDELE 1\r\n")
        conn.receive_data(b"QUIT\r\nNOOP\r\n")
        assert conn.next_event() == Update(deleted=(0, 2), retrieved=(1,))
        assert conn.state is State.UPDATE
        assert conn.next_event() is PAUSED
        conn.send_ok()
        assert conn.data_to_send() == b"+OK bye\r\n"
        assert run(conn) == ([Quit()], b"")
        assert conn.closed

    def test_update_failed(self) -> None:
        """A failed update answers -ERR and still ends with Quit."""
        conn = logged_in(max_errors=0)
        run(conn, b"DELE 1\r\n")
        events, _ = run(conn, b"QUIT\r\n",
                        answer=lambda c, e: c.send_err("some messages kept", code="SYS/TEMP"))
        assert events == [Update((0,), ()), Quit()]
        assert conn.closed

    def test_update_output(self) -> None:
        """The -ERR answer to Update is sent as given, uncounted."""
        conn = logged_in(max_errors=0)
        conn.receive_data(b"QUIT\r\n")
        conn.next_event()
        conn.send_err("disk trouble", code="SYS/TEMP")
        assert conn.data_to_send() == b"-ERR [SYS/TEMP] disk trouble\r\n"

    def test_eof_in_transaction(self) -> None:
        """A dropped connection gives ConnectionClosed and no Update: nothing is deleted."""
        conn = logged_in()
        run(conn, b"DELE 1\r\n")
        conn.receive_data(b"")
        assert run(conn) == ([ConnectionClosed()], b"")
        conn.receive_data(b"QUIT\r\n")
        assert run(conn) == ([], b"")

    def test_eof_after_pending_decision(self) -> None:
        """EOF waits behind a pending decision and the commands before it."""
        conn = new()
        conn.receive_data(b"USER a\r\nPASS b\r\nSTAT\r\n")
        conn.receive_data(b"")
        assert isinstance(conn.next_event(), Authenticate)
        assert conn.next_event() is PAUSED
        conn.logged_in(MESSAGES, identity="a")
        assert conn.next_event() == ConnectionClosed()
        assert conn.data_to_send().endswith(b"+OK 3 %d\r\n" % TOTAL)

    def test_too_many_errors(self) -> None:
        """The error past max_errors is replaced by -ERR too many errors and Closing."""
        conn = new(max_errors=2)
        events, out = run(conn, b"A\r\nB\r\nC\r\nNOOP\r\n")
        assert events == [Closing(TOO_MANY_ERRORS)]
        assert out == b"-ERR unknown command\r\n" * 2 + b"-ERR too many errors\r\n"
        conn.receive_data(b"CAPA\r\n")
        assert run(conn) == ([], b"")

    def test_auth_failures_count(self) -> None:
        """Refused logins count toward max_errors."""
        conn = new(max_errors=1)
        refuse = lambda c, e: c.send_err("bad", code="AUTH")  # noqa: E731
        events, out = run(conn, b"USER a\r\nPASS b\r\nUSER a\r\nPASS c\r\n", answer=refuse)
        assert kinds(events) == [Authenticate, Authenticate, Closing]
        assert out.endswith(b"-ERR [AUTH] bad\r\n+OK send PASS\r\n-ERR too many errors\r\n")


class LineTests:
    """Command framing."""

    def test_longest_line(self) -> None:
        """A command of exactly 255 octets with CRLF is accepted, 256 is not."""
        name = b"u" * (MAX_COMMAND - len(b"USER \r\n"))
        conn = new()
        assert run(conn, b"USER " + name + b"\r\n") == ([], b"+OK send PASS\r\n")
        assert run(conn, b"USER " + name + b"u\r\n") == ([], b"-ERR line too long\r\n")

    def test_long_line_discarded_to_lf(self) -> None:
        """An over-long line is discarded up to its LF, across reads; the next command runs."""
        conn = new()
        assert run(conn, b"X" * 13000) == ([], b"")
        assert conn.buffered <= MAX_COMMAND + sasl.MAX_RESPONSE
        assert run(conn, b"Y" * 1000 + b"\r\nNOOP\r\nCAPA\r\n")[1].startswith(
            b"-ERR line too long\r\n" + NOT_NOW + b"+OK Capability"
        )

    def test_bare_lf_and_case(self) -> None:
        """A bare LF ends a command and verbs are case-insensitive."""
        conn = new()
        assert run(conn, b"user alice\nQuIt\n") == ([Quit()], b"+OK send PASS\r\n+OK bye\r\n")

    def test_pipelined_order(self) -> None:
        """Pipelined commands wait behind a decision, so responses keep their order."""
        conn = logged_in()
        conn.receive_data(b"STAT\r\nRETR 1\r\nLIST 1\r\nQUIT\r\n")
        assert isinstance(conn.next_event(), Retrieve)
        assert conn.data_to_send() == b"+OK 3 %d\r\n" % TOTAL
        assert conn.next_event() is PAUSED
        conn.send_ok("go")
        body = conn.stuff(STORED[0])
        conn.finish_retrieve()
        assert body.startswith(b"+OK go\r\n")
        assert conn.data_to_send() == b".\r\n"
        assert isinstance(conn.next_event(), Update)
        assert conn.data_to_send() == b"+OK 1 %d\r\n" % MESSAGES[0].size


FRAGMENTS = [
    b"USER alice\r\n", b"PASS secret\r\n", b"PASS wrong\r\n", b"STAT\r\n", b"LIST\r\n",
    b"LIST 2\r\n", b"UIDL\r\n", b"UIDL 3\r\n", b"RETR 1\r\n", b"RETR 2\r\n", b"TOP 3 1\r\n",
    b"DELE 1\r\n", b"DELE 2\r\n", b"RSET\r\n", b"NOOP\r\n", b"CAPA\r\n", b"AUTH PLAIN\r\n",
    plain() + b"\r\n", b"AUTH LOGIN\r\n", b64(b"alice") + b"\r\n", b"*\r\n", b"junk\r\n",
    b"\n", b"X" * 300 + b"\r\n", b"LIST 1", b" 2\r\n", b"\r", b"\x00\r\n", b"QUIT\r\n",
]


def picky(conn: POP3ServerConnection, event: Event) -> None:
    """Accept the password "secret" only; accept everything else."""
    if isinstance(event, Authenticate) and event.credentials.password != "secret":
        conn.send_err("bad", code="AUTH")
    else:
        accept(conn, event)


def transcript(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    """Feed ``data`` cut at ``cuts``, then EOF; return the events and bytes."""
    conn = new(auth_mechanisms=("PLAIN", "LOGIN"), max_errors=1000)
    events: list[Event] = []
    out = b""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        more, more_out = run(conn, data[start:end], answer=picky)
        events += more
        out += more_out
    conn.receive_data(b"")
    more, more_out = run(conn, answer=picky)
    return events + more, out + more_out


RESPONSE = re.compile(rb"(\+OK|-ERR|\+)( [^\r\n]*)?")


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_chunking_same_result(data: st.DataObject) -> None:
    """Any chunking of the same byte stream yields the same events and output bytes."""
    stream = b"".join(data.draw(st.lists(st.sampled_from(FRAGMENTS), max_size=30)))
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    whole = transcript(stream, [])
    assert transcript(stream, cuts) == whole
    assert whole[0][-1] in (ConnectionClosed(), Quit())


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    """Arbitrary input after login never raises and every response starts well."""
    events, out = transcript(b"USER alice\r\nPASS secret\r\n" + data, cuts)
    for line in out.split(b"\r\n")[:2]:
        assert line == b"" or RESPONSE.match(line)


def test_junk_commands_end_the_session_past_the_limit():
    """NOOP, RSET and CAPA count as commands without work: past junk_limit
    the session ends with -ERR [SYS/TEMP] (a NOOP now and then cannot hold a
    session for ever); real work resets nothing but is not counted."""
    from mailserver.sansio.pop3 import POP3ServerConnection
    from mailserver.sansio.pop3_events import TOO_MANY_JUNK_COMMANDS, Authenticate, Closing

    conn = POP3ServerConnection(hostname="mx.example.test", plaintext_auth=True, junk_limit=3)
    conn.greeting()
    conn.receive_data(b"USER a\r\nPASS b\r\n")
    event = conn.next_event()
    assert isinstance(event, Authenticate)
    conn.logged_in([], identity="a")
    conn.data_to_send()
    conn.receive_data(b"NOOP\r\nRSET\r\nSTAT\r\nCAPA\r\nNOOP\r\nNOOP\r\n")
    events = []
    while True:
        event = conn.next_event()
        if not isinstance(event, Closing) and event.__class__.__name__ in ("Sentinel",):
            break
        events.append(event)
        if isinstance(event, Closing):
            break
    out = conn.data_to_send().decode()
    assert out.count("+OK") >= 4
    assert out.endswith("-ERR [SYS/TEMP] too many commands without work\r\n")
    assert isinstance(events[-1], Closing) and events[-1].reason == TOO_MANY_JUNK_COMMANDS
    assert conn.closed
