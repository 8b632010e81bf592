# -*- test-case-name: tests.unit.test_policy -*-
"""Who may send what to whom: the decisions behind RCPT.

The rules for the MX and LMTP roles:

* A recipient is local only when its domain, lower-cased, is a local domain:
  one of ``domains.local``, or one the directory's ``domain_filter`` finds.
  Nothing else is local: not an IP literal, not a sub-domain, not a domain
  with a trailing dot (the address parser refuses those), and a source route
  was already dropped by the parser, so ``<@local:user@remote>`` is remote.
* Local recipients are resolved through the directory at RCPT time: unknown is
  ``550 5.1.1``; an account that exists but is disabled ``550 5.2.1``; a
  directory that cannot answer ``451 4.4.3``, never a 5xx.  Local parts with
  ``%``, ``!`` or a quoted ``@`` are looked up as they are, so they can only
  ever reach a local mailbox, never another host.
* With ``domains.catch_all``, an unknown address goes to the entry that owns
  ``@domain`` (the Postfix ``virtual_alias_maps`` convention), when one does.
* A restricted address (a group open only to its members or to listed
  senders) refuses other senders with ``550 5.7.1``; the null sender is never
  on a list, so bounces to such a group are refused too.
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

from mailserver import reply as R
from mailserver.directory.interfaces import Resolution
from mailserver.errors import ReplyError
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

    def __init__(self, directory, local_domains: Sequence[str], *, lmtp: bool = False,
                 catch_all: bool = False) -> None:
        self.directory = directory
        self.primary_domain = local_domains[0].lower() if local_domains else ""
        self.lmtp = lmtp
        self.catch_all = catch_all

    def normalise(self, recipient: str) -> str:
        """Expand a bare ``postmaster`` to the primary domain's."""
        if recipient.lower() in ("postmaster", "postmaster@"):
            return f"postmaster@{self.primary_domain}"
        return recipient

    async def check_rcpt(self, recipient: str, sender: str = "", *,
                         authenticated: bool = False) -> RcptDecision:
        """The decision for ``recipient`` in a transaction from ``sender``."""
        address = self.normalise(recipient)
        local, domain = split_address(address)
        try:
            if not domain or not await self.directory.is_local_domain(domain):
                return RcptDecision(R.RCPT_UNKNOWN if self.lmtp else R.RELAY_DENIED)
            address = f"{local}@{domain}"
            resolution = await self.directory.resolve(address)
            if not resolution.found and not resolution.disabled and self.catch_all:
                fallback = await self.directory.resolve(f"@{domain}")
                if fallback.found:
                    resolution = fallback
        except ReplyError as e:  # DirectoryUnavailable included: 451 4.4.3
            return RcptDecision(e.reply)
        if not resolution.found:
            return RcptDecision(R.MAILBOX_DISABLED if resolution.disabled else R.RCPT_UNKNOWN)
        if not resolution.allows(sender, authenticated=authenticated):
            return RcptDecision(R.SENDER_NOT_ALLOWED)
        if resolution.forwards:
            return RcptDecision(R.FORWARD_UNAVAILABLE)
        return RcptDecision(R.RCPT_OK, resolution)
