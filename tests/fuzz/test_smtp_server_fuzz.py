"""Fuzz the sans-IO SMTP/LMTP server core (mailserver.sansio.smtp_server)."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from mailserver import reply as R
from mailserver import sasl
from mailserver.sansio.smtp_events import (
    NEED_DATA,
    PAUSED,
    Authenticate,
    DataChunk,
    DataEnd,
    DataStart,
    Etrn,
    MailFrom,
    RcptTo,
    StartTLS,
)
from mailserver.sansio.smtp_server import (
    TRANSITIONS,
    Limits,
    Mode,
    SMTPServerConnection,
    State,
)
from tests.fuzz.conftest import FUZZ
from tests.fuzz.replies import smtp_replies
from tests.fuzz.strategies import chunked, cuts, streams

PLAIN = base64.b64encode(b"\0alice\0secret")
TOKENS = [
    b"EHLO client.example\r\n", b"HELO client.example\r\n", b"LHLO client.example\r\n",
    b"MAIL FROM:<a@example.org>", b"MAIL FROM:<>", b" SIZE=100", b" BODY=8BITMIME",
    b" SMTPUTF8", b" AUTH=<>", b" RET=HDRS ENVID=x", b"RCPT TO:<b@example.test>",
    b"RCPT TO:<postmaster>", b" NOTIFY=SUCCESS ORCPT=rfc822;b@example.test",
    b"DATA\r\n", b"BDAT 5", b"BDAT 0 LAST", b"BDAT 99999999999999999999", b" LAST",
    b"\r\n.\r\n", b"\r\n..\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n",
    b"STARTTLS\r\n", b"AUTH PLAIN", b" " + PLAIN, b"AUTH LOGIN\r\n", b"*\r\n", b"ETRN x\r\n",
    b"HELP\r\n", b"x" * 520, b"Subject: hi\r\n\r\nbody\r\n",
    # Whole transactions, so that the deep states are reached often.
    b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n",
    b"LHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
    b"RCPT TO:<c@example.test>\r\nBDAT 12\r\nSubject: x\r\n",
]

MODES = st.sampled_from([Mode.MX, Mode.SUBMISSION, Mode.LMTP])

# A session: often a whole transaction's start, noise, an end of data, more noise.
OPENINGS = [b"", TOKENS[-2], TOKENS[-1], b"EHLO c\r\nAUTH PLAIN " + PLAIN + b"\r\n" + TOKENS[-2][8:]]
sessions = st.tuples(st.sampled_from(OPENINGS), streams(TOKENS),
                     st.sampled_from([b"", b"\r\n.\r\n", b"BDAT 0 LAST\r\n", b"\r\n.\r\nQUIT\r\n"]),
                     streams(TOKENS)).map(b"".join)


def answer(conn: SMTPServerConnection, event, positive: bool) -> None:
    """Play the application: answer a pending decision with a valid reply."""
    if isinstance(event, StartTLS):
        conn.send(R.TLS_UNAVAILABLE)  # no TLS engine here: plaintext goes on
    elif isinstance(event, Authenticate):
        if positive:
            conn.send(R.AUTH_OK, identity="alice")
        else:
            conn.send(R.AUTH_FAILED)
    elif isinstance(event, MailFrom):
        conn.send(R.SENDER_OK if positive else R.AUTH_FAILED.with_text("no"))
    elif isinstance(event, RcptTo):
        conn.send(R.RCPT_OK if positive else R.BAD_RCPT_SYNTAX)
    elif isinstance(event, DataEnd):
        for _ in range(len(conn.transaction.recipients) if conn.mode is Mode.LMTP else 1):
            conn.send(R.OK)
    elif isinstance(event, Etrn):
        conn.send(R.OK)
    else:
        raise AssertionError(f"unexpected decision {event!r}")


def check_state(conn: SMTPServerConnection) -> None:
    """The session state is one the transition table knows, and agrees with the transaction."""
    assert conn.state in TRANSITIONS
    if conn.state in (State.MAIL, State.RCPT, State.BDAT, State.DATA):
        assert conn.transaction.mail is not None
    if conn.state in (State.RCPT, State.DATA):
        assert conn.transaction.recipients
    if conn.state in (State.INITIAL,):
        assert conn.transaction.mail is None
    if conn.auth_identity is not None:
        assert conn.authenticated


@FUZZ
@given(sessions, cuts, MODES, st.booleans(), st.booleans(), st.booleans())
def test_any_byte_stream_gets_valid_replies(data, cut, mode, positive, dsn, eof):
    """Any bytes, however chunked, give only valid reply lines and a consistent state, never an exception."""
    conn = SMTPServerConnection(
        hostname="mx.example.test", mode=mode, tls_available=True,
        auth_mechanisms=() if mode is Mode.LMTP else ("PLAIN", "LOGIN"),
        auth_requires_tls=False, dsn=dsn, etrn=True,
        limits=Limits(max_message_size=200, max_recipients=3, max_errors=20))
    conn.greeting()
    out = bytearray(conn.data_to_send())
    pieces = chunked(data, cut) + ([b""] if eof else [])
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            check_state(conn)
            if event is NEED_DATA:
                break
            if event is PAUSED:
                answer(conn, conn.pending, positive)
                continue
        out += conn.data_to_send()
        if not conn.closed and conn.pending is None:
            # Nothing waits for an answer: what is held is at most one unfinished line.
            assert conn.buffered <= max(conn._framer.bound, sasl.MAX_RESPONSE + 2, 3), \
                conn.buffered
        if conn.closed:
            break
    codes = smtp_replies(bytes(out))
    assert codes[0] == 220
    if conn.closed and codes[-1] not in (221, 421):
        # Only QUIT, a 421 or EOF close the session.
        assert eof


def _run(pieces: list, mode: Mode, positive: bool) -> tuple:
    conn = SMTPServerConnection(
        hostname="mx.example.test", mode=mode, tls_available=False,
        auth_mechanisms=() if mode is Mode.LMTP else ("PLAIN", "LOGIN"),
        auth_requires_tls=False, dsn=True,
        limits=Limits(max_message_size=200, max_recipients=3, max_errors=20))
    conn.greeting()
    out, events, content = bytearray(conn.data_to_send()), [], bytearray()
    for piece in pieces:
        conn.receive_data(piece)
        while (event := conn.next_event()) is not NEED_DATA:
            if event is PAUSED:
                answer(conn, conn.pending, positive)
            elif isinstance(event, DataChunk):
                content += event.data
            else:
                # Chunking may cut content anywhere, and content known to be
                # refused is not passed on (by design), so how much of it came
                # before the refusal depends on chunking: compare whole
                # accepted contents only.
                if isinstance(event, DataEnd):
                    events.append(bytes(content))
                if not isinstance(event, DataStart):
                    content.clear()
                events.append(event)
        out += conn.data_to_send()
    return bytes(out), events, conn.state


@FUZZ
@given(sessions, cuts, MODES, st.booleans())
def test_chunking_does_not_change_the_session(data, cut, mode, positive):
    """Without STARTTLS (which drops what follows it by design), chunking changes no reply and no event."""
    if b"STARTTLS" in data.upper():
        return
    whole = _run([data, b""], mode, positive)
    assert _run(chunked(data, cut) + [b""], mode, positive) == whole
