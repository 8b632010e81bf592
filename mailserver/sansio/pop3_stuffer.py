# -*- test-case-name: tests.unit.test_pop3 -*-
"""The content of a RETR or TOP response, made from the stored message chunk
by chunk (sans-IO; :meth:`mailserver.sansio.pop3.POP3ServerConnection.stuff`
is the way in).  The rules are in that module's docstring, under *Content*."""

from __future__ import annotations

from typing import Optional

CRLF = b"\r\n"


def whole(content: bytes, limit: Optional[int] = None) -> bytes:
    """The wire form of a whole stored message, its terminating ``.`` line
    included: what :meth:`Stuffer.feed` and :meth:`Stuffer.finish` make of
    it in one go."""
    stuffer = Stuffer(limit)
    return stuffer.feed(content) + stuffer.finish()


class Stuffer:
    """A stored message (LF or CRLF line ends) to wire form, chunk by chunk:
    CRLF line ends, dot-stuffing, and for TOP the line limit."""

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit  # TOP: body lines wanted; None: everything
        self.in_body = False
        self.count = 0  # body lines passed
        self.done = False  # TOP has all it wants
        self._start = True  # the next octet begins a line
        self._cr = False  # a CR held back: it may begin a CR LF

    def feed(self, chunk: bytes) -> bytes:
        data = b"\r" + chunk if self._cr else chunk
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        if self.limit is None:  # RETR: whole-chunk replaces, no walk line by line
            return self._feed_all(data)
        out = bytearray()
        pieces = data.split(b"\n")
        for piece in pieces[:-1]:
            self._text(out, piece[:-1] if piece.endswith(b"\r") else piece)
            self._end_line(out)
        self._text(out, pieces[-1])
        return bytes(out)

    def _feed_all(self, data: bytes) -> bytes:
        """The same conversion as the line walk, for RETR, in a few passes
        over the chunk (a bare CR inside a line stays as it is)."""
        if not data:
            return b""
        if b"\r" not in data:  # stored with LF line ends (as Dovecot stores mail)
            text = data.replace(b"\n.", b"\n..") if b"\n." in data else data
            text = text.replace(b"\n", CRLF)
        elif data.count(b"\n") == data.count(b"\r\n"):
            # Stored with CRLF already (as this server stores mail): only the
            # dots, and no copy at all when no line starts with one.
            text = data.replace(b"\r\n.", b"\r\n..") if b"\n." in data else data
        else:
            text = data.replace(b"\r\n", b"\n")
            text = text.replace(b"\n.", b"\n..").replace(b"\n", CRLF)
        if self._start and text[:1] == b".":
            text = b"." + text
        self._start = text.endswith(b"\n")
        return text

    def finish(self) -> bytes:
        out = bytearray()
        if self._cr:  # a final lone CR ends the last line
            self._cr = False
            self._end_line(out)
        if not self._start:
            self._end_line(out)
        out += b".\r\n"
        return bytes(out)

    def _text(self, out: bytearray, piece: bytes) -> None:
        if self.done or not piece:
            return
        if self._start and piece[:1] == b".":
            out += b"."
        out += piece
        self._start = False

    def _end_line(self, out: bytearray) -> None:
        if self.done:
            return
        out += CRLF
        blank = self._start
        self._start = True
        if self.limit is None:
            return
        if self.in_body:
            self.count += 1
        elif blank:
            self.in_body = True
        self.done = self.in_body and self.count >= self.limit
