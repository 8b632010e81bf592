"""What the queue hands to a delivery target, and what it gets back.

The queue manager groups a message's pending recipients by destination and
calls a target (local maildir, remote SMTP by MX, a fixed SMTP/LMTP next hop)
with an :class:`OutboundMessage`.  The target answers one
:class:`~mailserver.reply.Reply` per recipient: 2xx delivered, 4xx try again
later, 5xx give up (bounce).  A target never raises for a delivery problem;
an exception escaping it counts as a temporary failure for every recipient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

from zope.interface import Interface

from mailserver.reply import Reply


@dataclass(frozen=True)
class OutboundRecipient:
    """A recipient with its RFC 3461 parameters."""

    address: str
    notify: Tuple[str, ...] = ()  # "NEVER" or any of "SUCCESS", "FAILURE", "DELAY"; () = not given
    orcpt: Optional[str] = None  # "rfc822;user@example.org" as received
    mailbox_only: bool = False  # a local mailbox's retry: its forwards are already queued


@dataclass(frozen=True)
class OutboundMessage:
    """One message to deliver to some of its recipients.

    ``content_path`` holds the message exactly as received over SMTP: CRLF
    line ends, not dot-stuffed, our Received header already on top.
    """

    queue_id: str
    sender: str  # "" for the null reverse-path (a bounce)
    recipients: Tuple[OutboundRecipient, ...]
    content_path: str
    size: int
    eight_bit: bool = False  # BODY=8BITMIME was given (or 8-bit bytes were seen)
    smtputf8: bool = False
    envid: Optional[str] = None  # RFC 3461 ENVID
    ret: Optional[str] = None  # "FULL" or "HDRS"
    arrival: Optional[float] = None  # when the queue took it (None: not from the queue)
    requiretls: bool = False  # RFC 8689 REQUIRETLS: only over verified TLS, to a server offering it


@dataclass(frozen=True)
class DeliveryReport:
    """Per-recipient results, plus where the attempt went (for logs and DSNs)."""

    replies: Dict[str, Reply]
    remote: str = ""  # "mx1.example.org[192.0.2.1]:25", "local", ...
    details: Dict[str, str] = field(default_factory=dict)  # rcpt -> remote's text, for DSNs
    remotes: Dict[str, str] = field(default_factory=dict)  # rcpt -> its own ``remote``, if not that
    # Local recipients whose forwards are durably queued, whatever their
    # reply: a retry delivers to their mailboxes only.
    forwarded: FrozenSet[str] = frozenset()


class IDeliveryTarget(Interface):
    """Somewhere the queue can send a message."""

    def deliver(message: OutboundMessage):
        """Deliver ``message`` to all of ``message.recipients``.

        Returns a Deferred (or is a coroutine function) firing with a
        :class:`DeliveryReport` that has a reply for every recipient.
        """
