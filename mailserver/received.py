# -*- test-case-name: tests.unit.test_received -*-
"""Trace headers: the Received line we add, and counting the ones we got.

The Received header follows RFC 5321 4.4 with the RFC 3848 / RFC 6531
``with`` keywords, and names the TLS version and cipher when the session was
encrypted.  :class:`HeaderScanner` watches the header section as it streams
past and counts Received fields, so a mail loop is caught without holding the
message in memory.
"""

from __future__ import annotations

import datetime
import email.utils
import time
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class SessionInfo:
    """What a Received header says about the SMTP session."""

    peer_ip: str
    helo: str
    hostname: str
    protocol: str = "SMTP"  # "SMTP" or "LMTP"
    esmtp: bool = True
    tls_version: Optional[str] = None
    tls_cipher: Optional[str] = None
    authenticated: bool = False
    smtputf8: bool = False
    hide_client: bool = False  # leave out the from clause (a submission client's address)


def with_keyword(info: SessionInfo) -> str:
    """The RFC 3848 / RFC 6531 protocol keyword for the ``with`` clause."""
    if info.protocol == "LMTP":
        base = "LMTP"
    elif info.smtputf8:
        base = "UTF8SMTP"
    elif info.esmtp:
        base = "ESMTP"
    else:
        return "SMTP"
    if info.tls_version:
        base += "S"
    if info.authenticated:
        base += "A"
    return base


_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")


def _clean(text: str) -> str:
    """Client-supplied text as one harmless token.

    Anything outside letters, digits and ``.-_:[]`` becomes ``?``, so a HELO
    like ``evil by mx with ESMTPS id FAKE for <x>`` cannot pose as trace
    fields of its own, and no 8-bit byte reaches a 7-bit message's header.
    """
    out = "".join(c if c in _TOKEN_CHARS else "?" for c in text)
    return out[:255] or "unknown"


def _clean_address(text: str) -> str:
    """A parsed address, with anything that could end the ``<...>`` made harmless."""
    return "".join("?" if (not c.isprintable() or c.isspace() or c in "<>()\\") else c
                   for c in text)[:512]


def _ip_literal(ip: str) -> str:
    """The address as an RFC 5321 address literal's content."""
    return f"IPv6:{ip}" if ":" in ip else ip


_last_date = (None, "")  # (whole second, its RFC 5322 date): one per second is formatted


def _date(now: float) -> str:
    """The RFC 5322 date of ``now`` in UTC ("+0000": the offset is known)."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        when = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        _last_date = (second, email.utils.format_datetime(when))
    return _last_date[1]


def received_header(info: SessionInfo, queue_id: str, recipient: Optional[str] = None,
                    now: Optional[float] = None) -> bytes:
    """A complete, folded ``Received:`` field ending in CRLF."""
    by = f"by {info.hostname} (mailserver) with {with_keyword(info)} id {queue_id}"
    if info.hide_client:
        lines = [f"Received: {by}"]
    else:
        lines = [f"Received: from {_clean(info.helo)} (unknown [{_ip_literal(info.peer_ip)}])",
                 f"\t{by}"]
    if info.tls_version:
        lines.append(f"\t(using {_clean(info.tls_version)} with cipher {_clean(info.tls_cipher or 'unknown')})")
    date = _date(time.time() if now is None else now)
    if recipient:
        lines.append(f"\tfor <{_clean_address(recipient)}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class HeaderScanner:
    """Watches the header section of a streamed message.

    Feed chunks with :meth:`feed`; it stops looking at the first empty line.
    It counts ``Received:`` fields and keeps the unfolded values of the
    fields named in ``keep`` (lower-case names), for checks at the end of the
    data (a submission's From:, whether Message-ID and Date are there).
    Memory is bounded: a partial line is capped between chunks, a kept value
    at ``max_value`` octets and ``max_fields`` occurrences per name.
    """

    def __init__(self, max_line: int = 1000, keep: tuple = (), max_value: int = 8192,
                 max_fields: int = 10) -> None:
        self.received = 0
        self.done = False
        self.fields: dict[str, list[str]] = {}
        self.truncated: set[str] = set()  # kept names with a value cut or an occurrence dropped
        self._keep = frozenset(k.lower() for k in keep)
        self._partial = b""
        self._max_line = max_line
        self._max_value = max_value
        self._max_fields = max_fields
        self._current: Optional[str] = None  # the kept field a continuation extends

    def has(self, name: str) -> bool:
        return bool(self.fields.get(name.lower()))

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self._max_line:  # never kept whole: what it says is unknown
            self._partial = self._partial[: self._max_line]
            self.truncated.update(self._keep)
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                self.done = True
                return
            self._line(line)

    def finish(self) -> None:
        """The content ended: a last header line without a line end (BDAT
        allows that) counts like any other."""
        if not self.done and self._partial:
            self._line(self._partial.rstrip(b"\r"))
        self._partial = b""
        self.done = True

    def _line(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):  # a continuation of the field before
            if self._current is not None:
                values = self.fields[self._current]
                value = values[-1] + line.decode("utf-8", "replace")
                if len(value) > self._max_value:
                    self.truncated.add(self._current)
                values[-1] = value[: self._max_value]
            return
        self._current = None
        name, colon, value = line.partition(b":")
        if not colon:
            return
        name_text = name.strip().decode("ascii", "replace").lower()
        if name_text == "received":
            self.received += 1
        if name_text in self._keep:
            values = self.fields.setdefault(name_text, [])
            text = value.decode("utf-8", "replace")
            if len(values) >= self._max_fields or len(text) > self._max_value:
                self.truncated.add(name_text)
            if len(values) < self._max_fields:
                values.append(text[: self._max_value])
                self._current = name_text
