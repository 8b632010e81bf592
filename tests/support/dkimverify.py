"""Checking DKIM signatures the way a receiving server does, for tests.

:func:`verify_signatures` runs dkimpy's verifier over every
``DKIM-Signature`` field of a message (as stored in a maildir or dumped by
Postfix's smtp-sink: LF line ends are fine) and fetches the keys from a DNS
server, normally the loopback :class:`tests.support.dns.DNSServer`.
"""

from __future__ import annotations

from typing import List, Tuple

import dkim

from mailserver.dnsrecords import dnspython_lookup


def signature_tags(message: bytes) -> List[dict]:
    """The tags (``d``, ``s``, ``a``, ``h``...) of each DKIM-Signature field, top first."""
    headers, _body = dkim.rfc822_parse(message.split(b"\n\n", 1)[0].replace(b"\r", b"")
                                       + b"\n\n")
    out = []
    for name, value in headers:
        if name.lower() == b"dkim-signature":
            text = b"".join(value.split()).decode("ascii", "replace")
            out.append(dict(t.partition("=")[::2] for t in text.split(";") if t))
    return out


def verify_signatures(message: bytes, nameserver: str) -> List[Tuple[str, str, str, bool]]:
    """``(d, s, a, verified)`` for each signature, top first."""
    lookup = dnspython_lookup([nameserver], timeout=5)

    def dnsfunc(name, timeout=5):
        answers = lookup(name.decode("ascii").rstrip("."), "TXT")
        return answers[0].encode("ascii") if answers else None

    out = []
    for i, tags in enumerate(signature_tags(message)):
        ok = dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)
        out.append((tags.get("d", ""), tags.get("s", ""), tags.get("a", ""), bool(ok)))
    return out
