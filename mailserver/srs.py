# -*- test-case-name: tests.unit.test_srs -*-
"""Sender Rewriting Scheme, for mail we forward to other domains.

When ``alice@example.org`` writes to ``fwd@ourdomain`` and we forward to
``bob@elsewhere.example``, the receiver checks SPF for ``example.org`` against
our address and fails.  With SRS the forwarded copy's envelope sender becomes
an address of ours that encodes the original::

    SRS0=HHHH=TT=example.org=alice@ourdomain

``HHHH`` is a keyed hash (HMAC-SHA256 of the timestamp, domain and local part,
base64, the first four characters) so nobody can make us relay by forging
such addresses; ``TT`` is the day number (modulo 1024, two base32
characters), so old addresses expire.  A bounce to that address is accepted
at RCPT time, checked, and sent on to the original sender.

This is the SRS0 form of Shevek's scheme as Postfix's postsrsd and Exim
implement it (case-insensitive hash check, ``=`` separators).  Rewriting an
address that is already SRS0 (a second forwarder) is not done: the address is
kept as it is, which still passes SPF for the first forwarder's domain only.
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
        mac = hmac.new(self.secret, f"{stamp}{domain}{local}".lower().encode("utf-8"),
                       hashlib.sha256).digest()
        return base64.b64encode(mac).decode("ascii")[:4]

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
        return f"SRS0={self._hash(stamp, domain, local)}={stamp}={domain}={local}@{self.domain}"

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
        if len(stamp) != 2 or not domain or not orig_local:
            return None
        try:
            day = _B32.index(stamp[0].upper()) * 32 + _B32.index(stamp[1].upper())
        except ValueError:
            return None
        age = (self._today() - day) % PERIOD
        if age > self.max_age_days:
            return None
        if not hmac.compare_digest(given.lower(),
                                   self._hash(stamp.upper(), domain, orig_local).lower()):
            return None
        return f"{orig_local}@{domain}"
