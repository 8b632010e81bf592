# -*- test-case-name: tests.unit.test_policy -*-
"""Who may send what to whom: the decisions behind MAIL and RCPT.

The rules for the MX and LMTP roles:

* A recipient is local only when its domain is, after lower-casing, exactly one
  of ``domains.local``.  Nothing else is local: not an IP literal, not a
  sub-domain, not a domain with a trailing dot (the address parser refuses
  those), and a source route was already dropped by the parser, so
  ``<@local:user@remote>`` is a remote recipient.
* Local recipients are resolved through the directory at RCPT time: unknown is
  ``550 5.1.1``; a directory that cannot answer is ``451 4.4.3``, never a 5xx.
  Local parts with ``%``, ``!`` or a quoted ``@`` are simply looked up as they
  are, so they can only ever reach a local mailbox, never another host.
* ``postmaster`` without a domain (RFC 5321 4.5.1) means the postmaster of the
  first local domain.
* Every other domain is a relay request.  Relaying needs the outbound queue,
  which does not exist yet, so it is refused for everyone with ``554 5.7.1``
  (LMTP: ``550 5.1.1``; LMTP only ever delivers locally).
* Forwarding to external addresses also needs the queue: such a recipient gets a
  temporary ``451 4.3.0`` so the sender retries, never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from twisted.internet import defer

from mailserver import reply as R
from mailserver.directory.interfaces import Resolution
from mailserver.errors import DirectoryUnavailable, ReplyError
from mailserver.reply import Reply


@dataclass(frozen=True)
class RcptDecision:
    """The reply for a RCPT and, when accepted, where its mail goes."""

    reply: Reply
    resolution: Optional[Resolution] = None


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, lower-cased domain); the last ``@`` splits."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


class RecipientPolicy:
    """Decides RCPT for the MX and LMTP roles."""

    def __init__(self, directory, local_domains: Sequence[str], *, lmtp: bool = False) -> None:
        self.directory = directory
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.primary_domain = local_domains[0].lower() if local_domains else ""
        self.lmtp = lmtp

    def is_local(self, domain: str) -> bool:
        return domain.lower() in self.local_domains

    def normalise(self, recipient: str) -> str:
        """Expand a bare ``postmaster`` to the primary domain's."""
        if recipient.lower() == "postmaster" or recipient.lower() == "postmaster@":
            return f"postmaster@{self.primary_domain}"
        return recipient

    async def check_rcpt(self, recipient: str) -> RcptDecision:
        address = self.normalise(recipient)
        local, domain = split_address(address)
        if not domain or not self.is_local(domain):
            return RcptDecision(R.RCPT_UNKNOWN if self.lmtp else R.RELAY_DENIED)
        try:
            resolution = await defer.ensureDeferred(_resolve(self.directory, f"{local}@{domain}"))
        except DirectoryUnavailable as e:
            return RcptDecision(e.reply)
        except ReplyError as e:
            return RcptDecision(e.reply)
        if not resolution.found:
            return RcptDecision(R.RCPT_UNKNOWN)
        if resolution.forwards:
            return RcptDecision(R.FORWARD_UNAVAILABLE)
        return RcptDecision(R.RCPT_OK, resolution)


async def _resolve(directory, address: str) -> Resolution:
    return await directory.resolve(address)
