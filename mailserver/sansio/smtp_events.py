"""Events produced by :class:`mailserver.sansio.smtp_server.SMTPServerConnection`.

Two kinds of events:

* **Decisions** (``NEEDS_REPLY = True``): the core stops reading input until the
  application calls ``conn.send(reply)``.  ``DataEnd`` in LMTP mode needs one
  ``send`` per accepted recipient, in RCPT order.
* **Notices** (``NEEDS_REPLY = False``): the core already answered (or no answer
  is due); the application only reacts (open/close a spool file, log, close
  the transport).

Every event is a frozen value.  No Twisted imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

from mailserver.address import Address
from mailserver.reply import Reply
from mailserver.sasl import Credentials


class Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = Sentinel("NEED_DATA")
"""``next_event()``: the buffer holds no complete command or data yet."""

PAUSED = Sentinel("PAUSED")
"""``next_event()``: a decision is pending; call ``send(reply)`` first."""


@dataclass(frozen=True)
class Event:
    NEEDS_REPLY = False


@dataclass(frozen=True)
class Hello(Event):
    """HELO, EHLO or LHLO was accepted; the core already replied."""

    verb: str
    domain: str


@dataclass(frozen=True)
class StartTLS(Event):
    """STARTTLS: reply ``READY_TLS`` then start TLS and call ``tls_started()``,
    or reply ``TLS_UNAVAILABLE``.  Buffered plaintext after the command has
    already been discarded."""

    NEEDS_REPLY = True


@dataclass(frozen=True)
class MailFrom(Event):
    """MAIL FROM: ``sender`` is ``""`` for the null reverse-path ``<>``.
    ``address`` is the parsed path (``None`` for ``<>``)."""

    NEEDS_REPLY = True
    sender: str
    params: Mapping[str, Optional[str]] = field(default_factory=dict)
    size: Optional[int] = None
    body: Optional[str] = None
    smtputf8: bool = False
    address: Optional[Address] = None


@dataclass(frozen=True)
class RcptTo(Event):
    """RCPT TO: a positive reply adds ``recipient`` to the transaction.
    ``address`` is the parsed path (``Address("postmaster", "")`` for
    ``<postmaster>``)."""

    NEEDS_REPLY = True
    recipient: str
    params: Mapping[str, Optional[str]] = field(default_factory=dict)
    address: Optional[Address] = None


@dataclass(frozen=True)
class DataStart(Event):
    """DATA was accepted (the core sent 354) or the first BDAT chunk began."""

    kind: str  # "DATA" or "BDAT"


@dataclass(frozen=True)
class DataChunk(Event):
    """Message content: dot-unstuffed, CRLF line endings, checked for size."""

    data: bytes


@dataclass(frozen=True)
class DataEnd(Event):
    """The end of data (CRLF.CRLF, or BDAT ... LAST).  SMTP: one reply.
    LMTP: one reply per accepted recipient, in RCPT order."""

    NEEDS_REPLY = True
    size: int = 0
    eight_bit: bool = False  # the content holds octets above 127, BODY= or not


@dataclass(frozen=True)
class DataAborted(Event):
    """The core refused the content and already sent ``reply``; discard it."""

    reply: Reply


@dataclass(frozen=True)
class Etrn(Event):
    """ETRN (RFC 1985): ``node`` is ``domain``, ``@domain`` or ``#queue``."""

    NEEDS_REPLY = True
    node: str


@dataclass(frozen=True, repr=False)
class Authenticate(Event):
    """AUTH (RFC 4954): the client completed a SASL exchange with ``credentials``.

    Check them and answer ``conn.send(AUTH_OK, identity=login)``, naming the
    identity the session is now authenticated as (the directory's form of
    the login, say), or ``AUTH_FAILED`` (535) or ``AUTH_TEMPORARY`` (454).
    The repr never shows the password.
    """

    NEEDS_REPLY = True
    credentials: Credentials

    def __repr__(self) -> str:
        c = self.credentials
        return f"Authenticate(mechanism={c.mechanism!r}, login={c.login!r}, authzid={c.authzid!r})"


AUTH_TOO_LONG = "too-long"
"""``AuthFailed.reason`` for a response line over ``sasl.MAX_RESPONSE``."""


@dataclass(frozen=True)
class AuthFailed(Event):
    """The core ended an AUTH exchange itself and already replied (for logging
    and failed-login counting).  ``mechanism`` is the canonical name (one of
    ``sasl.MECHANISMS``); ``reason`` is ``sasl.CANCELLED``, ``sasl.MALFORMED``,
    ``sasl.AUTHZID`` or :data:`AUTH_TOO_LONG`.  No client data is carried."""

    mechanism: str
    reason: str


@dataclass(frozen=True)
class Reset(Event):
    """The transaction was reset (RSET, EHLO/HELO, or after the end of data)."""


@dataclass(frozen=True)
class Quit(Event):
    """QUIT: the core queued 221; flush ``data_to_send()`` and close."""


@dataclass(frozen=True)
class Closing(Event):
    """The core queued a 421 (error limit, protocol abuse); flush and close."""

    reply: Reply


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed the connection (``receive_data(b"")``)."""
