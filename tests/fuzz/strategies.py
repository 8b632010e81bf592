"""Input strategies shared by the fuzz targets: protocol-shaped bytes and chunkings."""

from __future__ import annotations

from hypothesis import strategies as st


def chunked(data: bytes, cuts: list) -> list:
    """``data`` cut at the given positions (modulo its length), in order."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return [c for c in out if c]


def streams(tokens: list) -> st.SearchStrategy:
    """Byte streams mixing protocol tokens with random bytes."""
    piece = st.one_of(st.sampled_from(tokens), st.binary(max_size=40),
                      st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"\x00", b" ", b":", b"<",
                                       b">", b"@", b"=", b"\xff", "é".encode()]))
    return st.lists(piece, max_size=40).map(b"".join)


cuts = st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12)
