"""Fuzz the sans-IO POP3 server core (mailserver.sansio.pop3)."""

from __future__ import annotations

import base64
import re

from hypothesis import given
from hypothesis import strategies as st

from mailserver.sansio.pop3 import POP3ServerConnection, State
from mailserver.sansio.pop3_events import (
    NEED_DATA,
    PAUSED,
    Authenticate,
    MessageInfo,
    Retrieve,
    StartTLS,
    Update,
)
from tests.fuzz.conftest import FUZZ
from tests.fuzz.strategies import chunked, cuts, streams

TOKENS = [b"USER alice\r\n", b"PASS secret\r\n", b"PASS \r\n", b"CAPA\r\n", b"STLS\r\n",
          b"STAT\r\n", b"LIST", b"UIDL", b"RETR ", b"TOP ", b"DELE ", b"RSET\r\n", b"NOOP\r\n",
          b"QUIT\r\n", b"1", b"2", b" 0", b"4294967296", b"AUTH PLAIN",
          b" " + base64.b64encode(b"\0alice\0secret"), b"AUTH\r\n", b"*\r\n", b"APOP x y\r\n",
          b"x" * 300]
RESPONSE = re.compile(rb"(\+OK|-ERR|\+ )[\x20-\x7e\x80-\xff]*\r\n|[\x20-\x7e\x80-\xff]*\r\n")

# Often logged in first, so that the TRANSACTION commands are reached.
sessions = st.tuples(st.sampled_from([b"", b"USER alice\r\nPASS secret\r\n",
                                      b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret")
                                      + b"\r\nRETR 1\r\n"]),
                     streams(TOKENS)).map(b"".join)

bodies = st.lists(st.binary(max_size=60).map(lambda b: b.replace(b"\x00", b"")), min_size=0,
                  max_size=3)


def _unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", wire[-20:]
    lines = wire[:-3].split(b"\r\n")[:-1] if wire != b".\r\n" else []
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


@FUZZ
@given(sessions, cuts, bodies, st.booleans(), st.booleans(), st.booleans())
def test_any_byte_stream_gets_valid_responses(data, cut, stored, positive, tls, eof):
    """Any bytes, however chunked, give only CRLF-ended response lines and a consistent state."""
    conn = POP3ServerConnection(hostname="pop.example.test", tls_available=True,
                                plaintext_auth=True, auth_mechanisms=("PLAIN", "LOGIN"))
    messages = [MessageInfo(len(m) + m.count(b"\n") + 2, f"uid{i}") for i, m in enumerate(stored)]
    conn.greeting()
    out = bytearray(conn.data_to_send())
    for piece in chunked(data, cut) + ([b""] if eof else []):
        conn.receive_data(piece)
        while True:
            event = conn.next_event()
            assert conn.state in State
            if conn.state is State.TRANSACTION:
                assert conn.user is not None
                assert all(0 <= i < len(conn.messages) for i in conn.deleted)
            # The error past max_errors is "too many errors" and ends the session.
            assert conn.errors <= conn.max_errors or (conn.closed and
                                                      conn.errors == conn.max_errors + 1)
            if event is NEED_DATA:
                break
            if event is not PAUSED:
                continue
            pending = conn.pending
            if isinstance(pending, StartTLS):
                if tls:
                    conn.send_ok()
                    out += conn.data_to_send()
                    conn.tls_started()
                else:
                    conn.send_err("TLS not available", "SYS/TEMP")
            elif isinstance(pending, Authenticate):
                if positive:
                    conn.logged_in(messages, identity="alice")
                else:
                    conn.send_err("authentication failed", "AUTH")
            elif isinstance(pending, Retrieve):
                out += conn.data_to_send()  # earlier responses, before the +OK of RETR
                conn.send_ok()
                wire = conn.stuff(stored[pending.index])
                conn.finish_retrieve()
                wire += conn.data_to_send()
                head, _, content = wire.partition(b"\r\n")
                assert head.startswith(b"+OK")
                unstuffed = _unstuff(content)
                if pending.lines is None:  # RETR: the whole message, line ends made CRLF
                    expected = re.sub(rb"\r?\n|\r(?!\n)$", b"\r\n", stored[pending.index])
                    if expected and not expected.endswith(b"\r\n"):
                        expected += b"\r\n"
                    assert unstuffed == expected
                continue
            elif isinstance(pending, Update):
                conn.send_ok()
            else:
                raise AssertionError(f"unexpected decision {pending!r}")
        out += conn.data_to_send()
        if conn.closed:
            break
    assert out.endswith(b"\r\n")
    for line in bytes(out).split(b"\r\n")[:-1]:
        assert RESPONSE.fullmatch(line + b"\r\n"), line
        assert b"\r" not in line and b"\n" not in line and b"\x00" not in line
