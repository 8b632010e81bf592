# -*- test-case-name: tests.unit.test_smtp_client -*-
"""Pieces of the outbound SMTP/LMTP client that hold no session state.

* :class:`ReplyReader` cuts a server's replies out of the receive buffer,
  bounded in line length and line count; anything that is not a reply raises
  :class:`MalformedReply` (the client turns that into a temporary failure).
* :func:`make_reply` turns a :class:`RawReply` into a
  :class:`~mailserver.reply.Reply`, reading the RFC 3463 enhanced code only
  when the server advertised ENHANCEDSTATUSCODES, and :func:`with_enhanced`
  gives a reply without one an enhanced code of the right class (``4.0.0``,
  ``5.0.0``...), which a DSN needs.
* :func:`parse_extensions` reads an EHLO/LHLO reply.

No I/O and no Twisted here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mailserver.reply import Reply

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)")
_ENHANCED = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


class MalformedReply(Exception):
    """The server sent something that is not an SMTP reply (or too much of it)."""


@dataclass(frozen=True)
class RawReply:
    """A reply as the server sent it: the code and the text of each line."""

    code: int
    lines: tuple[str, ...]


class ReplyReader:
    """Reads complete (possibly multi-line) replies from a buffer.

    ``max_line`` bounds one line (its CR LF included) and ``max_lines`` the
    lines of one reply; both protect us from a server that never stops
    talking.  A line may end in a bare LF; a CR before the LF is removed.
    """

    def __init__(self, max_line: int = 2048, max_lines: int = 100) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._code: Optional[int] = None

    def next_reply(self, buf: bytearray) -> Optional[RawReply]:
        """The next complete reply, or ``None`` when more input is needed.

        Consumes what it reads from the front of ``buf``; raises
        :class:`MalformedReply` for a line that is not a reply line, a
        continuation with another code, or a reply over the limits.
        """
        while True:
            end = buf.find(b"\n", 0, self.max_line)
            if end < 0:
                if len(buf) >= self.max_line:
                    raise MalformedReply("reply line too long")
                return None
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            match = _REPLY_LINE.match(line)
            if match is None:
                raise MalformedReply("not a reply line")
            code = int(match.group(1))
            if self._code is not None and code != self._code:
                raise MalformedReply("reply code changed within a reply")
            self._code = code
            self._lines.append(_clean(line[4:]))
            if len(self._lines) > self.max_lines:
                raise MalformedReply("too many reply lines")
            if match.group(2) != b"-":
                reply = RawReply(code, tuple(self._lines))
                self.reset()
                return reply

    def reset(self) -> None:
        """Forget a partly read reply (the buffer was discarded)."""
        self._lines = []
        self._code = None


def _clean(text: bytes) -> str:
    """Reply text fit for a :class:`Reply` and a DSN: no control characters."""
    decoded = text.decode("utf-8", "replace").replace("\t", " ")
    return _CONTROL.sub("?", decoded)


def make_reply(raw: RawReply, enhanced: bool) -> Reply:
    """The :class:`Reply` for ``raw``; with ``enhanced`` the RFC 3463 code
    is taken from the first line and removed from every line.

    An enhanced code whose class differs from the basic code's is not
    believed (it stays in the text, and the reply gets none).
    """
    lines = list(raw.lines)
    code_tuple = None
    if enhanced:
        match = _ENHANCED.match(lines[0])
        if match is not None and int(match.group(1)) == raw.code // 100:
            code_tuple = tuple(int(g) for g in match.groups())
            lines = [_ENHANCED.sub("", line, count=1) for line in lines]
    return Reply(raw.code, code_tuple, "\n".join(lines))  # type: ignore[arg-type]


def with_enhanced(reply: Reply) -> Reply:
    """``reply`` with an enhanced code: its own, or ``X.0.0`` of its class."""
    if reply.enhanced is not None:
        return reply
    return Reply(reply.code, (reply.code // 100, 0, 0), reply.text)


def parse_extensions(raw: RawReply) -> dict[str, str]:
    """EHLO keywords (upper case) to their parameters, from an EHLO reply.

    The first line is the server's greeting and is skipped.  The old
    ``AUTH=PLAIN LOGIN`` form counts as ``AUTH``.
    """
    extensions: dict[str, str] = {}
    for line in raw.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):
            keyword, params = "AUTH", keyword[5:] + " " + params
        if keyword and keyword.replace("-", "").isalnum():
            if keyword == "AUTH" and "AUTH" in extensions:
                params = extensions["AUTH"] + " " + params
            extensions[keyword] = params.strip()
    return extensions


def size_limit(extensions: dict[str, str]) -> int:
    """The SIZE the server announced; 0 when none or no fixed limit."""
    value = extensions.get("SIZE", "").strip()
    return int(value) if value.isdigit() else 0
