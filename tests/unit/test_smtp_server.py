"""Tests for mailserver.sansio.smtp_server: the sans-IO SMTP/LMTP server core.

Bytes go in, events and reply bytes come out; expected replies are the
catalog constants from mailserver.reply.
"""

from __future__ import annotations

import re
from typing import Callable, Optional, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailserver import reply as R
from mailserver.address import Address
from mailserver.sansio.lines import MAX_CHUNK
from mailserver.sansio.smtp_events import (
    NEED_DATA,
    PAUSED,
    Closing,
    ConnectionClosed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    Reset,
    StartTLS,
)
from mailserver.sansio.smtp_server import (
    Limits,
    Mode,
    SMTPServerConnection,
    State,
    TRANSITIONS,
    UsageError,
)
from mailserver.reply import Reply

HOST = "mx.example.test"
GREETING = b"220 mx.example.test ESMTP mailserver\r\n"
CAPABILITIES = [
    "PIPELINING",
    "SIZE 26214400",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
]
EHLO_REPLY = Reply(250, None, "\n".join([HOST, *CAPABILITIES, "STARTTLS"])).to_bytes()
EHLO_REPLY_NO_TLS = Reply(250, None, "\n".join([HOST, *CAPABILITIES])).to_bytes()
MAIL = b"MAIL FROM:<alice@a.example>\r\n"
RCPT = b"RCPT TO:<bob@b.example>\r\n"

Answer = Callable[[SMTPServerConnection, Event], Union[Reply, list[Reply]]]


def ok_answer(conn: SMTPServerConnection, event: Event) -> Union[Reply, list[Reply]]:
    """Accept everything; LMTP DataEnd gets one OK per accepted recipient."""
    if isinstance(event, StartTLS):
        return R.READY_TLS
    if isinstance(event, MailFrom):
        return R.SENDER_OK
    if isinstance(event, RcptTo):
        return R.RCPT_OK
    if conn.mode is Mode.LMTP:
        return [R.OK] * len(conn.transaction.recipients)
    return R.OK


def new(mode: Mode = Mode.MX, **kwargs) -> SMTPServerConnection:
    """A connection whose greeting has been sent and drained."""
    kwargs.setdefault("tls_available", True)
    conn = SMTPServerConnection(hostname=HOST, mode=mode, **kwargs)
    conn.greeting()
    conn.data_to_send()
    return conn


def run(
    conn: SMTPServerConnection, data: bytes = b"", answer: Answer = ok_answer
) -> tuple[list[Event], bytes]:
    """Feed ``data``, take events until NEED_DATA answering every decision,
    and return the events and the reply bytes."""
    if data:
        conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events, conn.data_to_send()
        assert event is not PAUSED, "run() answers every decision"
        events.append(event)
        if event.NEEDS_REPLY:
            replies = answer(conn, event)
            for reply in replies if isinstance(replies, list) else [replies]:
                conn.send(reply)


def greeted(mode: Mode = Mode.MX, **kwargs) -> SMTPServerConnection:
    conn = new(mode, **kwargs)
    run(conn, b"LHLO client.example\r\n" if mode is Mode.LMTP else b"EHLO client.example\r\n")
    return conn


def with_rcpt(mode: Mode = Mode.MX, **kwargs) -> SMTPServerConnection:
    """A connection with a sender and one recipient accepted."""
    conn = greeted(mode, **kwargs)
    run(conn, MAIL + RCPT)
    assert conn.state is State.RCPT
    return conn


def replies(*items: Reply) -> bytes:
    return b"".join(r.to_bytes() for r in items)


def kinds(events: list[Event]) -> list[type]:
    return [type(e) for e in events]


def content(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataChunk))


# --- greeting and hello ------------------------------------------------------


def test_greeting() -> None:
    """The greeting names the host, ESMTP and the software, without enhanced code."""
    conn = SMTPServerConnection(hostname=HOST)
    conn.greeting()
    assert conn.data_to_send() == GREETING
    assert conn.next_event() is NEED_DATA


def test_lmtp_greeting() -> None:
    """LMTP greets with LMTP."""
    conn = SMTPServerConnection(hostname=HOST, mode=Mode.LMTP, software="x")
    conn.greeting()
    assert conn.data_to_send() == b"220 mx.example.test LMTP x\r\n"


def test_negative_greeting_closes() -> None:
    """A 421 greeting is sent, Closing is emitted and input is ignored."""
    conn = SMTPServerConnection(hostname=HOST)
    conn.greeting(R.TOO_MANY_CONNECTIONS)
    assert conn.data_to_send() == R.TOO_MANY_CONNECTIONS.to_bytes()
    assert conn.next_event() == Closing(R.TOO_MANY_CONNECTIONS)
    conn.receive_data(b"EHLO x\r\n")
    assert conn.next_event() is NEED_DATA
    assert conn.closed and conn.data_to_send() == b""


def test_ehlo_capabilities() -> None:
    """EHLO lists the extensions, without enhanced codes, STARTTLS last."""
    conn = new()
    events, out = run(conn, b"EHLO client.example\r\n")
    assert events == [Hello("EHLO", "client.example")]
    assert out == EHLO_REPLY
    assert conn.helo == "client.example" and conn.state is State.READY


@pytest.mark.parametrize(
    "kwargs", [{"tls_available": False}, {"tls_available": True, "tls_active": True}]
)
def test_ehlo_without_starttls(kwargs: dict) -> None:
    """STARTTLS is not advertised when unavailable or already active."""
    _, out = run(new(**kwargs), b"EHLO c\r\n")
    assert out == EHLO_REPLY_NO_TLS


def test_ehlo_unlimited_size() -> None:
    """With no size limit SIZE is advertised without a number."""
    _, out = run(new(limits=Limits(max_message_size=0)), b"EHLO c\r\n")
    assert b"250-SIZE\r\n" in out


def test_helo() -> None:
    """HELO gets a single 250 line starting with the host name."""
    events, out = run(new(), b"HELO client.example\r\n")
    assert events == [Hello("HELO", "client.example")]
    assert out == b"250 mx.example.test\r\n"


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"HELO\r\n", b"EHLO \r\n", b"EHLO a\x01b\r\n"])
def test_hello_needs_domain(line: bytes) -> None:
    """HELO/EHLO without a usable argument gets 501."""
    conn = new()
    events, out = run(conn, line)
    assert events == [] and out == R.BAD_ARGUMENTS.to_bytes()
    assert conn.state is State.INITIAL


def test_ehlo_resets_transaction() -> None:
    """EHLO during a transaction resets it: Reset then Hello."""
    conn = with_rcpt()
    events, _ = run(conn, b"EHLO again.example\r\n")
    assert events == [Reset(), Hello("EHLO", "again.example")]
    assert conn.transaction.mail is None and conn.state is State.READY
    _, out = run(conn, RCPT)
    assert out == R.NEED_MAIL.to_bytes()


def test_lmtp_lhlo() -> None:
    """LMTP takes LHLO and answers with the capability list."""
    conn = new(Mode.LMTP)
    events, out = run(conn, b"LHLO client.example\r\n")
    assert events == [Hello("LHLO", "client.example")]
    assert out == EHLO_REPLY


@pytest.mark.parametrize("line", [b"EHLO c\r\n", b"HELO c\r\n"])
def test_lmtp_refuses_helo_ehlo(line: bytes) -> None:
    """LMTP answers HELO/EHLO with USE_LHLO."""
    conn = new(Mode.LMTP)
    assert run(conn, line) == ([], R.USE_LHLO.to_bytes())
    assert conn.state is State.INITIAL


def test_smtp_does_not_know_lhlo() -> None:
    """SMTP treats LHLO as an unknown command."""
    assert run(new(), b"LHLO c\r\n") == ([], R.SYNTAX_ERROR.to_bytes())


@pytest.mark.parametrize(
    "mode, reply", [(Mode.MX, R.NEED_HELO), (Mode.LMTP, R.NEED_LHLO)]
)
@pytest.mark.parametrize("line", [MAIL, RCPT, b"DATA\r\n", b"STARTTLS\r\n"])
def test_hello_required(mode: Mode, reply: Reply, line: bytes) -> None:
    """MAIL, RCPT, DATA and STARTTLS before HELO get NEED_HELO (NEED_LHLO in LMTP)."""
    assert run(new(mode), line) == ([], reply.to_bytes())


# --- simple commands -----------------------------------------------------------

SIMPLE = [
    (b"NOOP\r\n", R.NOOP_OK),
    (b"noop\r\n", R.NOOP_OK),
    (b"NoOp whatever\r\n", R.NOOP_OK),
    (b"HELP\r\n", R.HELP),
    (b"VRFY alice\r\n", R.VRFY_CANNOT),
    (b"VRFY\r\n", R.BAD_ARGUMENTS),
    (b"EXPN staff\r\n", R.NOT_IMPLEMENTED),
    (b"FOO\r\n", R.SYNTAX_ERROR),
    (b"\r\n", R.SYNTAX_ERROR),
    (b" NOOP\r\n", R.SYNTAX_ERROR),
    (b"MAIL\tFROM:<a@b>\r\n", R.SYNTAX_ERROR),
    (b"N\xc3\xb6OP\r\n", R.SYNTAX_ERROR),
    (b"NOOP\x00\r\n", R.NUL_IN_COMMAND),
    (b"\x00\r\n", R.NUL_IN_COMMAND),
    (b"RSET x\r\n", R.BAD_ARGUMENTS),
    (RCPT, R.NEED_MAIL),
    (b"DATA\r\n", R.NEED_MAIL),
    (b"STARTTLS x\r\n", R.BAD_ARGUMENTS),
    (b"NOOP\n", R.NOOP_OK),
]


@pytest.mark.parametrize("line, reply", SIMPLE)
def test_simple_commands(line: bytes, reply: Reply) -> None:
    """Commands the core answers itself get their catalog reply and no event."""
    conn = greeted()
    assert run(conn, line) == ([], reply.to_bytes())
    assert conn.state is State.READY


def test_rset() -> None:
    """RSET answers RESET_OK, emits Reset and clears the transaction."""
    conn = with_rcpt()
    assert run(conn, b"RSET\r\n") == ([Reset()], R.RESET_OK.to_bytes())
    assert conn.state is State.READY and conn.transaction.recipients == []


def test_quit() -> None:
    """QUIT answers BYE, emits Quit, and later input is ignored."""
    conn = greeted()
    events, out = run(conn, b"QUIT\r\nNOOP\r\n")
    assert events == [Quit()] and out == R.BYE.to_bytes()
    assert conn.closed
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA and conn.data_to_send() == b""


def test_eof() -> None:
    """EOF gives ConnectionClosed after the buffered complete commands."""
    conn = greeted()
    conn.receive_data(b"NOOP\r\nNOO")
    conn.receive_data(b"")
    assert run(conn) == ([ConnectionClosed()], R.NOOP_OK.to_bytes())
    assert conn.closed
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA


def test_eof_after_quit() -> None:
    """QUIT followed by EOF gives Quit only."""
    conn = greeted()
    conn.receive_data(b"QUIT\r\n")
    conn.receive_data(b"")
    assert run(conn) == ([Quit()], R.BYE.to_bytes())


def test_eof_while_paused() -> None:
    """EOF while a decision is pending is reported after the answer."""
    conn = greeted()
    conn.receive_data(MAIL)
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), MailFrom)
    assert conn.next_event() is PAUSED
    conn.send(R.SENDER_OK)
    assert conn.next_event() == ConnectionClosed()


def test_send_without_decision() -> None:
    """send() with nothing pending is the caller's bug: UsageError."""
    conn = greeted()
    with pytest.raises(UsageError):
        conn.send(R.OK)


def test_send_needs_reply() -> None:
    """send() takes Reply values only."""
    conn = greeted()
    run(conn, b"")
    conn.receive_data(MAIL)
    conn.next_event()
    with pytest.raises(TypeError):
        conn.send("250 Ok")  # type: ignore[arg-type]


def test_verbs_dispatch_through_table() -> None:
    """Only verbs in the table run: names of private methods are unknown commands."""
    conn = greeted()
    for line in (b"_do_quit\r\n", b"__init__\r\n", b"_reply\r\n", b"DO_QUIT\r\n"):
        assert run(conn, line) == ([], R.SYNTAX_ERROR.to_bytes())
    assert not conn.closed


# --- MAIL and RCPT ---------------------------------------------------------------

ALICE = MailFrom("alice@a.example", address=Address("alice", "a.example"))
MAIL_OK = [
    (b"MAIL FROM:<alice@A.example>", ALICE),
    (b"mail from:<alice@a.example>", ALICE),
    (b"MAIL FROM: <alice@a.example>", ALICE),
    (b"MAIL FROM:<>", MailFrom("")),
    (
        b"MAIL FROM:<@r.example:alice@a.example>",
        MailFrom("alice@a.example", address=Address("alice", "a.example")),
    ),
    (
        b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8bitmime",
        MailFrom(
            "a@b.example",
            params={"SIZE": "1000", "BODY": "8bitmime"},
            size=1000,
            body="8BITMIME",
            address=Address("a", "b.example"),
        ),
    ),
    (
        "MAIL FROM:<jürgen@bücher.example> SMTPUTF8".encode(),
        MailFrom(
            "jürgen@bücher.example",
            params={"SMTPUTF8": None},
            smtputf8=True,
            address=Address("jürgen", "bücher.example"),
        ),
    ),
    (b"MAIL FROM:<a@b.example> SIZE=26214400", None),
]


@pytest.mark.parametrize("line, expected", MAIL_OK)
def test_mail_decision(line: bytes, expected: Optional[MailFrom]) -> None:
    """A well-formed MAIL becomes a MailFrom decision; the core waits for send()."""
    conn = greeted()
    conn.receive_data(line + b"\r\n")
    event = conn.next_event()
    assert isinstance(event, MailFrom)
    if expected is not None:
        assert event == expected
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b""
    assert conn.pending is event


MAIL_BAD = [
    (b"MAIL TO:<a@b.example>", R.BAD_ARGUMENTS),
    (b"MAIL <a@b.example>", R.BAD_ARGUMENTS),
    (b"MAIL", R.BAD_ARGUMENTS),
    (b"MAIL FROM:a@b.example", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<a@b.example", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<a@b.example>SIZE=1", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<a@b.example.>", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<postmaster>", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<a@b.example> FOO=1", R.PARAM_NOT_RECOGNIZED),
    (b"MAIL FROM:<a@b.example> RET=FULL", R.PARAM_NOT_RECOGNIZED),
    (b"MAIL FROM:<a@b.example> SIZE=x", R.BAD_ARGUMENTS),
    (b"MAIL FROM:<a@b.example> SIZE=", R.BAD_ARGUMENTS),
    (b"MAIL FROM:<a@b.example> SIZE=26214401", R.MESSAGE_TOO_BIG),
    (b"MAIL FROM:<a@b.example> BODY=BINARYMIME", R.BODY_NOT_SUPPORTED),
    (b"MAIL FROM:<a@b.example> SMTPUTF8=yes", R.BAD_ARGUMENTS),
    ("MAIL FROM:<jürgen@b.example>".encode(), R.EIGHTBIT_ADDRESS),
    (b"MAIL FROM:<j\xfcrgen@b.example>", R.EIGHTBIT_ADDRESS),
    (b"MAIL FROM:<j\xfcrgen@b.example> SMTPUTF8", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<a\r@b.example>", R.BAD_SENDER_SYNTAX),
    (b"MAIL FROM:<" + b"a" * 65 + b"@b.example>", R.SENDER_LOCAL_PART_TOO_LONG),
]


@pytest.mark.parametrize("line, reply", MAIL_BAD)
def test_mail_refused_by_core(line: bytes, reply: Reply) -> None:
    """Malformed MAIL commands are answered by the core without an event."""
    conn = greeted()
    assert run(conn, line + b"\r\n") == ([], reply.to_bytes())
    assert conn.state is State.READY and conn.errors == 1


def test_mail_accepted_starts_transaction() -> None:
    """A positive answer to MailFrom starts the transaction."""
    conn = greeted()
    events, out = run(conn, MAIL)
    assert out == R.SENDER_OK.to_bytes()
    assert conn.state is State.MAIL
    assert conn.transaction.mail == events[0]
    assert conn.transaction.sender == Address("alice", "a.example")


def test_mail_refused_by_app() -> None:
    """A negative answer to MailFrom leaves no transaction and counts as an error."""
    conn = greeted()
    events, out = run(conn, MAIL + RCPT, answer=lambda c, e: R.RELAY_DENIED)
    assert kinds(events) == [MailFrom]
    assert out == replies(R.RELAY_DENIED, R.NEED_MAIL)
    assert conn.transaction.mail is None and conn.errors == 2


def test_extra_mail_params() -> None:
    """Parameter names added at construction pass through to the event."""
    conn = greeted(mail_params=frozenset({"SIZE", "RET", "ENVID"}), rcpt_params={"NOTIFY"})
    events, out = run(conn, b"MAIL FROM:<a@b.example> RET=HDRS ENVID=x\r\n")
    assert events[0].params == {"RET": "HDRS", "ENVID": "x"}
    events, out = run(conn, b"RCPT TO:<c@d.example> NOTIFY=NEVER\r\n")
    assert events[0].params == {"NOTIFY": "NEVER"}
    assert out == R.RCPT_OK.to_bytes()


def test_nested_mail() -> None:
    """MAIL inside a transaction gets NESTED_MAIL."""
    conn = greeted()
    run(conn, MAIL)
    assert run(conn, MAIL) == ([], R.NESTED_MAIL.to_bytes())
    conn = with_rcpt()
    assert run(conn, MAIL) == ([], R.NESTED_MAIL.to_bytes())


RCPT_OK = [
    (b"RCPT TO:<bob@B.example>", "bob@b.example", Address("bob", "b.example")),
    (b"rcpt to: <bob@b.example>", "bob@b.example", Address("bob", "b.example")),
    (b"RCPT TO:<Postmaster>", "postmaster", Address("postmaster", "")),
    (b"RCPT TO:<@x.example:bob@b.example>", "bob@b.example", Address("bob", "b.example")),
]


@pytest.mark.parametrize("line, recipient, address", RCPT_OK)
def test_rcpt_decision(line: bytes, recipient: str, address: Address) -> None:
    """A well-formed RCPT becomes an RcptTo decision; a positive answer adds it."""
    conn = greeted()
    run(conn, MAIL)
    events, out = run(conn, line + b"\r\n")
    assert events == [RcptTo(recipient, address=address)]
    assert out == R.RCPT_OK.to_bytes()
    assert conn.transaction.recipients == events
    assert conn.transaction.addresses == [address]


RCPT_BAD = [
    (b"RCPT TO:<>", R.BAD_RCPT_SYNTAX),
    (b"RCPT TO:bob@b.example", R.BAD_RCPT_SYNTAX),
    (b"RCPT FROM:<bob@b.example>", R.BAD_ARGUMENTS),
    (b"RCPT TO:<bob@b.example> NOTIFY=NEVER", R.PARAM_NOT_RECOGNIZED),
    (b"RCPT TO:<bob@b.example> =", R.BAD_ARGUMENTS),
    ("RCPT TO:<bøb@b.example>".encode(), R.EIGHTBIT_ADDRESS),
    (b"RCPT TO:<bob@b.example\x7f>", R.BAD_RCPT_SYNTAX),
]


@pytest.mark.parametrize("line, reply", RCPT_BAD)
def test_rcpt_refused_by_core(line: bytes, reply: Reply) -> None:
    """Malformed RCPT commands are answered by the core without an event."""
    conn = greeted()
    run(conn, MAIL)
    assert run(conn, line + b"\r\n") == ([], reply.to_bytes())
    assert conn.state is State.MAIL


def test_rcpt_utf8_needs_smtputf8_transaction() -> None:
    """A UTF-8 recipient is accepted in an SMTPUTF8 transaction."""
    conn = greeted()
    run(conn, b"MAIL FROM:<a@b.example> SMTPUTF8\r\n")
    events, out = run(conn, "RCPT TO:<bøb@bücher.example>\r\n".encode())
    assert events == [RcptTo("bøb@bücher.example", address=Address("bøb", "bücher.example"))]


def test_rcpt_refused_by_app() -> None:
    """A negative answer to RcptTo does not add the recipient."""
    conn = greeted()
    run(conn, MAIL)
    events, out = run(conn, RCPT, answer=lambda c, e: R.RCPT_UNKNOWN)
    assert out == R.RCPT_UNKNOWN.to_bytes()
    assert conn.transaction.recipients == [] and conn.state is State.MAIL


def test_recipient_limit() -> None:
    """Past max_recipients RCPT gets TOO_MANY_RECIPIENTS, not counted as an error."""
    conn = greeted(limits=Limits(max_recipients=2, max_errors=1))
    run(conn, MAIL)
    lines = b"".join(b"RCPT TO:<r%d@b.example>\r\n" % i for i in range(5))
    events, out = run(conn, lines)
    assert kinds(events) == [RcptTo, RcptTo]
    assert out == replies(R.RCPT_OK, R.RCPT_OK, *[R.TOO_MANY_RECIPIENTS] * 3)
    assert conn.errors == 0 and not conn.closed
    assert [str(a) for a in conn.transaction.addresses] == ["r0@b.example", "r1@b.example"]


def test_recipient_limit_counts_accepted_only() -> None:
    """Refused recipients do not use up the recipient limit."""
    conn = greeted(limits=Limits(max_recipients=1))
    run(conn, MAIL)
    run(conn, RCPT, answer=lambda c, e: R.RCPT_UNKNOWN)
    events, out = run(conn, RCPT)
    assert out == R.RCPT_OK.to_bytes()


# --- sequence ----------------------------------------------------------------------


def test_data_without_rcpt_attempt() -> None:
    """DATA after MAIL with no RCPT at all gets NEED_RCPT (503)."""
    conn = greeted()
    run(conn, MAIL)
    assert run(conn, b"DATA\r\n") == ([], R.NEED_RCPT.to_bytes())


def test_data_when_all_rcpts_refused() -> None:
    """DATA after only refused RCPTs gets NO_VALID_RCPTS (554)."""
    conn = greeted()
    run(conn, MAIL)
    run(conn, RCPT, answer=lambda c, e: R.RCPT_UNKNOWN)
    assert run(conn, b"DATA\r\n") == ([], R.NO_VALID_RCPTS.to_bytes())


def test_data_arguments_refused() -> None:
    """DATA takes no argument."""
    conn = with_rcpt()
    assert run(conn, b"DATA now\r\n") == ([], R.BAD_ARGUMENTS.to_bytes())
    assert conn.state is State.RCPT


def test_transition_table_has_every_state() -> None:
    """Every state has an entry in the transition table, and targets are states."""
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert all(isinstance(s, State) for s in targets.values())


def test_auth_required_in_submission() -> None:
    """Submission refuses MAIL until the adapter marks the session authenticated."""
    conn = greeted(Mode.SUBMISSION)
    assert run(conn, MAIL) == ([], R.AUTH_REQUIRED.to_bytes())
    conn.authenticated = True
    events, out = run(conn, MAIL)
    assert kinds(events) == [MailFrom] and out == R.SENDER_OK.to_bytes()


def test_auth_required_flag() -> None:
    """auth_required can be set explicitly in any mode."""
    assert greeted(auth_required=True).auth_required
    assert not greeted(Mode.SUBMISSION, auth_required=False).auth_required


# --- a whole transaction, pipelining -------------------------------------------------


def test_full_transaction() -> None:
    """EHLO, MAIL, RCPT, DATA, content, end, QUIT: events and exact bytes."""
    conn = SMTPServerConnection(hostname=HOST, tls_available=True)
    conn.greeting()
    assert conn.data_to_send() == GREETING

    conn.receive_data(b"EHLO client.example\r\n")
    assert conn.next_event() == Hello("EHLO", "client.example")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == EHLO_REPLY

    conn.receive_data(b"MAIL FROM:<alice@a.example> SIZE=20\r\n")
    mail = conn.next_event()
    assert mail == MailFrom(
        "alice@a.example", params={"SIZE": "20"}, size=20, address=Address("alice", "a.example")
    )
    assert conn.next_event() is PAUSED
    conn.send(R.SENDER_OK)
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == R.SENDER_OK.to_bytes()

    conn.receive_data(RCPT)
    rcpt = conn.next_event()
    assert rcpt == RcptTo("bob@b.example", address=Address("bob", "b.example"))
    conn.send(R.RCPT_OK)
    assert conn.next_event() is NEED_DATA

    conn.receive_data(b"DATA\r\n")
    assert conn.next_event() == DataStart("DATA")
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == R.RCPT_OK.to_bytes() + R.START_DATA.to_bytes()

    conn.receive_data(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
    assert conn.next_event() == DataChunk(b"Subject: hi\r\n\r\nHello\r\n")
    assert conn.next_event() == DataEnd(22)
    assert conn.next_event() is PAUSED
    assert conn.transaction.mail == mail and conn.transaction.recipients == [rcpt]
    assert conn.transaction.kind == "DATA"
    conn.send(R.OK.with_text("Ok: queued as ABC"))
    assert conn.next_event() == Reset()
    assert conn.state is State.READY and conn.transaction.mail is None

    conn.receive_data(b"QUIT\r\n")
    assert conn.next_event() == Quit()
    assert conn.data_to_send() == b"250 2.0.0 Ok: queued as ABC\r\n" + R.BYE.to_bytes()
    assert conn.closed


PIPELINE = (
    b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nRCPT TO:<e@f.example>\r\n"
    b"DATA\r\nhi\r\n.\r\nNOOP\r\nQUIT\r\n"
)


def test_pipelining_replies_in_order() -> None:
    """With everything in one read, each decision pauses the core and replies keep order."""
    conn = new()
    conn.receive_data(PIPELINE)
    assert conn.next_event() == Hello("EHLO", "c")
    assert isinstance(conn.next_event(), MailFrom)
    for _ in range(3):
        assert conn.next_event() is PAUSED
    assert conn.data_to_send() == EHLO_REPLY  # nothing after MAIL has been looked at
    assert conn.buffered == len(PIPELINE) - len(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
    conn.send(R.SENDER_OK)
    assert conn.next_event().recipient == "c@d.example"
    assert conn.next_event() is PAUSED
    conn.send(R.RCPT_UNKNOWN)
    assert conn.next_event().recipient == "e@f.example"
    conn.send(R.RCPT_OK)
    assert conn.next_event() == DataStart("DATA")
    assert conn.next_event() == DataChunk(b"hi\r\n")
    assert conn.next_event() == DataEnd(4)
    assert conn.next_event() is PAUSED
    assert conn.transaction.addresses == [Address("e", "f.example")]
    conn.send(R.OK)
    assert conn.next_event() == Reset()
    assert conn.next_event() == Quit()
    assert conn.data_to_send() == replies(
        R.SENDER_OK, R.RCPT_UNKNOWN, R.RCPT_OK, R.START_DATA, R.OK, R.NOOP_OK, R.BYE
    )


@pytest.mark.parametrize("size", [1, 2, 7])
def test_pipelining_any_read_size(size: int) -> None:
    """The pipeline fed in small reads gives the same events and bytes as one read."""
    whole = run(new(), PIPELINE)
    conn = new()
    events: list[Event] = []
    out = b""
    for i in range(0, len(PIPELINE), size):
        more, data = run(conn, PIPELINE[i : i + size])
        events += more
        out += data
    assert merge_chunks(events) == merge_chunks(whole[0]) and out == whole[1]


# --- DATA ---------------------------------------------------------------------------


def send_data(body: bytes, **kwargs) -> tuple[SMTPServerConnection, list[Event], bytes]:
    """Open a transaction, send DATA + body, answer, and return what came out."""
    conn = with_rcpt(**kwargs)
    events, out = run(conn, b"DATA\r\n" + body)
    assert out.startswith(R.START_DATA.to_bytes())
    return conn, events, out[len(R.START_DATA.to_bytes()) :]


@pytest.mark.parametrize(
    "wire, stored",
    [
        (b".\r\n", b""),
        (b"..\r\n.\r\n", b".\r\n"),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
        (b"..a\r\n...\r\n.\r\n", b".a\r\n..\r\n"),
        (b"a.\r\n.a\r\n.\r\n", b"a.\r\na\r\n"),
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, stored: bytes) -> None:
    """Leading dots are unstuffed; CR LF . CR LF ends the content."""
    conn, events, out = send_data(wire)
    assert content(events) == stored
    assert events[-2:] == [DataEnd(len(stored)), Reset()]
    assert out == R.OK.to_bytes()


SMUGGLING = [
    b"\n.\r\n",
    b"\r\n.\n",
    b"\n.\n",
    b"\r.\r",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n.\r",
    b"\r\n.\r\r\n",
    b"\r\n.\n\r\n",
    b"\n\r\n.\r",
]


@pytest.mark.parametrize("end", SMUGGLING)
@pytest.mark.parametrize("read_size", [0, 1, 3])
def test_smuggling_is_one_refused_message(end: bytes, read_size: int) -> None:
    """A fake end of data made with bare CR/LF is content: the smuggled commands never
    run, the server sees one message and refuses it with BARE_NEWLINE."""
    conn = with_rcpt()
    stream = (
        b"DATA\r\nSubject: real\r\n\r\nbody"
        + end
        + b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<victim@y.example>\r\nDATA\r\n"
        + b"Subject: smuggled\r\n\r\nevil\r\n.\r\nNOOP\r\n"
    )
    pieces = [stream] if not read_size else [
        stream[i : i + read_size] for i in range(0, len(stream), read_size)
    ]
    events: list[Event] = []
    out = b""
    for piece in pieces:
        more, data = run(conn, piece)
        events += more
        out += data
    assert [e for e in events if not isinstance(e, DataChunk)] == [
        DataStart("DATA"),
        DataAborted(R.BARE_NEWLINE),
        Reset(),
    ]
    assert not any(isinstance(e, (MailFrom, RcptTo, DataEnd)) for e in events)
    assert out == replies(R.START_DATA, R.BARE_NEWLINE, R.NOOP_OK)
    assert conn.state is State.READY


@pytest.mark.parametrize(
    "body, reply",
    [
        (b"bare\nlf\r\n.\r\n", R.BARE_NEWLINE),
        (b"bare\rcr\r\n.\r\n", R.BARE_NEWLINE),
        (b"nul\x00here\r\n.\r\n", R.NUL_IN_DATA),
        (b"x" * 999 + b"\r\n.\r\n", R.DATA_LINE_TOO_LONG),
    ],
)
def test_content_refused_after_real_end(body: bytes, reply: Reply) -> None:
    """Bad content is read to CR LF . CR LF, then refused; the session goes on."""
    conn, events, out = send_data(body + MAIL)
    assert kinds(events) == [DataStart, DataAborted, Reset, MailFrom]
    assert events[1] == DataAborted(reply)
    assert out == replies(reply, R.SENDER_OK)


def test_longest_allowed_line() -> None:
    """A line of exactly max_text_line octets (CR LF included) is accepted."""
    conn, events, out = send_data(b"x" * 998 + b"\r\n.\r\n")
    assert events[-2] == DataEnd(1000) and out == R.OK.to_bytes()


def test_data_size_limit() -> None:
    """Content over max_message_size is discarded as it arrives and refused at the end."""
    limits = Limits(max_message_size=100)
    conn, events, out = send_data(b"x" * 98 + b"\r\n.\r\n", limits=limits)
    assert events[-2] == DataEnd(100)
    body = b"x" * 60 + b"\r\n" + b"y" * 60 + b"\r\n.\r\nNOOP\r\n"
    conn, events, out = send_data(body, limits=limits)
    assert b"y" not in content(events)
    assert kinds(events)[-2:] == [DataAborted, Reset]
    assert events[-2] == DataAborted(R.MESSAGE_TOO_BIG)
    assert out == replies(R.MESSAGE_TOO_BIG, R.NOOP_OK)


def test_large_message_streams_in_chunks() -> None:
    """A large message comes out in DataChunks of at most MAX_CHUNK octets."""
    body = b"".join(b"line %06d ...................................\r\n" % i for i in range(5000))
    conn = with_rcpt()
    conn.receive_data(b"DATA\r\n" + body + b".\r\n")
    events = []
    while (event := conn.next_event()) is not PAUSED:
        events.append(event)
    chunks = [e.data for e in events if isinstance(e, DataChunk)]
    assert len(chunks) > 3 and max(map(len, chunks)) <= MAX_CHUNK
    assert b"".join(chunks) == body
    assert events[-1] == DataEnd(len(body))


def test_eof_during_data() -> None:
    """EOF in the middle of the content gives ConnectionClosed, no DataEnd."""
    conn = with_rcpt()
    conn.receive_data(b"DATA\r\npartial\r\n")
    conn.receive_data(b"")
    events, _ = run(conn)
    assert kinds(events) == [DataStart, DataChunk, ConnectionClosed]


def test_data_reply_not_counted_as_error() -> None:
    """Negative replies to DataEnd do not count towards the error limit."""
    conn = greeted(limits=Limits(max_errors=0))
    run(conn, MAIL + RCPT)
    events, out = run(conn, b"DATA\r\nx\r\n.\r\n", answer=lambda c, e: R.STORAGE_FULL)
    assert out.endswith(R.STORAGE_FULL.to_bytes()) and not conn.closed


# --- BDAT ----------------------------------------------------------------------------


def test_bdat_chunks() -> None:
    """BDAT chunks are taken as they are, acknowledged, and LAST is a decision."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 7\r\nhello\r\n")
    assert events == [DataStart("BDAT"), DataChunk(b"hello\r\n")]
    assert out == b"250 2.0.0 7 octets received\r\n"
    assert conn.state is State.BDAT
    events, out = run(conn, b"BDAT 6 LAST\r\n.\r\n.\r\n")
    assert events == [DataChunk(b".\r\n.\r\n"), DataEnd(13), Reset()]
    assert out == R.OK.to_bytes()
    assert conn.state is State.READY


def test_bdat_pipelined_with_commands() -> None:
    """Octets that look like commands inside a chunk are content."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 12 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\n")
    assert events == [DataStart("BDAT"), DataChunk(b"RSET\r\nQUIT\r\n"), DataEnd(12), Reset()]
    assert out == replies(R.OK, R.NOOP_OK)


def test_bdat_zero_last() -> None:
    """BDAT 0 LAST is legal: an empty message."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 0 LAST\r\n")
    assert events == [DataStart("BDAT"), DataEnd(0), Reset()]


def test_bdat_zero_then_last() -> None:
    """BDAT 0 is acknowledged and the transaction goes on."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 0\r\nbdat 2 last\r\nab")
    assert events == [DataStart("BDAT"), DataChunk(b"ab"), DataEnd(2), Reset()]
    assert out == b"250 2.0.0 0 octets received\r\n" + R.OK.to_bytes()


@pytest.mark.parametrize(
    "prefix, reply",
    [(b"", R.NEED_HELO), (b"EHLO c\r\n", R.NEED_MAIL), (b"EHLO c\r\n" + MAIL, R.NEED_RCPT)],
)
def test_bdat_refused_consumes_octets(prefix: bytes, reply: Reply) -> None:
    """A refused BDAT still consumes its octets before the error reply."""
    conn = new()
    run(conn, prefix)
    chunk = b"MAIL FROM:<evil@x.example>\r\n"
    events, out = run(conn, b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert events == []
    assert out == replies(reply, R.NOOP_OK)


def test_bdat_crlf_split_across_chunks() -> None:
    """A CR ending one chunk and an LF starting the next make a proper CR LF."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 6\r\nline1\rBDAT 6 LAST\r\n\nabc\r\n")
    assert kinds(events) == [DataStart, DataChunk, DataChunk, DataEnd, Reset]
    assert content(events) == b"line1\r\nabc\r\n"
    assert out == b"250 2.0.0 6 octets received\r\n" + R.OK.to_bytes()


def test_bdat_bare_cr_at_last_end() -> None:
    """A CR at the very end of the LAST chunk is a bare CR."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 4 LAST\r\nabc\r")
    assert events[-2:] == [DataAborted(R.BARE_NEWLINE), Reset()]
    assert out == R.BARE_NEWLINE.to_bytes()


def test_bdat_bad_chunk_fails_transaction() -> None:
    """A chunk with bad content fails the transaction; later pipelined chunks are
    consumed and refused."""
    conn = with_rcpt()
    events, out = run(conn, b"BDAT 4\r\na\nbcBDAT 3 LAST\r\nxyzNOOP\r\n")
    assert kinds(events) == [DataStart, DataAborted, Reset]
    assert events[1] == DataAborted(R.BARE_NEWLINE)
    assert out == replies(R.BARE_NEWLINE, R.NEED_MAIL, R.NOOP_OK)


@pytest.mark.parametrize("body", [b"a\x00bc", b"abcdefghijkl"])
def test_bdat_content_checks(body: bytes) -> None:
    """BDAT content gets the NUL and size checks of DATA."""
    conn = with_rcpt(limits=Limits(max_message_size=10))
    events, out = run(conn, b"BDAT %d LAST\r\n" % len(body) + body)
    reply = R.NUL_IN_DATA if b"\x00" in body else R.MESSAGE_TOO_BIG
    assert events[-2:] == [DataAborted(reply), Reset()]


def test_bdat_size_checked_across_chunks() -> None:
    """The size limit counts all chunks of the message."""
    conn = with_rcpt(limits=Limits(max_message_size=10))
    events, out = run(conn, b"BDAT 6\r\nabcdefBDAT 6 LAST\r\nghijkl")
    assert kinds(events) == [DataStart, DataChunk, DataAborted, Reset]
    assert out == b"250 2.0.0 6 octets received\r\n" + R.MESSAGE_TOO_BIG.to_bytes()


@pytest.mark.parametrize("line", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT -1\r\n", b"BDAT LAST\r\n"])
def test_bdat_unreadable_size_closes(line: bytes) -> None:
    """A BDAT whose size cannot be read ends the session: BDAT_SYNTAX then 421."""
    conn = with_rcpt()
    events, out = run(conn, line + b"NOOP\r\n")
    assert events == [Closing(R.PROTOCOL_DESYNC)]
    assert out == replies(R.BDAT_SYNTAX, R.PROTOCOL_DESYNC)
    assert conn.closed


def test_bdat_bad_keyword_consumes_and_fails() -> None:
    """BDAT n FOO consumes its n octets, then BDAT_SYNTAX ends the transaction."""
    conn = with_rcpt()
    run(conn, b"BDAT 2\r\nab")
    events, out = run(conn, b"BDAT 3 FOO\r\nxyzNOOP\r\n")
    assert events == [DataAborted(R.BDAT_SYNTAX), Reset()]
    assert out == replies(R.BDAT_SYNTAX, R.NOOP_OK)


def test_data_after_bdat_is_mixed() -> None:
    """DATA inside a BDAT transaction gets BDAT_MIXED."""
    conn = with_rcpt()
    run(conn, b"BDAT 2\r\nab")
    assert run(conn, b"DATA\r\n") == ([], R.BDAT_MIXED.to_bytes())
    assert conn.state is State.BDAT


def test_rset_during_bdat() -> None:
    """RSET between chunks discards the transaction."""
    conn = with_rcpt()
    run(conn, b"BDAT 2\r\nab")
    assert run(conn, b"RSET\r\n") == ([Reset()], R.RESET_OK.to_bytes())
    assert conn.state is State.READY


# --- STARTTLS ------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext() -> None:
    """Commands pipelined after STARTTLS are discarded, never run; after the
    handshake the session starts afresh and needs EHLO."""
    conn = greeted()
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert conn.next_event() == StartTLS()
    assert conn.buffered == 0
    conn.receive_data(b"RCPT TO:<evil@x.example>\r\n")  # plaintext before the handshake
    assert conn.next_event() is PAUSED
    conn.send(R.READY_TLS)
    assert conn.data_to_send() == R.READY_TLS.to_bytes()
    conn.receive_data(b"DATA\r\n")
    assert conn.next_event() is NEED_DATA
    conn.tls_started()
    assert conn.tls_active and conn.state is State.INITIAL and conn.helo is None
    events, out = run(conn, MAIL)
    assert events == [] and out == R.NEED_HELO.to_bytes()
    events, out = run(conn, b"EHLO c\r\n")
    assert out == EHLO_REPLY_NO_TLS
    assert run(conn, b"STARTTLS\r\n") == ([], R.ALREADY_TLS.to_bytes())


def test_starttls_forgets_everything() -> None:
    """tls_started() forgets HELO, authentication and the envelope."""
    conn = greeted(Mode.SUBMISSION)
    conn.authenticated = True
    run(conn, b"STARTTLS\r\n")
    conn.tls_started()
    assert not conn.authenticated and conn.transaction.mail is None


def test_starttls_refused_by_app() -> None:
    """A negative answer continues in plaintext (pipelined bytes stay discarded)."""
    conn = greeted()
    events, out = run(conn, b"STARTTLS\r\nNOOP\r\n", answer=lambda c, e: R.TLS_UNAVAILABLE)
    assert events == [StartTLS()] and out == R.TLS_UNAVAILABLE.to_bytes()
    assert run(conn, MAIL)[1] == R.SENDER_OK.to_bytes()
    assert not conn.tls_active


@pytest.mark.parametrize(
    "kwargs, prefix, reply",
    [
        ({"tls_available": False}, b"EHLO c\r\n", R.TLS_NOT_OFFERED),
        ({"tls_active": True}, b"EHLO c\r\n", R.ALREADY_TLS),
        ({}, b"", R.NEED_HELO),
        ({}, b"EHLO c\r\n" + MAIL, R.BAD_SEQUENCE),
        ({}, b"EHLO c\r\n" + MAIL + RCPT, R.BAD_SEQUENCE),
    ],
)
def test_starttls_refused_by_core(kwargs: dict, prefix: bytes, reply: Reply) -> None:
    """STARTTLS gets the right error when not offered, active or out of sequence."""
    conn = new(**kwargs)
    run(conn, prefix)
    assert run(conn, b"STARTTLS\r\nNOOP\r\n") == ([], replies(reply, R.NOOP_OK))


def test_tls_started_without_starttls() -> None:
    """tls_started() without an accepted STARTTLS is a UsageError."""
    conn = greeted()
    with pytest.raises(UsageError):
        conn.tls_started()
    conn.receive_data(b"STARTTLS\r\n")
    conn.next_event()
    with pytest.raises(UsageError):
        conn.tls_started()  # not answered yet


# --- limits --------------------------------------------------------------------------


def test_command_line_limit() -> None:
    """A 512-octet command line is fine; 513 gets LINE_TOO_LONG and the session goes on."""
    conn = greeted()
    ok = b"NOOP " + b"x" * 505 + b"\r\n"
    long = b"NOOP " + b"x" * 506 + b"\r\n"
    assert len(ok) == 512
    expected = replies(R.NOOP_OK, R.LINE_TOO_LONG, R.NOOP_OK)
    assert run(conn, ok + long + b"NOOP\r\n") == ([], expected)


def test_overlong_line_is_not_buffered() -> None:
    """An endless line never grows the buffer past the command limit."""
    conn = greeted()
    for _ in range(200):
        assert run(conn, b"x" * 4096) == ([], b"")
        assert conn.buffered <= 512
    assert run(conn, b"\r\nNOOP\r\n") == ([], replies(R.LINE_TOO_LONG, R.NOOP_OK))


def padded(head: bytes, tail: bytes, octets: int) -> bytes:
    """``head``, then x's, then ``tail`` and CR LF: a command line of ``octets``."""
    return head + b"x" * (octets - len(head) - len(tail) - 2) + tail + b"\r\n"


def dsn_rcpt(octets: int) -> bytes:
    """A RCPT of ``octets`` with the longest path our parser takes (64-octet
    local part, 255-octet domain), NOTIFY, and an ORCPT that makes up the rest."""
    domain = ".".join(c * 63 for c in "abcd").encode()
    head = b"RCPT TO:<" + b"r" * 64 + b"@" + domain + b">"
    return padded(head + b" NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;", b"@b.example", octets)


def test_dsn_rcpt_line_limit() -> None:
    """With DSN offered, RCPT may grow by 500 octets (RFC 3461).  The longest
    RCPT whose parameters are all valid (875 octets) reaches the application;
    longer ones up to 1012 octets are read and refused for their ORCPT (over
    500 characters), not for their length; past 1012 they are LINE_TOO_LONG."""
    conn = greeted(dsn=True)
    run(conn, MAIL)
    for octets in (559, 875):
        events, out = run(conn, dsn_rcpt(octets))
        assert kinds(events) == [RcptTo] and out == R.RCPT_OK.to_bytes()
        assert len(events[0].params["ORCPT"]) <= len("rfc822;") + 500
    for octets in (876, 1000, 1012):
        assert run(conn, dsn_rcpt(octets)) == ([], R.BAD_ARGUMENTS.to_bytes())
    events, out = run(conn, dsn_rcpt(1013) + b"NOOP\r\n")
    assert events == [] and out == replies(R.LINE_TOO_LONG, R.NOOP_OK)
    assert conn.state is State.RCPT and len(conn.transaction.recipients) == 2


@pytest.mark.parametrize("dsn, verb, limit", [
    (False, b"MAIL", 564),  # SIZE 26, BODY 16, SMTPUTF8 10
    (False, b"RCPT", 512),
    (False, b"NOOP", 512),
    (True, b"MAIL", 664),  # and RET, ENVID 100
    (True, b"RCPT", 1012),  # NOTIFY, ORCPT 500
    (True, b"NOOP", 512),
    (True, b"HELO", 512),
])
def test_line_limit_follows_extensions(dsn: bool, verb: bytes, limit: int) -> None:
    """MAIL and RCPT get the room the advertised extensions add; other verbs
    keep RFC 5321's 512.  A line just over its limit is 500 5.5.2 and the
    session goes on; the verb's case does not matter."""
    conn = greeted(dsn=dsn)
    too_long = padded(verb.lower() + b" ", b"", limit + 1)
    assert run(conn, too_long + b"NOOP\r\n") == ([], replies(R.LINE_TOO_LONG, R.NOOP_OK))
    _, out = run(conn, padded(verb + b" ", b"", limit))
    assert not out.startswith(b"500 5.5.2")


def test_line_limit_counts_bare_lf() -> None:
    """A line ending in a bare LF is measured with its one-octet terminator."""
    conn = greeted(dsn=True)
    run(conn, MAIL)
    fits = dsn_rcpt(1013)[:-2] + b"\n"  # 1012 octets
    assert run(conn, fits) == ([], R.BAD_ARGUMENTS.to_bytes())  # read, not LINE_TOO_LONG
    too_long = dsn_rcpt(1014)[:-2] + b"\n"
    assert run(conn, too_long) == ([], R.LINE_TOO_LONG.to_bytes())


def test_dsn_overlong_line_is_not_buffered() -> None:
    """With DSN an endless line still never holds more than RCPT's limit."""
    conn = greeted(dsn=True)
    for _ in range(200):
        assert run(conn, b"RCPT TO:<" + b"x" * 4096) == ([], b"")
        assert conn.buffered <= 1012
    assert run(conn, b"\r\nNOOP\r\n") == ([], replies(R.LINE_TOO_LONG, R.NOOP_OK))


def test_overlong_mail_line_not_executed() -> None:
    """The tail of an overlong line is not taken as a command."""
    conn = greeted()
    events, out = run(conn, b"NOOP " + b"x" * 600 + b" MAIL FROM:<a@b.example>\r\n")
    assert events == [] and out == R.LINE_TOO_LONG.to_bytes()


def test_error_limit() -> None:
    """Past max_errors negative replies the core sends 421 and emits Closing."""
    conn = greeted(limits=Limits(max_errors=3))
    events, out = run(conn, b"FOO\r\nBAR\r\nVRFY\r\nEXPN x\r\nNOOP\r\n")
    assert events == [Closing(R.TOO_MANY_ERRORS)]
    assert out == replies(
        R.SYNTAX_ERROR, R.SYNTAX_ERROR, R.BAD_ARGUMENTS, R.NOT_IMPLEMENTED, R.TOO_MANY_ERRORS
    )
    assert conn.closed
    conn.receive_data(b"NOOP\r\n")
    assert conn.next_event() is NEED_DATA and conn.data_to_send() == b""


def test_error_limit_counts_app_refusals() -> None:
    """Refusals sent by the application count towards the error limit."""
    conn = greeted(limits=Limits(max_errors=2))
    run(conn, MAIL)
    lines = b"".join(b"RCPT TO:<u%d@b.example>\r\n" % i for i in range(5))
    events, out = run(conn, lines, answer=lambda c, e: R.RCPT_UNKNOWN)
    assert kinds(events) == [RcptTo, RcptTo, RcptTo, Closing]
    assert out == replies(R.RCPT_UNKNOWN, R.RCPT_UNKNOWN, R.RCPT_UNKNOWN, R.TOO_MANY_ERRORS)


def test_error_limit_counts_content_refusal() -> None:
    """A refused message counts as an error; Closing comes after Reset."""
    conn = greeted(limits=Limits(max_errors=0))
    run(conn, MAIL + RCPT)
    events, out = run(conn, b"DATA\r\na\nb\r\n.\r\n")
    assert kinds(events) == [DataStart, DataAborted, Reset, Closing]


def test_application_421_closes() -> None:
    """A 421 answer from the application ends the session with Closing."""
    conn = greeted()
    events, out = run(conn, MAIL + b"NOOP\r\n", answer=lambda c, e: R.SHUTTING_DOWN)
    assert kinds(events) == [MailFrom, Closing]
    assert out == R.SHUTTING_DOWN.to_bytes()
    assert conn.closed and conn.pending is None


def test_application_421_during_lmtp_data_end() -> None:
    """A 421 for one LMTP recipient closes without waiting for the other replies."""
    conn = greeted(Mode.LMTP)
    run(conn, MAIL + b"RCPT TO:<a@l.example>\r\nRCPT TO:<b@l.example>\r\n")
    conn.receive_data(b"DATA\r\nx\r\n.\r\n")
    while not isinstance(conn.next_event(), DataEnd):
        pass
    conn.send(R.SHUTTING_DOWN)
    assert conn.next_event() == Closing(R.SHUTTING_DOWN)
    assert conn.next_event() is NEED_DATA


# --- LMTP ------------------------------------------------------------------------------


def test_lmtp_one_reply_per_recipient() -> None:
    """LMTP DataEnd waits for one reply per accepted recipient, in RCPT order."""
    conn = greeted(Mode.LMTP)
    run(conn, MAIL)
    run(conn, b"RCPT TO:<a@l.example>\r\n")
    run(conn, b"RCPT TO:<b@l.example>\r\n", answer=lambda c, e: R.RCPT_UNKNOWN)
    run(conn, b"RCPT TO:<c@l.example>\r\n")
    conn.data_to_send()
    conn.receive_data(b"DATA\r\nhi\r\n.\r\nNOOP\r\n")
    assert kinds([conn.next_event() for _ in range(3)]) == [DataStart, DataChunk, DataEnd]
    assert [str(a) for a in conn.transaction.addresses] == ["a@l.example", "c@l.example"]
    conn.send(R.OK)
    assert conn.next_event() is PAUSED
    conn.send(R.STORAGE_FULL)
    assert conn.next_event() == Reset()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == replies(R.START_DATA, R.OK, R.STORAGE_FULL, R.NOOP_OK)
    with pytest.raises(UsageError):
        conn.send(R.OK)


def test_lmtp_bdat_last_needs_replies() -> None:
    """LMTP BDAT LAST also waits for one reply per recipient."""
    conn = greeted(Mode.LMTP)
    run(conn, MAIL + b"RCPT TO:<a@l.example>\r\nRCPT TO:<b@l.example>\r\n")
    conn.data_to_send()
    conn.receive_data(b"BDAT 2 LAST\r\nhi")
    assert kinds([conn.next_event() for _ in range(3)]) == [DataStart, DataChunk, DataEnd]
    conn.send(R.OK)
    assert conn.next_event() is PAUSED
    conn.send(R.OK)
    assert conn.next_event() == Reset()


# --- properties ------------------------------------------------------------------------

FRAGMENTS = [
    b"EHLO c\r\n",
    b"HELO c\r\n",
    b"MAIL FROM:<a@b.example>\r\n",
    b"MAIL FROM:<> SIZE=10\r\n",
    b"RCPT TO:<c@d.example>\r\n",
    b"RCPT TO:<postmaster>\r\n",
    b"DATA\r\n",
    b"BDAT 4\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 2 X\r\n",
    b"BDAT x\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"hello\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..x\r\n",
    b"\n",
    b"\r",
    b".",
    b"x" * 45,
    b"\x00",
    b"\xc3\xa9",
    b"FOO\r\n",
]
SMALL = Limits(
    max_command_line=40, max_text_line=30, max_message_size=60, max_recipients=2, max_errors=20
)


def picky(conn: SMTPServerConnection, event: Event) -> Union[Reply, list[Reply]]:
    """Accept, except the postmaster recipient; deterministic per event."""
    if isinstance(event, RcptTo) and event.recipient == "postmaster":
        return R.RCPT_UNKNOWN
    return ok_answer(conn, event)


def merge_chunks(events: list[Event]) -> list[Event]:
    """Join adjacent DataChunks and drop the content of messages that did not end
    in DataEnd: how refused content is cut into chunks is not a guarantee."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and merged and isinstance(merged[-1], DataChunk):
            merged[-1] = DataChunk(merged[-1].data + event.data)
        else:
            merged.append(event)
    kept: list[Event] = []
    for i, event in enumerate(merged):
        following = merged[i + 1] if i + 1 < len(merged) else None
        if isinstance(event, DataChunk) and not isinstance(following, DataEnd):
            continue
        kept.append(event)
    return kept


def transcript(data: bytes, cuts: list[int]) -> tuple[list[Event], bytes]:
    """Feed ``data`` cut at ``cuts``, then EOF; return normalised events and bytes."""
    conn = new(limits=SMALL, tls_available=False)
    events: list[Event] = []
    out = b""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for start, end in zip(bounds, bounds[1:]):
        more, data_out = run(conn, data[start:end], answer=picky)
        events += more
        out += data_out
    more, data_out = run(conn, b"", answer=picky)
    conn.receive_data(b"")
    more2, data_out2 = run(conn, answer=picky)
    return merge_chunks(events + more + more2), out + data_out + data_out2


REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])(.*)\r\n")


def check_replies(out: bytes) -> None:
    """Every reply line is well formed and carries an enhanced code of its class,
    except 354 and the HELO/EHLO replies (first word: the host name)."""
    lines = out.split(b"\r\n")
    assert lines[-1] == b""
    first = True
    for line in lines[:-1]:
        match = REPLY_LINE.fullmatch(line + b"\r\n")
        assert match, line
        code, sep, text = match.groups()
        if first and (code == b"354" or text == HOST.encode()):
            exempt = True
        elif first:
            exempt = False
        if not exempt:
            assert re.match(rb"%c\.[0-9]{1,3}\.[0-9]{1,3} " % code[0], text), line
        first = sep == b" "


OPENINGS = [
    b"",
    b"EHLO c\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
    b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 9\r\n",
]


@st.composite
def streams(draw: st.DrawFn, max_parts: int = 40) -> bytes:
    """A session opening (often into DATA or BDAT) followed by random fragments."""
    opening = draw(st.sampled_from(OPENINGS))
    return opening + b"".join(draw(st.lists(st.sampled_from(FRAGMENTS), max_size=max_parts)))


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_any_chunking_same_result(data: st.DataObject) -> None:
    """Any chunking of the same byte stream yields the same events and reply bytes."""
    stream = data.draw(streams())
    cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(stream)), max_size=12))
    whole = transcript(stream, [])
    assert transcript(stream, cuts) == whole
    check_replies(whole[1])


@settings(max_examples=50, deadline=None)
@given(streams(max_parts=25))
def test_byte_at_a_time_same_result(stream: bytes) -> None:
    """Feeding one octet at a time gives the same events and bytes as one read."""
    assert transcript(stream, list(range(len(stream)))) == transcript(stream, [])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=6))
def test_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    """Arbitrary input never raises and every reply is well formed."""
    events, out = transcript(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + data, cuts)
    check_replies(out)


def test_catalog_replies_used_keep_class_invariant() -> None:
    """The replies added for this core keep the code/enhanced class invariant."""
    for reply in (R.BDAT_OK, R.USE_LHLO, R.BDAT_SYNTAX, R.BODY_NOT_SUPPORTED, R.PROTOCOL_DESYNC):
        assert reply.enhanced is not None and reply.enhanced[0] == reply.code // 100


class EtrnTests:
    """ETRN (RFC 1985) in the core."""

    def _conn(self, etrn=True):
        from mailserver.sansio.smtp_server import Limits, Mode, SMTPServerConnection

        c = SMTPServerConnection(hostname="mx.example.test", mode=Mode.MX, limits=Limits(),
                                 etrn=etrn)
        c.greeting()
        c.data_to_send()
        return c

    def test_etrn_is_a_decision_and_advertised(self):
        """ETRN after EHLO is handed to the application, and EHLO lists it."""
        from mailserver.sansio.smtp_events import Etrn, Hello

        c = self._conn()
        c.receive_data(b"EHLO c\r\nETRN example.org\r\n")
        assert isinstance(c.next_event(), Hello)
        assert b"250 ETRN\r\n" in c.data_to_send()
        assert c.next_event() == Etrn(node="example.org")

    def test_etrn_refused_in_a_transaction(self):
        """ETRN inside a mail transaction is a sequence error."""
        from mailserver import reply as R

        c = self._conn()
        c.receive_data(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n")
        c.next_event()
        c.next_event()
        c.send(R.SENDER_OK)
        c.data_to_send()
        c.receive_data(b"ETRN example.org\r\n")
        c.next_event()
        assert c.data_to_send().startswith(b"503 5.5.1")

    def test_etrn_unknown_when_disabled(self):
        """Without etrn=True the verb is unknown (LMTP, submission, or MX by choice)."""
        c = self._conn(etrn=False)
        c.receive_data(b"EHLO c\r\nETRN example.org\r\n")
        c.next_event()
        c.data_to_send()
        c.next_event()
        assert c.data_to_send().startswith(b"500 5.5.2")


class DsnParamTests:
    """RFC 3461 parameters, accepted only when DSN is offered, and checked."""

    def _conn(self, dsn=True):
        from mailserver.sansio.smtp_server import Limits, Mode, SMTPServerConnection

        c = SMTPServerConnection(hostname="mx.example.test", mode=Mode.MX, limits=Limits(),
                                 dsn=dsn)
        c.greeting()
        c.receive_data(b"EHLO c\r\n")
        c.next_event()
        self.ehlo = c.data_to_send()
        return c

    def _mail(self, c, line):
        c.receive_data(line)
        return c.next_event(), c.data_to_send()

    def test_advertised_and_accepted(self):
        """With DSN on, EHLO lists it and RET/ENVID/NOTIFY/ORCPT reach the application."""
        from mailserver import reply as R
        from mailserver.sansio.smtp_events import MailFrom, RcptTo

        c = self._conn()
        assert b"250 DSN\r\n" in self.ehlo
        event, _ = self._mail(c, b"MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B1\r\n")
        assert isinstance(event, MailFrom) and event.params["ENVID"] == "QQ+2B1"
        c.send(R.SENDER_OK)
        c.data_to_send()
        event, _ = self._mail(c, b"RCPT TO:<b@example.test> NOTIFY=FAILURE,DELAY "
                                 b"ORCPT=rfc822;b@example.test\r\n")
        assert isinstance(event, RcptTo) and event.params["NOTIFY"] == "FAILURE,DELAY"

    def test_bad_values_refused(self):
        """NOTIFY=NEVER,FAILURE and RET=ALL are syntax errors (501 5.5.4)."""
        from mailserver import reply as R

        c = self._conn()
        _, out = self._mail(c, b"MAIL FROM:<a@example.org> RET=ALL\r\n")
        assert out.startswith(b"501 5.5.4")
        event, _ = self._mail(c, b"MAIL FROM:<a@example.org>\r\n")
        c.send(R.SENDER_OK)
        c.data_to_send()
        _, out = self._mail(c, b"RCPT TO:<b@example.test> NOTIFY=NEVER,FAILURE\r\n")
        assert out.startswith(b"501 5.5.4")

    def test_unknown_without_dsn(self):
        """Without DSN the parameters are not recognised (555 5.5.4)."""
        c = self._conn(dsn=False)
        assert b"DSN" not in self.ehlo
        _, out = self._mail(c, b"MAIL FROM:<a@example.org> RET=FULL\r\n")
        assert out.startswith(b"555 5.5.4")


# Item 11 of issue 13: an address error names the sender (5.1.7) in MAIL and
# the recipient (5.1.3) in RCPT, whatever the cause (syntax or length).
MALFORMED_PATHS = [
    b"a@b.example",
    b"<a@b.example",
    b"<a@b.example.>",
    b"<a..b@b.example>",
    b"<.a@b.example>",
    b"<a@-b.example>",
    b"<a@b_c.example>",
    b"<a@[300.1.1.1]>",
    b"<a@[tag:x]>",
    b"<a@" + b"l" * 64 + b".example>",
    b"<a\x7f@b.example>",
    b"<a b@b.example>",
    b"<@b.example>",
    b"<@x.example:a@>",
    b"<" + b"a" * 65 + b"@b.example>",
    b'<"' + b"a" * 64 + b'"@b.example>',
    b"<a@" + b"d" * 60 + (b".dddddddddddddddddddddddddddddddddddddddddddddddddddddddd" * 4) + b">",
    b"<a@" + b"b." * 127 + b"example>",
]


@pytest.mark.parametrize("path", MALFORMED_PATHS)
def test_address_error_codes_name_sender_or_recipient(path: bytes) -> None:
    """A malformed or over-long path gets 5.1.7 in MAIL FROM and 5.1.3 in RCPT TO."""
    conn = greeted()
    _, out = run(conn, b"MAIL FROM:" + path + b"\r\n")
    assert out[:3] in (b"501", b"553") and out[4:10] == b"5.1.7 ", out
    conn = greeted()
    run(conn, MAIL)
    _, out = run(conn, b"RCPT TO:" + path + b"\r\n")
    assert out[:3] in (b"501", b"553") and out[4:10] == b"5.1.3 ", out


@pytest.mark.parametrize("chunks, eight_bit", [
    ([b"a: b\r\n\r\nplain\r\n"], False),
    ([b"a: b\r\n\r\ncaf", b"\xc3\xa9\r\n"], True),
    ([b"a: \xff\r\n\r\n", b"plain\r\n"], True),
])
def test_data_end_notes_8bit_octets(chunks: list, eight_bit: bool) -> None:
    """DataEnd says whether any chunk held an octet above 127, without BODY=8BITMIME."""
    conn = with_rcpt()
    run(conn, b"DATA\r\n")
    events: list[Event] = []
    for chunk in chunks:
        events += run(conn, chunk)[0]
    events += run(conn, b".\r\n")[0]
    [end] = [e for e in events if isinstance(e, DataEnd)]
    assert end.eight_bit is eight_bit


@pytest.mark.parametrize("junk", [b"NOOP", b"RSET", b"VRFY bob", b"HELP"])
def test_junk_command_limit_closes_the_session(junk: bytes) -> None:
    """Past max_junk_commands NOOP/RSET/VRFY/HELP (any mix) the core says 421 4.7.0 and closes."""
    conn = greeted(limits=Limits(max_junk_commands=5))
    events, out = run(conn, (junk + b"\r\n") * 5)
    assert not conn.closed
    events, out = run(conn, b"NOOP\r\n")
    assert conn.closed and out.endswith(R.TOO_MANY_JUNK_COMMANDS.to_bytes())
    assert isinstance(events[-1], Closing)


def test_junk_count_starts_again_after_a_delivered_message() -> None:
    """An accepted message resets the junk count, so a long LMTP feed with RSETs is not cut off."""
    conn = greeted(limits=Limits(max_junk_commands=3))
    for _ in range(5):
        run(conn, b"RSET\r\nNOOP\r\n" + MAIL + RCPT + b"DATA\r\n")
        run(conn, b"a: b\r\n\r\nx\r\n.\r\n")
    assert not conn.closed


def test_junk_limit_zero_is_off() -> None:
    """max_junk_commands = 0 means no limit."""
    conn = greeted(limits=Limits(max_junk_commands=0))
    run(conn, b"NOOP\r\n" * 500)
    assert not conn.closed


@pytest.mark.parametrize("repeat", [
    b"EHLO client.example\r\n",
    b"HELO client.example\r\n",
    RCPT,  # past max_recipients: 452, which counts as no error
])
def test_repeated_hello_and_recipients_past_the_limit_are_junk(repeat: bytes) -> None:
    """A second HELO/EHLO and a RCPT past the recipient limit count as junk, so they cannot hold a session either."""
    conn = greeted(limits=Limits(max_junk_commands=5, max_recipients=1, max_errors=1000))
    run(conn, MAIL + RCPT)
    run(conn, repeat * 5)
    assert not conn.closed
    _, out = run(conn, repeat)
    assert conn.closed and out.endswith(R.TOO_MANY_JUNK_COMMANDS.to_bytes())
