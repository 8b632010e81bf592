# -*- test-case-name: tests.unit.test_msgauth -*-
"""DKIM (RFC 6376) and ARC (RFC 8617) verification through dkimpy.

Every ``DKIM-Signature`` of the message is verified, top to bottom, each
with its own result (RFC 6376 6.1: one signature's failure says nothing
about another).  What dkimpy says becomes an RFC 8601 result:

* it verifies: ``pass``;
* the body hash or the signature does not match: ``fail``;
* the key record is missing: ``permerror`` (``no key``); a malformed
  signature or key, or one too small, ``permerror`` too (the reason says);
* DNS could not answer (:class:`~.lookups.DNSTrouble`): ``temperror``.

ARC: dkimpy's ``arc_verify`` checks the chain; the chain validation status
(``pass``, ``fail``, ``none``) is reported with the highest instance.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import List, Optional

import dkim

from mailserver.msgauth.lookups import DNSTrouble, Lookups

_quiet = logging.getLogger("mailserver.msgauth.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class DKIMResult:
    result: str
    domain: str = ""  # d=
    selector: str = ""  # s=
    algorithm: str = ""  # a=
    identity: str = ""  # i=
    b: str = ""  # the first characters of b= (RFC 6008 header.b)
    reason: str = ""


@dataclass(frozen=True)
class ARCResult:
    result: str  # pass, fail, none, temperror
    instance: int = 0
    reason: str = ""


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value or "")


def header_fields(message: bytes) -> list:
    """``(lower-case name, raw value)`` of the header section, parsed alone
    (the body of a large message is not split into lines for nothing) and
    leniently: a line that is not a field is skipped, so one malformed line
    cannot hide the From: field from DMARC."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[:end + 2]
    fields: list = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if fields:
                fields[-1][1] += line + b"\r\n"
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")  # RFC 5322 4.5.4 (obsolete): space before the colon
        if colon and name and not any(c <= 32 or c > 126 for c in name):
            fields.append([name.lower(), value + b"\r\n"])
        else:
            fields.append([b"", b""])  # not a field: its continuations go nowhere
    return [(name, value) for name, value in fields if name]


def verify_dkim(message: bytes, lookups: Lookups, *, minkey: int = 1024,
                headers: Optional[list] = None) -> List[DKIMResult]:
    """One result per DKIM-Signature field, in header order (blocking)."""
    if headers is None:
        headers = header_fields(message)
    count = sum(1 for name, _v in headers if name == b"dkim-signature")
    if not count:
        return []
    try:
        verifier = dkim.DKIM(message, logger=_quiet, minkey=minkey)
    except dkim.DKIMException as e:  # a header dkimpy cannot parse
        return [DKIMResult("permerror", reason=f"unparsable message: {e}"[:200])] * count
    results = []
    for idx in range(count):
        verifier.signature_fields = {}
        try:
            ok = verifier.verify(idx=idx, dnsfunc=lookups.dkim_txt)
            fields = verifier.signature_fields or {}
            reason = ""
            if ok:
                result = "pass"
            elif _key_name(fields) in lookups.missing:
                result, reason = "permerror", "no key"
            else:
                result, reason = "fail", "signature did not verify"
        except DNSTrouble as e:
            fields = verifier.signature_fields or {}
            result, reason = "temperror", str(e)
        except dkim.ValidationError as e:
            fields = verifier.signature_fields or {}
            result, reason = ("fail" if "body hash" in str(e) else "permerror"), str(e)
        except dkim.DKIMException as e:
            fields = verifier.signature_fields or {}
            result, reason = "permerror", str(e)
        b = re.sub(r"\s+", "", _text(fields.get(b"b", b"")))
        results.append(DKIMResult(
            result, domain=_text(fields.get(b"d")).lower(), selector=_text(fields.get(b"s")),
            algorithm=_text(fields.get(b"a")), identity=_text(fields.get(b"i")), b=b[:8],
            reason=reason[:200]))
    return results


def _key_name(fields: dict) -> str:
    return f"{_text(fields.get(b's'))}._domainkey.{_text(fields.get(b'd'))}".lower().rstrip(".")


def verify_arc(message: bytes, lookups: Lookups, *,
               headers: Optional[list] = None) -> ARCResult:
    """The ARC chain validation status (blocking)."""
    if headers is None:
        headers = header_fields(message)
    if not any(name == b"arc-seal" for name, _v in headers):
        return ARCResult("none")
    try:
        cv, results, reason = dkim.arc_verify(message, logger=_quiet, dnsfunc=lookups.dkim_txt)
    except DNSTrouble as e:
        return ARCResult("temperror", reason=str(e))
    except dkim.DKIMException as e:  # a header dkimpy cannot parse
        return ARCResult("fail", reason=str(e)[:200])
    instance = max((r.get("instance", 0) for r in results), default=0)
    if cv is None:  # an earlier hop recorded a failure: the chain ended
        return ARCResult("fail", instance, _text(reason)[:200])
    return ARCResult(_text(cv).lower(), instance,
                     "" if reason == "success" else _text(reason)[:200])
