# -*- test-case-name: tests.unit.test_pipeline -*-
"""What the acceptance pipeline knows about a connection and a message.

:class:`Session` lives as long as the connection (who the client is, its
HELO, TLS, its login); :class:`Transaction` as long as one message (sender,
accepted recipients, the content file, header lines to add).  Both are plain
data: the listener adapters fill in what they see on the wire, the pipeline
and its checks read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class Session:
    """One client connection to a listener."""

    listener: str  # the listener's name, for logs
    kind: str  # "smtp", "submission" or "lmtp"
    hostname: str  # ours
    client_ip: str  # "unix" for a UNIX-socket peer
    client_key: str  # what per-client limits count (an IPv4 address, an IPv6 /64)
    helo: str = ""
    esmtp: bool = False
    tls_version: Optional[str] = None
    tls_cipher: Optional[str] = None
    login: Optional[str] = None  # the directory's login after a successful AUTH
    address: Optional[str] = None  # that account's primary address
    senders: frozenset = frozenset()  # envelope senders the login may use

    @property
    def authenticated(self) -> bool:
        return self.login is not None

    @property
    def protocol(self) -> str:
        """The protocol name for the queue's records."""
        if self.kind == "lmtp":
            return "LMTP"
        return "ESMTP" if self.esmtp else "SMTP"

    def forget_tls_state(self) -> None:
        """After STARTTLS: HELO and login are forgotten (RFC 3207 4.2)."""
        self.helo = ""
        self.esmtp = False
        self.login = None
        self.address = None
        self.senders = frozenset()


@dataclass
class Transaction:
    """One mail transaction, from MAIL to the end of the data."""

    sender: str = ""  # "" for the null reverse-path
    params: dict = field(default_factory=dict)  # MAIL parameters
    smtputf8: bool = False
    body_8bit: bool = False
    targets: List[Any] = field(default_factory=list)  # delivery.recipients.Target, RCPT order
    rcpt_count: int = 0  # RCPT commands answered, accepted or not
    message: Any = None  # incoming.IncomingMessage while the content arrives
    scanner: Any = None  # received.HeaderScanner over the content's header
    headers: List[bytes] = field(default_factory=list)  # lines to add on top, in order
    line_open: bool = False  # the content so far does not end with a line end
    checks: dict = field(default_factory=dict)  # what a check keeps for this message, by name
    folder: str = ""  # Maildir++ folder for the local copies (a check's junk verdict)

    def add_header(self, name: str, value: str) -> None:
        """Add ``Name: value`` (already folded, no CR LF) above the content."""
        self.headers.append(f"{name}: {value}\r\n".encode("utf-8"))

    def discard(self) -> None:
        if self.message is not None:
            self.message.discard()
            self.message = None
