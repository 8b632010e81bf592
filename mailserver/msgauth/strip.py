# -*- test-case-name: tests.unit.test_msgauth -*-
"""Removing ``Authentication-Results:`` fields that claim our authserv-id.

RFC 8601 5: a field with our authserv-id that arrived with the message is a
forgery (or a leftover) and must go before ours is added, or a reader could
not tell them apart.  :class:`ARFilter` is a streaming filter of the header
section (like the maildir's Return-Path filter): it holds at most one
field, bounded, and passes the body through untouched.
:func:`rewrite_without` runs it over the spooled content into a new file
beside it and renames that over the original, so the content is never held
whole in memory and the delivery path stays as it is.  Fields too long to
hold (over ``max_field`` octets) are kept only when a complete authserv-id
other than ours stands within that length; otherwise they are removed (a
long comment before the id cannot smuggle one of ours through).
"""

from __future__ import annotations

import os
from typing import Optional

from mailserver.msgauth.results import authserv_id

_NAME = b"authentication-results"


class ARFilter:
    """Drops the header fields ``Authentication-Results`` whose authserv-id
    is ``ours``; counts them in ``removed``."""

    def __init__(self, ours: str, max_field: int = 65536) -> None:
        self.ours = ours.lower()
        self.removed = 0
        self._body = False
        self._mode = "pass"  # the current field: "pass", "hold" (an A-R field) or "drop"
        self._field = bytearray()  # the field being held
        self._line = bytearray()  # the current line, until complete
        self._max = max_field
        self._mid_line = False  # part of the current line was already decided

    def feed(self, data: bytes) -> bytes:
        if self._body:
            return data
        out = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            if end < 0:
                self._line += data[start:]
                if len(self._line) > self._max:  # a huge line: decide on what we have
                    out.append(self._line_part())
                break
            self._line += data[start:end + 1]
            start = end + 1
            out.append(self._complete_line())
            if self._body:
                out.append(data[start:])
                break
        return b"".join(out)

    def flush(self) -> bytes:
        out = b""
        if self._line and not self._body:
            out = self._complete_line()
        if not self._body:
            out += self._end_field()
            self._body = True
        return out

    def _line_part(self) -> bytes:
        """Part of an over-long line: the field it is in is decided now."""
        piece = bytes(self._line)
        self._line.clear()
        if piece[:1] not in (b" ", b"\t") and not self._mid_line:
            out = self._start(piece)
        else:
            out = self._continue(piece)
        self._mid_line = True
        return out + self._overflow()

    def _complete_line(self) -> bytes:
        line = bytes(self._line)
        self._line.clear()
        if self._mid_line:  # the rest of an over-long line
            self._mid_line = False
            return self._continue(line)
        if line in (b"\r\n", b"\n"):
            out = self._end_field()
            self._body = True
            return out + line
        if line[:1] in (b" ", b"\t"):
            return self._continue(line)
        return self._start(line)

    def _start(self, line: bytes) -> bytes:
        out = self._end_field()
        if line.partition(b":")[0].strip().lower() == _NAME:
            self._mode = "hold"
            self._field += line
            return out
        self._mode = "pass"
        return out + line

    def _continue(self, line: bytes) -> bytes:
        if self._mode == "hold":
            self._field += line
            return self._overflow()
        return line if self._mode == "pass" else b""

    def _overflow(self) -> bytes:
        """A held field longer than we keep: decide on its start."""
        if self._mode != "hold" or len(self._field) <= self._max:
            return b""
        field = bytes(self._field)
        self._field.clear()
        value = self._value(field)
        ident = authserv_id(value)
        if ident and ident != self.ours and not value.lower().endswith(ident):
            self._mode = "pass"  # a whole authserv-id, not ours
            return field
        self.removed += 1  # ours, or not telling within the limit: removed
        self._mode = "drop"
        return b""

    def _end_field(self) -> bytes:
        field = bytes(self._field)
        self._field.clear()
        self._mode = "pass"
        if not field:
            return b""
        if self._claims_ours(field):
            self.removed += 1
            return b""
        return field

    @staticmethod
    def _value(field: bytes) -> str:
        value = field.partition(b":")[2].decode("utf-8", "replace")
        return value.replace("\r\n", "").replace("\n", "")

    def _claims_ours(self, field: bytes) -> bool:
        return authserv_id(self._value(field)) == self.ours


def rewrite_without(path: str, ours: str, chunk_size: int = 65536) -> Optional[int]:
    """Rewrite the file at ``path`` without A-R fields claiming ``ours``;
    the new size, or None when there was nothing to remove (file untouched)."""
    f = ARFilter(ours)
    tmp = f"{path}.ar"
    size = 0
    with open(path, "rb") as source, open(tmp, "wb") as target:
        os.chmod(tmp, 0o600)
        while True:
            chunk = source.read(chunk_size)
            if not chunk:
                break
            out = f.feed(chunk)
            target.write(out)
            size += len(out)
        out = f.flush()
        target.write(out)
        size += len(out)
    if not f.removed:
        os.unlink(tmp)
        return None
    os.replace(tmp, path)
    return size
