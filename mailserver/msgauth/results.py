# -*- test-case-name: tests.unit.test_msgauth -*-
"""The ``Authentication-Results:`` header (RFC 8601).

:func:`authentication_results` writes ours: the authserv-id, then one
``method=result`` per check with a short reason in a comment and the
properties that say what was checked (RFC 8601 2.7: ``smtp.mailfrom`` or
``smtp.helo`` for SPF, ``header.d``/``header.s``/``header.a``/``header.b``
per DKIM signature (RFC 6008 for ``header.b``), ``header.from`` for
DMARC).  Values a client chose are quoted when they are not plain tokens,
and comments never carry anything that could close them.

:func:`authserv_id` reads the authserv-id of a received field, so the ones
claiming ours can be removed (:mod:`.strip`).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

from mailserver.msgauth.dkim_verify import ARCResult, DKIMResult
from mailserver.msgauth.dmarc import DMARCResult
from mailserver.msgauth.spf_check import SPFResult

_PLAIN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+\Z")


def _value(text: str) -> str:
    """A property value: as is when plain, else a quoted-string."""
    if _PLAIN.match(text):
        return text
    clean = "".join(c for c in text if c.isprintable())
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    clean = "".join(c if (c.isprintable() and c.isascii() and c not in "()\\") else " "
                    for c in text)
    clean = " ".join(clean.split())[:100]
    return f" ({clean})" if clean else ""


def _spf(spf: SPFResult) -> str:
    prop = "smtp.mailfrom" if spf.identity == "mailfrom" else "smtp.helo"
    return f"spf={spf.result}{_comment(spf.reason)} {prop}={_value(spf.value or 'unknown')}"


def _wrap(parts: list, width: int = 76) -> str:
    """Words on lines of about ``width`` (the header's first tab counted as 8)."""
    lines = [parts[0]]
    for part in parts[1:]:
        if 8 + len(lines[-1]) + 1 + len(part) > width:
            lines.append("  " + part)
        else:
            lines[-1] += " " + part
    return "\r\n\t".join(lines)


def _dkim(d: DKIMResult) -> str:
    parts = [f"dkim={d.result}{_comment(d.reason)}"]
    for name, value in (("header.d", d.domain), ("header.i", d.identity),
                        ("header.s", d.selector), ("header.a", d.algorithm),
                        ("header.b", d.b)):
        if value:
            parts.append(f"{name}={_value(value)}")
    return _wrap(parts)


def _arc(arc: ARCResult) -> str:
    text = f"arc={arc.result}"
    detail = f"i={arc.instance}" if arc.instance else ""
    if arc.reason:
        detail = f"{detail} {arc.reason}".strip()
    return text + _comment(detail)


def _dmarc(dmarc: DMARCResult) -> str:
    detail = ""
    if dmarc.policy:
        detail = f"p={dmarc.policy} dis={dmarc.disposition}"
    if dmarc.reason:
        detail = f"{detail} {dmarc.reason}".strip()
    text = f"dmarc={dmarc.result}{_comment(detail)}"
    if dmarc.from_domain:
        text += f" header.from={_value(dmarc.from_domain)}"
    return text


def authentication_results(authserv_id: str, *, spf: Optional[SPFResult] = None,
                           dkim: Iterable[DKIMResult] = (), arc: Optional[ARCResult] = None,
                           dmarc: Optional[DMARCResult] = None) -> str:
    """The field's value, folded (one result per line), without CRLF."""
    results = []
    if spf is not None:
        results.append(_spf(spf))
    dkim = list(dkim)
    results.extend(_dkim(d) for d in dkim)
    if not dkim:
        results.append("dkim=none")
    if arc is not None:
        results.append(_arc(arc))
    if dmarc is not None:
        results.append(_dmarc(dmarc))
    return ";\r\n\t".join([authserv_id] + results)


def _skip_cfws(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return i


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value, lower-cased
    ("" when there is none)."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == '"':
        out, i = [], i + 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\":
                i += 1
            out.append(value[i:i + 1])
            i += 1
        return "".join(out).strip().lower()
    match = re.match(r"[^\s;()\"]+", value[i:])
    return match.group(0).lower() if match else ""
