"""Fuzz the line framer and content readers of mailserver.sansio.lines."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailserver.sansio.lines import (
    MAX_CHUNK,
    TOO_LONG,
    BdatReader,
    CommandFramer,
    ContentChecker,
    DotReader,
)
from tests.fuzz.conftest import FUZZ
from tests.fuzz.strategies import chunked, cuts, streams

TOKENS = [b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"\r\n.\r\n", b".\r\n", b"\r\n..", b"x" * 600]


def _frame(data: bytes, pieces: list, limit: int) -> list:
    framer = CommandFramer(limit, {b"RCPT": limit * 2})
    buf = bytearray()
    out = []
    for piece in pieces:
        buf += piece
        while True:
            line = framer.next_line(buf)
            if line is None:
                break
            out.append(line)
        assert len(buf) <= framer.bound
    return out


@FUZZ
@given(streams(TOKENS), cuts, st.integers(min_value=8, max_value=700))
def test_framer_is_independent_of_chunking(data, cut, limit):
    """The command framer yields the same lines however the input is chunked, and bounds its buffer."""
    whole = _frame(data, [data], limit)
    assert _frame(data, chunked(data, cut), limit) == whole
    for line in whole:
        assert line is TOO_LONG or (b"\n" not in line and len(line) < limit * 2)


def _dot_read(pieces: list):
    reader, checker = DotReader(), ContentChecker(1000, 0)
    buf = bytearray()
    content = []
    for piece in pieces:
        buf += piece  # after the end, the rest stays in the buffer for the next command
        while not reader.ended:
            got = reader.read(buf)
            assert len(got) <= MAX_CHUNK
            checker.feed(got)
            content.append(got)
            if not got:
                break
    checker.finish()
    return reader.ended, b"".join(content), bytes(buf), checker.refusal


@FUZZ
@given(streams(TOKENS), cuts)
def test_dot_reader_is_independent_of_chunking(data, cut):
    """DotReader ends at the same place with the same content and verdict however input is chunked."""
    whole = _dot_read([data])
    assert _dot_read(chunked(data, cut)) == whole
    ended, content, rest, _refusal = whole
    if ended:  # the end is exactly CRLF "." CRLF, and the content keeps its final CRLF
        assert (b"\r\n" + content).endswith(b"\r\n")


@FUZZ
@given(st.binary(max_size=300), cuts, st.integers(min_value=0, max_value=300))
def test_bdat_reader_takes_exactly_the_announced_octets(data, cut, size):
    """BdatReader consumes exactly min(size, available) octets, never more."""
    reader, buf, got = BdatReader(size), bytearray(), []
    for piece in chunked(data, cut):
        buf += piece
        got.append(reader.read(buf))
    assert b"".join(got) + bytes(buf) == data
    assert len(b"".join(got)) == min(size, len(data))
