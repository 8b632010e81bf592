# -*- test-case-name: tests.unit.test_smtp_client -*-
"""The outbound client's phases, events and result (values only).

Re-exported by :mod:`mailserver.sansio.smtp_client`, which documents them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from mailserver.reply import Reply


class Phase(enum.Enum):
    """What the client is waiting for."""

    GREETING = "greeting"
    HELLO = "hello"  # EHLO, LHLO or HELO sent
    STARTTLS = "starttls"
    TLS = "tls"  # the adapter is doing the handshake
    AUTH = "auth"
    RSET = "rset"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # DATA sent, waiting for 354
    CONTENT = "content"  # the adapter is sending the content
    DOT = "dot"  # the final "." sent, waiting for the reply (or replies)
    IDLE = "idle"  # between messages: next_message() or quit()
    QUIT = "quit"
    CLOSED = "closed"


@dataclass(frozen=True)
class ClientResult:
    """The outcome of one message on one connection.

    ``replies`` has a reply for every recipient of the message, by address.
    ``details`` holds, for recipients whose reply came from the remote, that
    reply as text ("550 5.1.1 ..."), for DSNs.  ``connection_error`` is the
    reply that answered every recipient at once (greeting, EHLO, TLS, AUTH,
    MAIL, DATA, a refusal of ours, a lost connection); ``None`` when the
    recipients were answered one by one.  ``retry_elsewhere`` says the
    trouble is with this host: the caller should try the next one for the
    recipients not answered positively.  ``reset_failed`` says the connection
    was being reused and failed at RSET: nothing was tried, try a fresh one.
    """

    replies: dict[str, Reply]
    details: dict[str, str] = field(default_factory=dict)
    connection_error: Optional[Reply] = None
    retry_elsewhere: bool = False
    reset_failed: bool = False


@dataclass(frozen=True)
class ClientEvent:
    """Base of the client's events."""


@dataclass(frozen=True)
class NeedTLS(ClientEvent):
    """Start the TLS handshake now, then call ``tls_started()``."""


@dataclass(frozen=True)
class SendContent(ClientEvent):
    """Stream the content with ``send_content()``, then ``end_content()``."""


@dataclass(frozen=True)
class MessageDone(ClientEvent):
    """The transaction is over."""

    result: ClientResult


@dataclass(frozen=True)
class Closed(ClientEvent):
    """Write what is queued and close the connection."""


class UsageError(RuntimeError):
    """The adapter called the client at the wrong time (a bug in the caller)."""
