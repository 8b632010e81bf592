"""Checks on what a server core wrote: whole, valid reply lines."""

from __future__ import annotations

import re

SMTP_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])[\x20-\x7e\x80-\xff]*\r\n")


def smtp_replies(out: bytes) -> list:
    """The codes of the complete SMTP replies in ``out``; asserts every line is valid."""
    codes, current = [], None
    lines = out.split(b"\r\n")
    assert lines[-1] == b"", f"output does not end with CRLF: {out[-80:]!r}"
    for line in lines[:-1]:
        m = SMTP_LINE.fullmatch(line + b"\r\n")
        assert m is not None, f"not a reply line: {line!r}"
        assert len(line) + 2 <= 512, f"reply line over 512 octets: {line[:80]!r}"
        code = int(m.group(1))
        assert current in (None, code), f"code changed inside a reply: {line!r}"
        current = None if m.group(2) == b" " else code
        if current is None:
            codes.append(code)
    assert current is None, "multi-line reply left unfinished"
    return codes
