"""Tests for mailserver.sansio.lines: command framing, DATA reading, content checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailserver import reply as R
from mailserver.sansio.lines import (
    MAX_CHUNK,
    TOO_LONG,
    BdatReader,
    CommandFramer,
    ContentChecker,
    DotReader,
)


def lines_of(framer: CommandFramer, *pieces: bytes) -> list:
    """Feed pieces one by one and collect every result but None."""
    buf = bytearray()
    out = []
    for piece in pieces:
        buf += piece
        while (line := framer.next_line(buf)) is not None:
            out.append(line)
    return out




@pytest.mark.parametrize(
    "data, expected",
    [
        (b"NOOP\r\n", [b"NOOP"]),
        (b"NOOP\n", [b"NOOP"]),
        (b"NOOP\r\nRSET\r\n", [b"NOOP", b"RSET"]),
        (b"NOOP\r\r\n", [b"NOOP\r"]),
        (b"NO\rOP\r\n", [b"NO\rOP"]),
        (b"\r\n", [b""]),
        (b"NOOP", []),
        (b"NOOP\r", []),
    ],
)
def test_framer_lines(data: bytes, expected: list) -> None:
    """Lines end at LF; only one CR right before the LF is removed."""
    assert lines_of(CommandFramer(512), data) == expected


def test_framer_limit_boundary() -> None:
    """A line of exactly the limit (CR LF included) passes; one more octet is TOO_LONG."""
    ok = b"N" * 510 + b"\r\n"
    long = b"N" * 511 + b"\r\n"
    assert lines_of(CommandFramer(512), ok) == [b"N" * 510]
    assert lines_of(CommandFramer(512), long + b"NOOP\r\n") == [TOO_LONG, b"NOOP"]


def test_framer_verb_limits() -> None:
    """A verb with a limit of its own is measured against it, whatever its case;
    other lines keep the base limit."""
    framer = CommandFramer(16, {b"RCPT": 32})
    rcpt = b"rcpt " + b"x" * 25 + b"\r\n"
    assert len(rcpt) == 32
    noop = b"NOOP " + b"x" * 9 + b"\r\n"
    assert len(noop) == 16
    assert lines_of(framer, rcpt, noop) == [rcpt[:-2], noop[:-2]]
    assert lines_of(framer, b"x" + rcpt, b"x" + noop, b"NOOP\n") == [TOO_LONG, TOO_LONG, b"NOOP"]
    assert lines_of(framer, b"RCPTX" + b"x" * 15 + b"\n") == [TOO_LONG]  # not the verb RCPT
    assert lines_of(framer, b"RCPT " + b"x" * 26 + b"\n") == [b"RCPT " + b"x" * 26]  # bare LF


def test_framer_verb_limits_bound_the_buffer() -> None:
    """No more than the highest limit is held while a line is incomplete."""
    framer = CommandFramer(16, {b"MAIL": 24, b"RCPT": 32})
    assert framer.bound == 32
    buf = bytearray()
    for _ in range(100):
        buf += b"RCPT " + b"x" * 100
        assert framer.next_line(buf) is None
        assert len(buf) <= 32
    buf += b"\r\nNOOP\r\n"
    assert framer.next_line(buf) is TOO_LONG
    assert framer.next_line(buf) == b"NOOP"


def test_framer_skips_overlong_line_without_buffering() -> None:
    """An overlong line is dropped as it arrives and reported at its LF."""
    framer = CommandFramer(16)
    buf = bytearray()
    for _ in range(1000):
        buf += b"x" * 100
        assert framer.next_line(buf) is None
        assert len(buf) <= 16
    buf += b"tail\r\nNOOP\r\n"
    assert framer.next_line(buf) is TOO_LONG
    assert framer.next_line(buf) == b"NOOP"


def test_framer_reset_forgets_skipping() -> None:
    """reset() abandons a partly skipped line."""
    framer = CommandFramer(4)
    buf = bytearray(b"xxxxxxxx")
    assert framer.next_line(buf) is None
    framer.reset()
    buf += b"OK\r\n"
    assert framer.next_line(buf) == b"OK"


def read_all(data: bytes, pieces: int = 1) -> tuple[bytes, bool, bytes]:
    """Run a DotReader over data split in ``pieces`` parts; return content, ended, rest."""
    reader = DotReader()
    buf = bytearray()
    out = []
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        buf += data[i : i + step]
        while not reader.ended:
            before = len(buf)
            out.append(reader.read(buf))
            if len(buf) == before:
                break
    return b"".join(out), reader.ended, bytes(buf)


DOT_CASES = [
    (b".\r\n", b"", b""),
    (b"hello\r\n.\r\n", b"hello\r\n", b""),
    (b"hello\r\n.\r\nNOOP\r\n", b"hello\r\n", b"NOOP\r\n"),
    (b"..\r\n.\r\n", b".\r\n", b""),
    (b"a\r\n..b\r\n.\r\n", b"a\r\n.b\r\n", b""),
    (b"a\r\n...\r\n.\r\n", b"a\r\n..\r\n", b""),
    (b"a.b\r\n.\r\n", b"a.b\r\n", b""),
    (b"a\r\n.x\r\n.\r\n", b"a\r\nx\r\n", b""),
]


@pytest.mark.parametrize("data, content, rest", DOT_CASES)
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_dot_reader(data: bytes, content: bytes, rest: bytes, pieces: int) -> None:
    """DATA ends at CR LF . CR LF and leading dots are unstuffed, however it is split."""
    assert read_all(data, pieces) == (content, True, rest)


NOT_AN_END = [
    b"a\n.\r\nb",
    b"a\r\n.\nb",
    b"a\n.\nb",
    b"a\r.\rb",
    b"a\r.\r\nb",
    b"a\n.\rb",
    b"a\r\n.\rb",
    b"a\r\n. \r\nb",
]


@pytest.mark.parametrize("data", NOT_AN_END)
@pytest.mark.parametrize("pieces", [1, 1000])
def test_bare_newline_never_ends_data(data: bytes, pieces: int) -> None:
    """Bare CR or LF around a dot is content, never the end of data."""
    content, ended, _ = read_all(data + b"\r\n.\r\n", pieces)
    assert ended
    assert content.endswith(b"b\r\n")


def test_dot_reader_keeps_back_trailing_cr() -> None:
    """A CR at the end of the buffer stays there until its next octet arrives."""
    reader = DotReader()
    buf = bytearray(b"abc\r")
    assert reader.read(buf) == b"abc"
    assert buf == b"\r"
    buf += b"\n.\r\n"
    assert reader.read(buf) == b"\r\n"
    assert reader.ended


def test_dot_reader_chunk_cap() -> None:
    """One read hands out at most MAX_CHUNK octets."""
    reader = DotReader()
    buf = bytearray(b"x" * (3 * MAX_CHUNK))
    assert len(reader.read(buf)) == MAX_CHUNK
    assert len(buf) == 2 * MAX_CHUNK


@given(st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"\r\n."]), max_size=40))
def test_dot_reader_any_split(parts: list) -> None:
    """Splitting the input anywhere gives the same content and the same end."""
    data = b"".join(parts) + b"\r\n.\r\n"
    whole = read_all(data, 1)
    assert whole[1]
    for pieces in (2, 5, len(data)):
        assert read_all(data, pieces) == whole


def test_bdat_reader() -> None:
    """BdatReader takes exactly the announced octets, as they are."""
    reader = BdatReader(5)
    buf = bytearray(b"ab\r\n.")
    assert reader.read(buf) == b"ab\r\n."
    assert reader.ended and reader.size == 5
    reader = BdatReader(3)
    buf = bytearray(b"a")
    assert reader.read(buf) == b"a" and not reader.ended
    buf += b"bcNOOP"
    assert reader.read(buf) == b"bc" and reader.ended
    assert buf == b"NOOP"


def check(*pieces: bytes, max_line: int = 1000, max_size: int = 0) -> ContentChecker:
    checker = ContentChecker(max_line, max_size)
    for piece in pieces:
        checker.feed(piece)
    checker.finish()
    return checker


@pytest.mark.parametrize(
    "pieces, refusal",
    [
        ((b"a\r\nb\r\n",), None),
        ((b"a\r", b"\nb\r\n"), None),
        ((b"a\r", b"", b"\n"), None),
        ((b"",), None),
        ((b"a\nb\r\n",), R.BARE_NEWLINE),
        ((b"a\rb\r\n",), R.BARE_NEWLINE),
        ((b"a\r", b"b\r\n"), R.BARE_NEWLINE),
        ((b"a\r\n", b"\n"), R.BARE_NEWLINE),
        ((b"a\r\r\n",), R.BARE_NEWLINE),
        ((b"a\r",), R.BARE_NEWLINE),
        ((b"a\x00b\r\n",), R.NUL_IN_DATA),
        ((b"x" * 998 + b"\r\n",), None),
        ((b"x" * 999 + b"\r\n",), R.DATA_LINE_TOO_LONG),
        ((b"x" * 500, b"x" * 499, b"\r\n"), R.DATA_LINE_TOO_LONG),
        ((b"x" * 500, b"x" * 498, b"\r", b"\n"), None),
        ((b"x" * 1001,), R.DATA_LINE_TOO_LONG),
        ((b"a\r\n" + b"x" * 999 + b"\r\nb\r\n",), R.DATA_LINE_TOO_LONG),
    ],
)
def test_content_checker(pieces: tuple, refusal: object) -> None:
    """The checker finds bare CR/LF, NUL and long lines across piece boundaries."""
    assert check(*pieces).refusal == refusal


def test_content_checker_size() -> None:
    """Size is counted; over max_size is MESSAGE_TOO_BIG; 0 means no limit."""
    assert check(b"x" * 10, max_size=10).refusal is None
    assert check(b"x" * 6, b"x" * 5, max_size=10).refusal == R.MESSAGE_TOO_BIG
    assert check(b"x\r\n" * 10000, max_size=0).size == 30000


def test_content_checker_priority() -> None:
    """With several faults the reply is chosen by a fixed order, not by arrival."""
    assert check(b"\n\x00" + b"x" * 2000, max_size=5).refusal == R.MESSAGE_TOO_BIG
    assert check(b"x" * 2000 + b"\n\x00").refusal == R.NUL_IN_DATA
    assert check(b"x" * 2000 + b"\n").refusal == R.BARE_NEWLINE
