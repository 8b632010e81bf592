"""Tests for SMTP AUTH (RFC 4954) in mailserver.sansio.smtp_server.

The SASL mechanics are mailserver.sasl's (tests/unit/test_sasl.py); these
tests cover how the core offers AUTH, runs the exchange over the wire,
hands the credentials to the application and keeps the identity.
"""

from __future__ import annotations

import base64
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver import reply as R
from mailserver import sasl
from mailserver.reply import Reply
from mailserver.sansio.smtp_events import (
    AUTH_TOO_LONG,
    NEED_DATA,
    PAUSED,
    AuthFailed,
    Authenticate,
    Closing,
    ConnectionClosed,
    Event,
    Hello,
    MailFrom,
    RcptTo,
    Reset,
)
from mailserver.sansio.smtp_server import (
    Limits,
    Mode,
    SMTPServerConnection,
    State,
    UsageError,
)
from tests.unit.test_smtp_server import (
    CAPABILITIES,
    HOST,
    MAIL,
    RCPT,
    kinds,
    new,
    ok_answer,
    padded,
    replies,
)

BOTH = ("PLAIN", "LOGIN")
ALICE = sasl.Credentials("PLAIN", "alice", "secret")
CHALLENGE_EMPTY = b"334 \r\n"
CHALLENGE_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
CHALLENGE_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"

Verdict = Callable[[SMTPServerConnection, Event], None]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain(login: bytes = b"alice", password: bytes = b"secret", authzid: bytes = b"") -> bytes:
    """The base64 PLAIN message ``authzid NUL login NUL password``."""
    return b64(authzid + b"\0" + login + b"\0" + password)


def accept(conn: SMTPServerConnection, event: Event) -> None:
    """Accept every decision; AUTH as the lower-cased login."""
    if isinstance(event, Authenticate):
        conn.send(R.AUTH_OK, identity=event.credentials.login.lower())
    else:
        conn.send(ok_answer(conn, event))  # type: ignore[arg-type]


def refuse_auth(reply: Reply) -> Verdict:
    """Answer Authenticate with ``reply``, anything else positively."""

    def verdict(conn: SMTPServerConnection, event: Event) -> None:
        if isinstance(event, Authenticate):
            conn.send(reply)
        else:
            accept(conn, event)

    return verdict


def drive(
    conn: SMTPServerConnection, data: bytes = b"", verdict: Verdict = accept
) -> tuple[list[Event], bytes]:
    """Feed ``data``, take events until NEED_DATA answering every decision with
    ``verdict``; return the events and the reply bytes."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events, conn.data_to_send()
        assert event is not PAUSED, "drive() answers every decision"
        events.append(event)
        if event.NEEDS_REPLY:
            verdict(conn, event)


def session(mode: Mode = Mode.SUBMISSION, **kwargs) -> SMTPServerConnection:
    """A greeted connection offering AUTH PLAIN LOGIN over (implicit) TLS."""
    kwargs.setdefault("auth_mechanisms", BOTH)
    kwargs.setdefault("tls_active", True)
    conn = new(mode, **kwargs)
    drive(conn, b"EHLO client.example\r\n")
    return conn


def ehlo_lines(out: bytes) -> list[str]:
    """The keyword lines of an EHLO reply (without the host line)."""
    return [line[4:].decode() for line in out.split(b"\r\n")[1:-1]]


# --- the exchange ----------------------------------------------------------------


def test_plain_initial_response() -> None:
    """AUTH PLAIN with an initial response becomes one Authenticate decision;
    AUTH_OK with an identity authenticates the session as that identity."""
    conn = session()
    events, out = drive(conn, b"AUTH PLAIN " + plain(b"Alice") + b"\r\n")
    assert events == [Authenticate(sasl.Credentials("PLAIN", "Alice", "secret"))]
    assert out == R.AUTH_OK.to_bytes()
    assert conn.authenticated and conn.auth_identity == "alice"
    assert conn.state is State.READY and conn.errors == 0


def test_plain_empty_challenge() -> None:
    """AUTH PLAIN alone gets an empty 334 challenge; the next line is the response."""
    conn = session()
    assert drive(conn, b"AUTH plain\r\n") == ([], CHALLENGE_EMPTY)
    assert conn.state is State.AUTH
    events, out = drive(conn, plain() + b"\r\n")
    assert events == [Authenticate(ALICE)] and out == R.AUTH_OK.to_bytes()


def test_login_two_steps() -> None:
    """AUTH LOGIN asks for the username, then the password, in base64 334 replies."""
    conn = session()
    assert drive(conn, b"AUTH LOGIN\r\n") == ([], CHALLENGE_USERNAME)
    assert drive(conn, b64(b"alice") + b"\r\n") == ([], CHALLENGE_PASSWORD)
    events, out = drive(conn, b64(b"secret") + b"\r\n")
    assert events == [Authenticate(sasl.Credentials("LOGIN", "alice", "secret"))]
    assert out == R.AUTH_OK.to_bytes() and conn.auth_identity == "alice"


def test_login_initial_response() -> None:
    """AUTH LOGIN with the username as initial response asks only for the password."""
    conn = session()
    events, out = drive(conn, b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n")
    assert events == [Authenticate(sasl.Credentials("LOGIN", "alice", "secret"))]
    assert out == CHALLENGE_PASSWORD + R.AUTH_OK.to_bytes()


def test_bare_lf_ends_a_response() -> None:
    """A response line may end in a bare LF, like a command line."""
    conn = session()
    events, _ = drive(conn, b"AUTH PLAIN\n" + plain() + b"\n")
    assert events == [Authenticate(ALICE)]


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"LOGIN"])
def test_empty_initial_response(mechanism: bytes) -> None:
    """"=" is an empty initial response (not a request for a challenge); neither
    mechanism accepts empty data, so it is AUTH_MALFORMED."""
    conn = session()
    events, out = drive(conn, b"AUTH " + mechanism + b" =\r\n")
    assert events == [AuthFailed(mechanism.decode(), sasl.MALFORMED)]
    assert out == R.AUTH_MALFORMED.to_bytes()


@pytest.mark.parametrize(
    "mechanism, before",
    [
        (b"PLAIN", b""),  # after the empty challenge
        (b"LOGIN", b""),  # at "Username:"
        (b"LOGIN", b64(b"alice") + b"\r\n"),  # at "Password:"
        (b"LOGIN " + b64(b"alice"), b""),  # at "Password:" after an initial response
    ],
)
def test_cancel(mechanism: bytes, before: bytes) -> None:
    """"*" at any challenge cancels: AUTH_CANCELLED, AuthFailed, and the session
    goes on unauthenticated."""
    conn = session()
    events, out = drive(conn, b"AUTH " + mechanism + b"\r\n" + before + b"*\r\nNOOP\r\n")
    name = mechanism.split()[0].decode()
    assert events == [AuthFailed(name, sasl.CANCELLED)]
    assert out.endswith(replies(R.AUTH_CANCELLED, R.NOOP_OK))
    assert not conn.authenticated and conn.auth_identity is None
    assert conn.state is State.READY and conn.errors == 1


def test_star_as_initial_response_is_malformed() -> None:
    """"*" only cancels a challenge; as an initial response it is not base64."""
    conn = session()
    events, out = drive(conn, b"AUTH PLAIN *\r\n")
    assert events == [AuthFailed("PLAIN", sasl.MALFORMED)]
    assert out == R.AUTH_MALFORMED.to_bytes()


MALFORMED = [
    b"not-base64!",
    b"YWxpY2U",  # missing padding
    b"YWxp\tY2U=",  # whitespace inside
    b64(b"alice\0secret"),  # one NUL
    b64(b"\0alice\0secret\0"),  # three NULs
    b64(b"\0\0secret"),  # empty login
    b64(b"\0alice\0"),  # empty password
    b64(b"\0al\xffice\0secret"),  # not UTF-8
    "YWxpY2Ü=".encode(),  # non-ASCII in the line itself
]


@pytest.mark.parametrize("response", MALFORMED)
@pytest.mark.parametrize("initial", [True, False])
def test_malformed_plain(response: bytes, initial: bool) -> None:
    """Bad base64, the wrong number of NULs, empty fields and non-UTF-8 are
    AUTH_MALFORMED (501 5.5.2), as initial response or after the challenge."""
    conn = session()
    data = (b"AUTH PLAIN " if initial else b"AUTH PLAIN\r\n") + response + b"\r\n"
    events, out = drive(conn, data + b"NOOP\r\n")
    assert events == [AuthFailed("PLAIN", sasl.MALFORMED)]
    assert out.endswith(replies(R.AUTH_MALFORMED, R.NOOP_OK))
    assert not conn.authenticated


def test_malformed_login_response() -> None:
    """A LOGIN username that is not base64 ends the exchange with AUTH_MALFORMED."""
    conn = session()
    events, out = drive(conn, b"AUTH LOGIN\r\n%%%\r\n")
    assert events == [AuthFailed("LOGIN", sasl.MALFORMED)]
    assert out == CHALLENGE_USERNAME + R.AUTH_MALFORMED.to_bytes()


@pytest.mark.parametrize(
    "authzid, expected",
    [
        (b"bob", [AuthFailed("PLAIN", sasl.AUTHZID)]),
        (b"alice", [Authenticate(sasl.Credentials("PLAIN", "alice", "secret", "alice"))]),
    ],
)
def test_plain_authzid(authzid: bytes, expected: list[Event]) -> None:
    """A PLAIN authzid other than the login is refused by the core with
    AUTH_FAILED (535); the login's own name is accepted."""
    conn = session()
    events, out = drive(conn, b"AUTH PLAIN " + plain(authzid=authzid) + b"\r\n")
    assert events == expected
    assert out == (R.AUTH_FAILED if authzid == b"bob" else R.AUTH_OK).to_bytes()


@pytest.mark.parametrize("end", [b"\r\n", b"\n"])
def test_response_line_limit(end: bytes) -> None:
    """A response of sasl.MAX_RESPONSE octets is read and judged; one octet more
    is AUTH_LINE_TOO_LONG (500 5.5.6), discarded to its LF, and the session
    goes on."""
    conn = session()
    longest = b"A" * sasl.MAX_RESPONSE  # valid base64 of NULs: malformed PLAIN
    events, out = drive(conn, b"AUTH PLAIN\r\n" + longest + end)
    assert events == [AuthFailed("PLAIN", sasl.MALFORMED)]
    assert out == CHALLENGE_EMPTY + R.AUTH_MALFORMED.to_bytes()
    too_long = b"A" * (sasl.MAX_RESPONSE + 1) + b" NOOP" + end
    events, out = drive(conn, b"AUTH PLAIN\r\n" + too_long + b"NOOP\r\n")
    assert events == [AuthFailed("PLAIN", AUTH_TOO_LONG)]
    assert out == CHALLENGE_EMPTY + replies(R.AUTH_LINE_TOO_LONG, R.NOOP_OK)
    assert conn.state is State.READY


def test_endless_response_is_not_buffered() -> None:
    """An endless response line never holds more than its limit in the buffer."""
    conn = session()
    drive(conn, b"AUTH LOGIN\r\n")
    for _ in range(10):
        assert drive(conn, b"A" * 4096) == ([], b"")
        assert conn.buffered <= sasl.MAX_RESPONSE + 2
    assert drive(conn, b"\r\nNOOP\r\n")[1] == replies(R.AUTH_LINE_TOO_LONG, R.NOOP_OK)


def test_eof_during_exchange() -> None:
    """The peer closing during the exchange gives ConnectionClosed."""
    conn = session()
    drive(conn, b"AUTH LOGIN\r\n")
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()


# --- the application's answer -------------------------------------------------------


def test_temporary_failure_leaves_unauthenticated() -> None:
    """454 leaves the session unauthenticated and counts as an error; AUTH may
    be tried again."""
    conn = session()
    line = b"AUTH PLAIN " + plain() + b"\r\n"
    events, out = drive(conn, line, refuse_auth(R.AUTH_TEMPORARY))
    assert kinds(events) == [Authenticate] and out == R.AUTH_TEMPORARY.to_bytes()
    assert not conn.authenticated and conn.auth_identity is None and conn.errors == 1
    assert conn.state is State.READY
    assert drive(conn, line)[1] == R.AUTH_OK.to_bytes() and conn.authenticated


def test_failures_count_towards_error_limit() -> None:
    """535 answers count as errors: past max_errors the core closes with 421."""
    conn = session(limits=Limits(max_errors=1))
    line = b"AUTH PLAIN " + plain(password=b"wrong") + b"\r\n"
    events, out = drive(conn, line * 3, refuse_auth(R.AUTH_FAILED))
    assert kinds(events) == [Authenticate, Authenticate, Closing]
    assert out == replies(R.AUTH_FAILED, R.AUTH_FAILED, R.TOO_MANY_ERRORS)
    assert conn.closed


def test_core_failures_count_towards_error_limit() -> None:
    """The core's own AUTH refusals count too; AuthFailed comes before Closing."""
    conn = session(limits=Limits(max_errors=0))
    events, out = drive(conn, b"AUTH PLAIN\r\n*\r\n")
    assert events == [AuthFailed("PLAIN", sasl.CANCELLED), Closing(R.TOO_MANY_ERRORS)]


def test_application_421_closes() -> None:
    """A 421 answer to Authenticate (LOGIN_BLOCKED) closes the session."""
    conn = session()
    line = b"AUTH PLAIN " + plain() + b"\r\n"
    events, out = drive(conn, line + b"NOOP\r\n", refuse_auth(R.LOGIN_BLOCKED))
    assert kinds(events) == [Authenticate, Closing]
    assert out == R.LOGIN_BLOCKED.to_bytes() and conn.closed


def test_pipelined_commands_wait_for_the_decision() -> None:
    """Commands pipelined after AUTH are not looked at until Authenticate is
    answered, so MAIL sees the outcome."""
    conn = session()
    conn.receive_data(b"AUTH PLAIN " + plain() + b"\r\n" + MAIL + RCPT)
    event = conn.next_event()
    assert event == Authenticate(ALICE)
    assert conn.next_event() is PAUSED and conn.data_to_send() == b""
    conn.send(R.AUTH_OK, identity="alice")
    events, out = drive(conn)
    assert kinds(events) == [MailFrom, RcptTo]
    assert out == replies(R.AUTH_OK, R.SENDER_OK, R.RCPT_OK)


def test_pipelined_mail_after_refused_auth() -> None:
    """After a refused AUTH, pipelined MAIL on submission gets AUTH_REQUIRED."""
    conn = session()
    events, out = drive(conn, b"AUTH PLAIN " + plain() + b"\r\n" + MAIL, refuse_auth(R.AUTH_FAILED))
    assert kinds(events) == [Authenticate]
    assert out == replies(R.AUTH_FAILED, R.AUTH_REQUIRED)


@pytest.mark.parametrize(
    "reply, identity",
    [
        (R.AUTH_OK, None),  # who?
        (R.AUTH_OK, ""),
        (R.OK, "alice"),  # success is 235
        (R.AUTH_FAILED, "alice"),  # no identity for a failure
    ],
)
def test_answer_misuse(reply: Reply, identity: object) -> None:
    """A positive answer to Authenticate is a 235 with a non-empty identity, a
    negative one has none; anything else is a UsageError and changes nothing."""
    conn = session()
    conn.receive_data(b"AUTH PLAIN " + plain() + b"\r\n")
    conn.next_event()
    with pytest.raises(UsageError):
        conn.send(reply, identity=identity)  # type: ignore[arg-type]
    assert conn.next_event() is PAUSED and not conn.authenticated
    conn.send(R.AUTH_OK, identity="alice")
    assert conn.auth_identity == "alice"


def test_identity_only_for_authenticate() -> None:
    """identity= with any other decision is a UsageError."""
    conn = session()
    conn.authenticated = True
    conn.receive_data(MAIL)
    conn.next_event()
    with pytest.raises(UsageError):
        conn.send(R.SENDER_OK, identity="alice")


def test_authenticate_repr_hides_password() -> None:
    """The Authenticate repr shows mechanism and login, never the password."""
    event = Authenticate(sasl.Credentials("PLAIN", "alice", "hunter2"))
    text = repr(event)
    assert "hunter2" not in text and "alice" in text and "PLAIN" in text
    assert "hunter2" not in str(event)


# --- when AUTH is offered -------------------------------------------------------------


def test_not_enabled_on_port_25() -> None:
    """Without mechanisms (the MX default) AUTH is not advertised and gets
    503 5.5.1 Authentication not enabled, with or without TLS."""
    for kwargs in ({}, {"tls_active": True}):
        conn = new(**kwargs)
        _, out = drive(conn, b"EHLO c\r\n")
        assert not any(line.startswith("AUTH") for line in ehlo_lines(out))
        assert drive(conn, b"AUTH PLAIN\r\n") == ([], R.AUTH_NOT_ENABLED.to_bytes())
        assert R.AUTH_NOT_ENABLED.to_bytes().startswith(b"503 5.5.1 Authentication not enabled")


def test_not_enabled_without_any_tls() -> None:
    """Requiring TLS on a port that can never have it means AUTH is not enabled
    there (not 'issue STARTTLS', which is not offered either)."""
    conn = session(tls_active=False, tls_available=False)
    assert drive(conn, b"AUTH PLAIN\r\n") == ([], R.AUTH_NOT_ENABLED.to_bytes())


def test_auth_needs_tls_first() -> None:
    """On submission before STARTTLS, AUTH is not advertised and gets
    MUST_STARTTLS (530); after tls_started it is advertised and works."""
    conn = session(tls_active=False)
    _, out = drive(conn, b"EHLO c\r\n")
    assert ehlo_lines(out) == [*CAPABILITIES, "STARTTLS"]
    assert drive(conn, b"AUTH PLAIN " + plain() + b"\r\n") == ([], R.MUST_STARTTLS.to_bytes())
    drive(conn, b"STARTTLS\r\n")
    conn.tls_started()
    _, out = drive(conn, b"EHLO c\r\n")
    assert ehlo_lines(out) == [*CAPABILITIES, "AUTH PLAIN LOGIN"]
    assert drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")[1] == R.AUTH_OK.to_bytes()


def test_auth_without_tls_when_allowed() -> None:
    """With auth_requires_tls=False AUTH is advertised in plaintext, before STARTTLS,
    with the configured mechanisms only."""
    conn = new(Mode.SUBMISSION, auth_mechanisms=("plain",), auth_requires_tls=False)
    _, out = drive(conn, b"EHLO c\r\n")
    assert ehlo_lines(out) == [*CAPABILITIES, "AUTH PLAIN", "STARTTLS"]
    assert drive(conn, b"AUTH LOGIN\r\n") == ([], R.AUTH_UNKNOWN_MECHANISM.to_bytes())


def test_unknown_mechanism_configured() -> None:
    """The constructor refuses mechanisms mailserver.sasl does not implement."""
    with pytest.raises(ValueError):
        SMTPServerConnection(hostname=HOST, auth_mechanisms=("CRAM-MD5",))


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"AUTH", R.BAD_ARGUMENTS),
        (b"AUTH ", R.BAD_ARGUMENTS),
        (b"AUTH PLAIN abc def", R.BAD_ARGUMENTS),
        (b"AUTH CRAM-MD5", R.AUTH_UNKNOWN_MECHANISM),
        (b"AUTH XPLAIN", R.AUTH_UNKNOWN_MECHANISM),
        ("AUTH PLAİN".encode(), R.AUTH_UNKNOWN_MECHANISM),
    ],
)
def test_auth_command_refused(line: bytes, reply: Reply) -> None:
    """A missing or extra argument is 501, an unknown mechanism 504; both count."""
    conn = session()
    assert drive(conn, line + b"\r\n") == ([], reply.to_bytes())
    assert conn.state is State.READY and conn.errors == 1


def test_auth_before_ehlo() -> None:
    """AUTH needs a greeting first."""
    conn = new(Mode.SUBMISSION, auth_mechanisms=BOTH, tls_active=True)
    assert drive(conn, b"AUTH PLAIN\r\n") == ([], R.NEED_HELO.to_bytes())


def test_auth_twice() -> None:
    """After a successful AUTH, another AUTH gets AUTH_ALREADY (503)."""
    conn = session()
    drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")
    assert drive(conn, b"AUTH LOGIN\r\n") == ([], R.AUTH_ALREADY.to_bytes())
    assert conn.auth_identity == "alice"


def test_auth_in_transaction() -> None:
    """AUTH inside a mail transaction gets AUTH_IN_TRANSACTION (503) and the
    transaction is kept."""
    conn = session(Mode.MX)
    drive(conn, MAIL)
    assert drive(conn, b"AUTH PLAIN " + plain() + b"\r\n") == (
        [], R.AUTH_IN_TRANSACTION.to_bytes()
    )
    assert conn.state is State.MAIL and not conn.authenticated


def test_starttls_after_auth_refused() -> None:
    """STARTTLS after a successful AUTH is out of sequence (503 5.5.1)."""
    conn = session(tls_active=False, tls_available=True, auth_requires_tls=False)
    drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")
    assert drive(conn, b"STARTTLS\r\n") == ([], R.BAD_SEQUENCE.to_bytes())
    assert conn.auth_identity == "alice"


def test_identity_forgotten_on_tls_started() -> None:
    """tls_started() forgets the identity with the rest (a guard: the core
    itself refuses STARTTLS after AUTH, so only an adapter could set one)."""
    conn = session(tls_active=False, tls_available=True)
    drive(conn, b"STARTTLS\r\n")
    conn.authenticated, conn.auth_identity = True, "alice"
    conn.tls_started()
    assert not conn.authenticated and conn.auth_identity is None


def test_rset_and_ehlo_keep_authentication() -> None:
    """RSET and EHLO reset the transaction, not the authentication."""
    conn = session()
    drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")
    events, _ = drive(conn, MAIL + b"RSET\r\n" + MAIL + b"EHLO c\r\n")
    assert kinds(events) == [MailFrom, Reset, MailFrom, Reset, Hello]
    assert conn.authenticated and conn.auth_identity == "alice"


def test_mail_before_auth_on_submission() -> None:
    """MAIL before AUTH on submission gets AUTH_REQUIRED (530); after AUTH it
    reaches the application."""
    conn = session()
    assert drive(conn, MAIL) == ([], R.AUTH_REQUIRED.to_bytes())
    events, out = drive(conn, b"AUTH PLAIN " + plain() + b"\r\n" + MAIL)
    assert kinds(events) == [Authenticate, MailFrom]
    assert out == replies(R.AUTH_OK, R.SENDER_OK)


# --- MAIL FROM ... AUTH= ------------------------------------------------------------


@pytest.mark.parametrize(
    "param, decoded",
    [
        (b"AUTH=<>", "<>"),
        (b"auth=alice@a.example", "alice@a.example"),
        (b"AUTH=e+3Dmc2@example.org", "e=mc2@example.org"),  # RFC 4954 §5's example
        (b"AUTH=a+2Bb@example.org", "a+b@example.org"),
        (b"AUTH=+3C+3E", "<>"),
    ],
)
def test_mail_auth_param(param: bytes, decoded: str) -> None:
    """With AUTH advertised, MAIL's AUTH= is decoded from xtext into params["AUTH"]."""
    conn = session()
    drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")
    events, out = drive(conn, MAIL[:-2] + b" " + param + b"\r\n")
    assert kinds(events) == [MailFrom] and events[0].params["AUTH"] == decoded


@pytest.mark.parametrize(
    "param",
    [
        b"AUTH",  # no value
        b"AUTH=a+3d@example.org",  # hex digits are upper case
        b"AUTH=a+3@example.org",
        b"AUTH=a+@example.org",
        b"AUTH=alice",  # not an addr-spec
        b"AUTH=+40r.example:a@b.example",  # a source route
        b"AUTH=a@b.example+0D",  # CR
        b"AUTH=a+FF@b.example",  # not UTF-8
        b"AUTH=<alice@a.example>",  # xtext allows it, but it is a path
    ],
)
def test_mail_bad_auth_param(param: bytes) -> None:
    """A bad xtext, or one that decodes to neither <> nor an addr-spec, is 501 5.5.4."""
    conn = session()
    drive(conn, b"AUTH PLAIN " + plain() + b"\r\n")
    assert drive(conn, MAIL[:-2] + b" " + param + b"\r\n") == ([], R.BAD_ARGUMENTS.to_bytes())


def test_mail_auth_param_needs_auth_advertised() -> None:
    """Where AUTH is not advertised, AUTH= is an unknown parameter (555)."""
    conn = new()
    drive(conn, b"EHLO c\r\n")
    assert drive(conn, MAIL[:-2] + b" AUTH=<>\r\n") == ([], R.PARAM_NOT_RECOGNIZED.to_bytes())


# --- line limits ----------------------------------------------------------------------


def test_line_limits_follow_auth() -> None:
    """MAIL may grow by 500 octets and AUTH carry a MAX_RESPONSE initial response
    only while AUTH is advertised: not before TLS, and from tls_started() on."""
    conn = session(Mode.MX, tls_active=False, tls_available=True)
    mail = padded(b"MAIL FROM:<a@b.example> AUTH=", b"@c.example", 1064)
    assert drive(conn, mail) == ([], R.LINE_TOO_LONG.to_bytes())
    drive(conn, b"STARTTLS\r\n")
    conn.tls_started()
    drive(conn, b"EHLO c\r\n")
    assert drive(conn, mail) == ([], R.BAD_ARGUMENTS.to_bytes())  # read: local part too long
    assert drive(conn, padded(b"MAIL ", b"", 1065)) == ([], R.LINE_TOO_LONG.to_bytes())
    long_initial = b"AUTH PLAIN " + plain(password=b"p" * 9000) + b"\r\n"
    events, _ = drive(conn, long_initial)
    assert kinds(events) == [Authenticate]


def test_catalog_auth_replies() -> None:
    """The AUTH and submission replies have the codes the RFCs and adapters expect."""
    expected = {
        "AUTH_OK": (235, (2, 7, 0)),
        "AUTH_FAILED": (535, (5, 7, 8)),
        "AUTH_TEMPORARY": (454, (4, 7, 0)),
        "AUTH_NOT_ENABLED": (503, (5, 5, 1)),
        "AUTH_ALREADY": (503, (5, 5, 1)),
        "AUTH_IN_TRANSACTION": (503, (5, 5, 1)),
        "AUTH_UNKNOWN_MECHANISM": (504, (5, 5, 4)),
        "AUTH_LINE_TOO_LONG": (500, (5, 5, 6)),
        "AUTH_CANCELLED": (501, (5, 7, 0)),
        "AUTH_MALFORMED": (501, (5, 5, 2)),
        "SENDER_NOT_OWNED": (553, (5, 7, 1)),
        "FROM_NOT_OWNED": (550, (5, 7, 1)),
        "RATE_LIMITED": (450, (4, 7, 1)),
        "LOGIN_BLOCKED": (421, (4, 7, 0)),
    }
    catalog = R.catalog()
    assert {name: (catalog[name].code, catalog[name].enhanced) for name in expected} == expected
    assert b" AUTH" in R.HELP.to_bytes()


# --- any chunking ------------------------------------------------------------------------

AUTH_FRAGMENTS = [
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN " + plain() + b"\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH LOGIN " + b64(b"alice") + b"\r\n",
    b64(b"alice") + b"\r\n",
    b64(b"secret") + b"\r\n",
    plain() + b"\r\n",
    plain(authzid=b"bob") + b"\r\n",
    b"*\r\n",
    b"=\r\n",
    b"A" * 5000,
    b"\r\n",
    b"\n",
    MAIL,
    RCPT,
    b"RSET\r\n",
    b"NOOP\r\n",
    b"MAIL FROM:<a@b.example> AUTH=e+3Dmc2@example.org\r\n",
]


def auth_transcript(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    """Feed ``data`` cut at ``cuts`` to a submission session, answering AUTH
    for "alice" only; return the events and bytes."""
    conn = session(limits=Limits(max_errors=1000))

    def verdict(conn: SMTPServerConnection, event: Event) -> None:
        if isinstance(event, Authenticate) and event.credentials.password != "secret":
            conn.send(R.AUTH_FAILED)
        else:
            accept(conn, event)

    events: list[Event] = []
    out = b""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        more, more_out = drive(conn, data[start:end], verdict)
        events += more
        out += more_out
    return events, out


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_auth_any_chunking_same_result(data: st.DataObject) -> None:
    """Any chunking of a stream of AUTH exchanges and commands gives the same
    events and reply bytes, and every AUTH-related reply keeps its class."""
    parts = data.draw(st.lists(st.sampled_from(AUTH_FRAGMENTS), max_size=30))
    stream = b"".join(parts)
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))
    whole = auth_transcript(stream, [])
    assert auth_transcript(stream, cuts) == whole
    for line in whole[1].split(b"\r\n")[:-1]:
        code, text = line[:3], line[4:]
        assert code == b"334" or text[:1] == code[:1], line
