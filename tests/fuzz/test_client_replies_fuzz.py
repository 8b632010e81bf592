"""Fuzz the SMTP client's reply parser (mailserver.sansio._client_replies)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailserver.reply import Reply
from mailserver.sansio._client_replies import (
    MalformedReply,
    ReplyReader,
    make_reply,
    parse_extensions,
    size_limit,
    with_enhanced,
)
from tests.fuzz.conftest import FUZZ
from tests.fuzz.strategies import chunked, cuts, streams

TOKENS = [b"250-", b"250 ", b"220 ", b"354 ", b"421-", b"550 5.1.1 ", b"2.0.0 ", b"SIZE 1000",
          b"AUTH=PLAIN LOGIN", b"AUTH ", b"PIPELINING", b"x" * 300, b"999 "]


def _read(pieces: list):
    reader = ReplyReader(max_line=256, max_lines=8)
    buf = bytearray()
    replies = []
    try:
        for piece in pieces:
            buf += piece
            while (r := reader.next_reply(buf)) is not None:
                replies.append(r)
            assert len(buf) < 256
    except MalformedReply:
        return replies, "malformed"
    return replies, None


@FUZZ
@given(streams(TOKENS), cuts, st.booleans())
def test_reply_reader_only_raises_malformed_reply(data, cut, enhanced):
    """The reply reader returns well-formed replies or raises MalformedReply, however chunked."""
    replies, error = _read(chunked(data, cut))
    # Chunking changes only how far it got before the same verdict.
    assert _read([data])[1] == error or error is None or _read([data])[1] is None
    for raw in replies:
        assert 200 <= raw.code <= 599 and 1 <= len(raw.lines) <= 8
        reply = make_reply(raw, enhanced)
        assert isinstance(reply, Reply)
        full = with_enhanced(reply)
        assert full.enhanced is not None and full.enhanced[0] == raw.code // 100
        reply.to_bytes()  # can be sent on, in a DSN or to our own client
        extensions = parse_extensions(raw)
        assert all(k == k.upper() for k in extensions)
        assert size_limit(extensions) >= 0
