# -*- test-case-name: tests.unit.test_srs -*-
"""Sender Rewriting Scheme, for mail we forward to other domains.

When ``alice@example.org`` writes to ``fwd@ourdomain`` and we forward to
``bob@elsewhere.example``, the receiver checks SPF for ``example.org`` against
our address and fails.  With SRS the forwarded copy's envelope sender becomes
an address of ours that encodes the original::

    SRS0=HHHHHHHHHH=TT=example.org=alice@ourdomain

``HHHHHHHHHH`` is a keyed hash so nobody can make us relay by forging such
addresses: HMAC-SHA256 over the timestamp, domain and local part (lower-cased,
each preceded by its length in octets, so no two different triples hash the
same input), its first :data:`HASH_LENGTH` base32 characters (50 bits).
Base32 survives relays that change the case of an address; the check
upper-cases what comes back and compares in constant time.  ``TT`` is the day
number (modulo 1024, two base32 characters), so old addresses expire.  A
bounce to that address is accepted at RCPT time, checked, and sent on to the
original sender.

The address has the SRS0 shape of Shevek's scheme (``=`` separators), but the
hash is ours: only this server checks it, so it need not match postsrsd's or
Exim's.  An original sender whose rewritten local part would pass 64 octets
(RFC 5321 4.5.3.1.1) is not rewritten: our own address parser, and many
others, would refuse the bounce.  Rewriting an address that is already SRS0
(a second forwarder) is not done either: the address is kept as it is, which
still passes SPF for the first forwarder's domain only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Callable, Optional

_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
DAY = 86400
PERIOD = 1024
HASH_LENGTH = 10
"""Base32 characters of the hash: 50 bits, case-insensitive."""
MAX_LOCAL = 64
"""Octets in a local part (RFC 5321 4.5.3.1.1); longer rewrites are not made."""


class SRS:
    """Rewrite senders as ``SRS0=...@domain`` and check them on the way back."""

    def __init__(self, secret: str, domain: str, *, max_age_days: int = 21,
                 clock: Callable[[], float] = time.time) -> None:
        if not secret:
            raise ValueError("SRS needs a secret")
        self.secret = secret.encode("utf-8")
        self.domain = domain.lower()
        self.max_age_days = max_age_days
        self.clock = clock

    def _hash(self, stamp: str, domain: str, local: str) -> str:
        # Each field is length-prefixed: shifting a character from the domain
        # to the local part (or the other way) changes the hashed input.
        fields = [f.lower().encode("utf-8") for f in (stamp, domain, local)]
        message = b"".join(b"%d:%s" % (len(f), f) for f in fields)
        mac = hmac.new(self.secret, message, hashlib.sha256).digest()
        return base64.b32encode(mac).decode("ascii")[:HASH_LENGTH]

    def _today(self) -> int:
        return int(self.clock() // DAY) % PERIOD

    def forward(self, sender: str) -> str:
        """The rewritten envelope sender for a forwarded copy of ``sender``'s mail."""
        local, sep, domain = sender.rpartition("@")
        if not sender or not sep or local.upper().startswith(("SRS0=", "SRS1=")) \
                or domain.lower() == self.domain:
            return sender  # bounces, our own senders and SRS addresses stay as they are
        today = self._today()
        stamp = _B32[today // 32] + _B32[today % 32]
        rewritten = f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}"
        if len(rewritten.encode("utf-8")) > MAX_LOCAL:
            return sender  # a bounce to it would be refused as too long
        return f"{rewritten}@{self.domain}"

    def is_srs(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        return domain.lower() == self.domain and local.upper().startswith("SRS0=")

    def reverse(self, address: str) -> Optional[str]:
        """The original sender behind an SRS0 address of ours, or None when the
        address is malformed, forged or expired."""
        if not self.is_srs(address):
            return None
        local = address.rpartition("@")[0]
        parts = local[5:].split("=", 3)
        if len(parts) != 4:
            return None
        given, stamp, domain, orig_local = parts
        if len(given) != HASH_LENGTH or len(stamp) != 2 or not domain or not orig_local:
            return None
        try:
            day = _B32.index(stamp[0].upper()) * 32 + _B32.index(stamp[1].upper())
        except ValueError:
            return None
        age = (self._today() - day) % PERIOD
        if age > self.max_age_days:
            return None
        expected = self._hash(stamp, domain, orig_local)
        if not hmac.compare_digest(given.upper().encode("utf-8"), expected.encode("ascii")):
            return None
        return f"{orig_local}@{domain}"
