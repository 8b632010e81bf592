# -*- test-case-name: tests.unit.test_outbound -*-
"""Where and how the outbound client connects, and how long it waits.

Plain values for :mod:`mailserver.protocols.outbound` (no I/O, no Twisted):
:class:`Destination` (host or UNIX socket, TLS policy, credentials; also the
connection pool's key) and :class:`Timeouts` (per phase of the session).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from mailserver.sansio._client_events import Phase

TLS_MODES = ("none", "may", "encrypt", "verify", "dane")


@dataclass(frozen=True)
class Timeouts:
    """Client timeouts in seconds (RFC 5321 §4.5.3.2 where it names one)."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 300.0  # EHLO/HELO/LHLO, STARTTLS, the handshake, AUTH, RSET
    mail: float = 300.0
    rcpt: float = 300.0
    data_init: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    quit: float = 60.0  # QUIT's reply, and a close that cannot flush

    def for_phase(self, phase: Phase) -> Optional[float]:
        name = _PHASE_TIMEOUT.get(phase)
        return getattr(self, name) if name else None


_PHASE_TIMEOUT = {
    Phase.GREETING: "greeting", Phase.HELLO: "command", Phase.STARTTLS: "command",
    Phase.TLS: "command", Phase.AUTH: "command", Phase.RSET: "command", Phase.MAIL: "mail",
    Phase.RCPT: "rcpt", Phase.DATA: "data_init", Phase.CONTENT: "data_block",
    Phase.DOT: "data_end", Phase.QUIT: "quit", Phase.CLOSED: "quit",
}
PHASE_WORDS = {
    Phase.GREETING: "the greeting", Phase.HELLO: "the reply to EHLO",
    Phase.STARTTLS: "the reply to STARTTLS", Phase.TLS: "the TLS handshake",
    Phase.AUTH: "the reply to AUTH", Phase.RSET: "the reply to RSET",
    Phase.MAIL: "the reply to MAIL FROM", Phase.RCPT: "the reply to RCPT TO",
    Phase.DATA: "the reply to DATA", Phase.CONTENT: "the server to take the message",
    Phase.DOT: "the reply to the end of data",
}
"""What the client waits for in each phase, for timeout messages."""


@dataclass(frozen=True)
class Destination:
    """Where and how to connect; also the pool's key."""

    host: Optional[str]
    port: Optional[int]
    helo: str
    tls: str = "may"
    tls_hostname: Optional[str] = None
    trust_root: Any = None
    auth: Optional[Tuple[str, str]] = None
    lmtp: bool = False
    unix_path: Optional[str] = None
    allow_plaintext_auth: bool = False
    tlsa: tuple = ()  # DANE TLSA records, for tls = "dane"
    sts_testing: bool = False  # log a certificate MTA-STS enforce would refuse

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"TLS policy {self.tls!r}: use one of {', '.join(TLS_MODES)}")
        if self.unix_path is None and not self.host:
            raise ValueError("a host or a unix_path is needed")

    def key(self) -> tuple:
        try:
            hash(self.trust_root)
            trust: Any = self.trust_root
        except TypeError:
            trust = id(self.trust_root)
        return (self.host, self.port, self.unix_path, self.tls, self.tls_hostname, trust,
                self.auth, self.lmtp, self.helo, self.allow_plaintext_auth, self.tlsa,
                self.sts_testing)

    def describe(self, peer: Optional[str] = None) -> str:
        """``mx.example.org[192.0.2.1]:25``, ``unix:/path`` and the like."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        host = str(self.host)
        if ip_version(host) is not None:
            return f"{self.tls_hostname}[{host}]:{self.port}" if self.tls_hostname \
                else f"[{host}]:{self.port}"
        return f"{host}[{peer}]:{self.port}" if peer else f"{host}:{self.port}"


def ip_version(host: str) -> Optional[int]:
    """4 or 6 for an IP literal (brackets allowed), None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]")).version
    except ValueError:
        return None
