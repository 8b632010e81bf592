# -*- test-case-name: tests.unit.test_pop3 -*-
"""Events and values of :class:`mailserver.sansio.pop3.POP3ServerConnection`.

Two kinds of events, as in :mod:`mailserver.sansio.smtp_events`:

* **Decisions** (``NEEDS_REPLY = True``): the core reads no further input
  until the application answers (``send_ok``, ``send_err``, ``logged_in``,
  or for ``Retrieve`` ``send_ok`` ... ``finish_retrieve``).
* **Notices** (``NEEDS_REPLY = False``): the core already answered, or no
  answer is due; the application reacts (log, close the transport).

Every event is a frozen value and no Twisted is imported.  The sentinels
``NEED_DATA`` and ``PAUSED`` are the SMTP core's own objects, so one
adapter loop can compare against either module's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mailserver.sasl import Credentials
from mailserver.sansio.smtp_events import NEED_DATA, PAUSED, Sentinel

__all__ = [
    "NEED_DATA", "PAUSED", "Sentinel", "MessageInfo", "Event", "StartTLS", "Authenticate",
    "Retrieve", "Update", "Quit", "Closing", "ConnectionClosed", "LoginFailed",
    "TOO_LONG", "TOO_MANY_ERRORS", "CLOSED_BY_APPLICATION",
]

_UID = re.compile("[\x21-\x7e]{1,70}")

TOO_LONG = "too-long"
"""``LoginFailed.reason`` for a SASL response line over ``sasl.MAX_RESPONSE``."""

TOO_MANY_ERRORS = "too-many-errors"
"""``Closing.reason``: the client went past ``max_errors``."""

TOO_MANY_JUNK_COMMANDS = "too-many-junk-commands"
"""``Closing.reason``: the client sent more than ``junk_limit`` NOOP, RSET
and CAPA commands (a session kept open for ever by a NOOP now and then)."""

CLOSED_BY_APPLICATION = "closed-by-application"
"""``Closing.reason``: the application answered with ``close=True`` or a
``LOGIN-DELAY`` code."""


@dataclass(frozen=True)
class MessageInfo:
    """One message of the login snapshot.

    ``size`` is the octet count as sent on the wire (CRLF line ends, before
    dot-stuffing); ``uid`` the UIDL string (RFC 1939 §7: 1 to 70 characters
    from 0x21 to 0x7E).
    """

    size: int
    uid: str

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 0:
            raise ValueError("MessageInfo.size must be a non-negative int")
        if not isinstance(self.uid, str) or not _UID.fullmatch(self.uid):
            raise ValueError("MessageInfo.uid must be 1-70 printable ASCII characters")


@dataclass(frozen=True)
class Event:
    NEEDS_REPLY = False


@dataclass(frozen=True)
class StartTLS(Event):
    """STLS (RFC 2595): ``send_ok()`` then start TLS and call ``tls_started()``,
    or ``send_err(...)`` to stay in plaintext.  Bytes pipelined after the
    command have already been discarded."""

    NEEDS_REPLY = True


@dataclass(frozen=True, repr=False)
class Authenticate(Event):
    """USER+PASS (``credentials.mechanism == "USER"``) or a completed AUTH
    exchange (``"PLAIN"``, ``"LOGIN"``).  Answer ``logged_in(messages,
    identity=...)`` or ``send_err(text, code="AUTH" | "SYS/TEMP" | "IN-USE" |
    "LOGIN-DELAY")``.  The repr never shows the password."""

    NEEDS_REPLY = True
    credentials: Credentials

    def __repr__(self) -> str:
        c = self.credentials
        return f"Authenticate(mechanism={c.mechanism!r}, login={c.login!r}, authzid={c.authzid!r})"


@dataclass(frozen=True)
class Retrieve(Event):
    """RETR (``lines is None``) or TOP (``lines`` body lines) of a valid,
    undeleted message: ``number`` is the client's 1-based number, ``index``
    the 0-based position in the snapshot, ``info`` its entry.  Answer
    ``send_ok()``, stream the stored message through ``stuff()``, then call
    ``finish_retrieve()``; or ``send_err(...)``."""

    NEEDS_REPLY = True
    number: int
    index: int
    info: MessageInfo
    lines: Optional[int] = None


@dataclass(frozen=True)
class Update(Event):
    """QUIT in TRANSACTION (RFC 1939 UPDATE state): remove the messages at
    the 0-based ``deleted`` indexes, and mark the ``retrieved`` ones (RETR
    completed) as seen.  Answer ``send_ok()`` or ``send_err(...,
    code="SYS/TEMP")``; either way a ``Quit`` follows and the session ends."""

    NEEDS_REPLY = True
    deleted: tuple[int, ...]
    retrieved: tuple[int, ...] = ()


@dataclass(frozen=True)
class Quit(Event):
    """The session ended at the client's request (QUIT, after ``Update`` in
    TRANSACTION): flush ``data_to_send()`` and close."""


@dataclass(frozen=True)
class Closing(Event):
    """The core ended the session (``reason``: :data:`TOO_MANY_ERRORS` or
    :data:`CLOSED_BY_APPLICATION`); its last response is queued.  Flush and close."""

    reason: str


@dataclass(frozen=True)
class ConnectionClosed(Event):
    """The peer closed the connection (``receive_data(b"")``).  Nothing is
    deleted: a dropped session never reaches UPDATE."""


@dataclass(frozen=True)
class LoginFailed(Event):
    """The core ended a login attempt itself and already answered -ERR (for
    logging and failure counting).  ``mechanism`` is ``"USER"``, ``"PLAIN"``
    or ``"LOGIN"``; ``reason`` is ``sasl.CANCELLED``, ``sasl.MALFORMED``,
    ``sasl.AUTHZID`` or :data:`TOO_LONG`.  No client data is carried."""

    mechanism: str
    reason: str
