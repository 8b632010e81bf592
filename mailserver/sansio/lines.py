# -*- test-case-name: tests.unit.test_lines -*-
"""Byte-level framing for the SMTP/LMTP server core: no I/O, no Twisted.

Each reader works on the connection's own receive buffer (a ``bytearray``)
and removes what it consumed from the front of it.

* :class:`CommandFramer` cuts command lines, bounded by the command line
  limit, which may be higher for some verbs (SMTP extensions let MAIL and
  RCPT grow by their parameters).  A line ends at LF; one CR before the LF is
  removed, so a command ending in a bare LF is accepted (Postfix does the
  same).  Any other CR stays in the line and makes it a syntax error.  An
  overlong line is discarded up to its LF and reported as :data:`TOO_LONG`;
  it is never buffered beyond the highest limit.
* :class:`DotReader` reads DATA content.  The end of data is exactly
  CR LF "." CR LF, where the CR LF is a real line ending (the one before the
  dot, or the end of the DATA command line).  A bare LF or bare CR never ends
  a line, so ``\\n.\\r\\n``, ``\\r\\n.\\n``, ``\\r.\\r`` and the like are mere
  content and can neither end the message nor start a command (SMTP
  smuggling).  At the start of a line one leading dot is removed
  (dot-unstuffing, RFC 5321 §4.5.2).
* :class:`BdatReader` reads exactly the announced number of octets of a
  BDAT chunk (RFC 3030): binary, no unstuffing.
* :class:`ContentChecker` watches the content (after unstuffing) across chunk
  boundaries: size, NUL, bare CR or LF, line length, and 8-bit octets (noted,
  not refused: the message is then relayed as 8-bit).  It never stops the
  reading; it records what is wrong, and :attr:`ContentChecker.refusal` gives
  the reply to send once the real end has been read.

Readers hand out at most :data:`MAX_CHUNK` octets per call, whatever the size
of the buffer, so a message is never held whole in memory.
"""

from __future__ import annotations

from typing import Optional, Union

from mailserver import reply as R
from mailserver.reply import Reply

MAX_CHUNK = 65536
"""The most content one read hands out (one ``DataChunk`` event)."""

CRLF = b"\r\n"
_DOT = 0x2E
_END = b".\r\n"


class _TooLong:
    def __repr__(self) -> str:
        return "TOO_LONG"


TOO_LONG = _TooLong()
""":meth:`CommandFramer.next_line` result for a line over the limit."""


class CommandFramer:
    """Cuts command lines of at most ``limit`` octets (terminator included).

    ``verb_limits`` maps upper-case verbs (``b"RCPT"``) to a higher limit of
    their own; a line is measured against its first word's.  No more than the
    highest limit is ever buffered.
    """

    def __init__(self, limit: int, verb_limits: Optional[dict[bytes, int]] = None) -> None:
        self.limit = limit
        self.verb_limits = dict(verb_limits or {})
        self.bound = max([limit, *self.verb_limits.values()])
        self._skipping = False

    def next_line(self, buf: bytearray) -> Union[bytes, _TooLong, None]:
        """The next line without its terminator, ``TOO_LONG`` or ``None`` (need more).

        While skipping an overlong line everything up to its LF is dropped;
        ``TOO_LONG`` is returned once that LF has arrived, so the reply comes
        in the place of the line.
        """
        if not self._skipping:
            end = buf.find(b"\n", 0, self.bound)
            if end >= 0:
                line = bytes(buf[:end])
                del buf[: end + 1]
                if end >= self.limit and end + 1 > self._limit_for(line):
                    return TOO_LONG
                return line[:-1] if line.endswith(b"\r") else line
            if len(buf) < self.bound:
                return None
            self._skipping = True
        end = buf.find(b"\n")
        if end < 0:
            del buf[:]
            return None
        del buf[: end + 1]
        self._skipping = False
        return TOO_LONG

    def reset(self) -> None:
        """Forget a partly skipped line (the buffer was discarded)."""
        self._skipping = False

    def _limit_for(self, line: bytes) -> int:
        return self.verb_limits.get(line.partition(b" ")[0].upper(), self.limit)


class ContentChecker:
    """Checks message content as it streams past, across chunk boundaries.

    ``max_line`` counts a line with its CR LF; ``max_size`` of 0 means no
    limit.  Lines are measured on the content after dot-unstuffing, that is
    on what will be stored and relayed.
    """

    def __init__(self, max_line: int, max_size: int) -> None:
        self.max_line = max_line
        self.max_size = max_size
        self.size = 0
        self._line = 0  # octets of the current, unfinished line
        self._cr = False  # the last octet seen was a CR
        self.too_big = False
        self.nul = False
        self.bare_newline = False
        self.long_line = False
        self.eight_bit = False  # an octet above 127 was seen (declared or not)

    def feed(self, data: bytes) -> None:
        """Account for the next piece of content."""
        if not data:
            return
        self.size += len(data)
        if self.max_size and self.size > self.max_size:
            self.too_big = True
        if b"\x00" in data:
            self.nul = True
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        self._check_newlines(data)
        self._check_lines(data)

    def finish(self) -> None:
        """The content is complete: a trailing CR is a bare CR."""
        if self._cr:
            self.bare_newline = True
            self._cr = False

    @property
    def refusal(self) -> Optional[Reply]:
        """The reply refusing the content, or ``None`` while it is acceptable.

        When several things are wrong the first of size, NUL, bare newline
        and line length wins, so the answer does not depend on chunking.
        """
        if self.too_big:
            return R.MESSAGE_TOO_BIG
        if self.nul:
            return R.NUL_IN_DATA
        if self.bare_newline:
            return R.BARE_NEWLINE
        if self.long_line:
            return R.DATA_LINE_TOO_LONG
        return None

    def _check_newlines(self, data: bytes) -> None:
        # Every CR must be followed by LF and every LF preceded by CR: the
        # three counts agree exactly when there is no bare CR or LF.
        text = (b"\r" + data) if self._cr else data
        self._cr = text.endswith(b"\r")
        if self._cr:
            text = text[:-1]
        pairs = text.count(CRLF)
        if text.count(b"\r") != pairs or text.count(b"\n") != pairs:
            self.bare_newline = True

    def _check_lines(self, data: bytes) -> None:
        parts = data.split(b"\n")
        if len(parts) == 1:
            self._line += len(data)
        else:
            longest = max(self._line + len(parts[0]), max(map(len, parts[1:-1]), default=0))
            if longest + 1 > self.max_line:
                self.long_line = True
            self._line = len(parts[-1])
        if self._line > self.max_line:
            self.long_line = True


class DotReader:
    """Reads DATA content up to CR LF "." CR LF, unstuffing leading dots."""

    def __init__(self) -> None:
        # True when the next octet starts a line (it follows a real CR LF).
        # The DATA command's own line ending counts, so the content starts at
        # the beginning of a line.
        self._at_line_start = True
        self.ended = False

    def read(self, buf: bytearray) -> bytes:
        """Consume content from ``buf`` and return it, unstuffed.

        Sets :attr:`ended` once the final "." CR LF has been consumed.  A CR
        at the end of the buffer is kept back until the next octet shows
        whether it begins a CR LF.
        """
        out: list[bytes] = []
        pos = 0
        window = min(len(buf), MAX_CHUNK)
        while pos < window and not self.ended:
            if self._at_line_start:
                pos, wait = self._line_start(buf, pos)
                if wait:
                    break
                continue
            found = buf.find(b"\r\n.", pos, window)
            if found >= 0:
                out.append(bytes(buf[pos : found + 2]))
                pos = found + 2
                self._at_line_start = True
                continue
            end = window
            if buf[end - 1] == 0x0D:
                end -= 1  # maybe the CR of a CR LF: keep it back
            piece = bytes(buf[pos:end])
            out.append(piece)
            pos = end
            self._at_line_start = piece.endswith(CRLF)
            break
        del buf[:pos]
        return b"".join(out)

    def _line_start(self, buf: bytearray, pos: int) -> tuple[int, bool]:
        """Handle a leading dot at ``pos``; return the new position and
        whether more input is needed to decide."""
        if buf[pos] != _DOT:
            self._at_line_start = False
            return pos, False
        head = bytes(buf[pos : pos + 3])
        if head == _END:
            self.ended = True
            return pos + 3, False
        if len(head) < 3 and _END.startswith(head):
            return pos, True
        self._at_line_start = False
        return pos + 1, False  # a stuffed dot: drop it


class BdatReader:
    """Reads the ``size`` octets of one BDAT chunk, as they are."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.remaining = size

    @property
    def ended(self) -> bool:
        return self.remaining == 0

    def read(self, buf: bytearray) -> bytes:
        """Consume up to :data:`MAX_CHUNK` octets of the chunk from ``buf``."""
        take = min(self.remaining, len(buf), MAX_CHUNK)
        data = bytes(buf[:take])
        del buf[:take]
        self.remaining -= take
        return data
