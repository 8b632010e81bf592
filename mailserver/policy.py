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
* A corporate relay domain (``[domains] relay``) is checked exactly like a
  local one, from anyone; its mailboxes come back from the directory as
  *relayed* addresses, which the queue hands to the domain's internal host
  (:mod:`mailserver.delivery.relaydomains`).  LMTP, final delivery only,
  refuses them (``550 5.1.1``).
* Every other domain is a relay request, allowed only to clients in
  ``relay.trusted_networks`` (and, on submission, to authenticated users);
  everyone else gets ``554 5.7.1``.  LMTP only ever delivers locally, so it
  answers ``550 5.1.1``.  An accepted relay recipient has no resolution: the
  outbound queue routes it.
* Addresses that forward to external addresses are accepted; the queue
  carries the forwarded copies.
* With SRS on, ``SRS0=...@srs-domain`` addresses (bounces of forwarded mail)
  are accepted from anyone when their hash and age check out, and relayed to
  the original sender; forged or expired ones are ``550 5.1.1``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

from mailserver import reply as R
from mailserver.directory.interfaces import Resolution
from mailserver.errors import ReplyError
from mailserver.reply import Reply


@dataclass(frozen=True)
class RcptDecision:
    """The reply for a RCPT and, when accepted, where its mail goes."""

    reply: Reply
    resolution: Optional[Resolution] = None
    forward_to: Optional[str] = None  # an SRS address: relay to the original sender


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, lower-cased domain); the last ``@`` splits."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain.lower()


class Networks:
    """A set of IP networks (``relay.trusted_networks``)."""

    def __init__(self, networks: Iterable[str] = ()) -> None:
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def __contains__(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:  # "unix" and the like: a local peer
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)


class RecipientPolicy:
    """Decides RCPT for the MX and LMTP roles."""

    def __init__(self, directory, local_domains: Sequence[str], *, lmtp: bool = False,
                 catch_all: bool = False, trusted: Optional[Networks] = None,
                 srs=None, relay_domains: Sequence[str] = ()) -> None:
        self.directory = directory
        self.relay_domains = frozenset(d.lower().rstrip(".") for d in relay_domains)
        ours = list(local_domains) or list(relay_domains)
        self.primary_domain = ours[0].lower() if ours else ""
        self.lmtp = lmtp
        self.catch_all = catch_all
        self.trusted = trusted if trusted is not None else Networks()
        self.srs = srs

    def may_relay(self, client_ip: str, authenticated: bool) -> bool:
        return not self.lmtp and (authenticated or client_ip in self.trusted)

    def normalise(self, recipient: str) -> str:
        """Expand a bare ``postmaster`` to the primary domain's."""
        if recipient.lower() in ("postmaster", "postmaster@"):
            return f"postmaster@{self.primary_domain}"
        return recipient

    async def check_rcpt(self, recipient: str, sender: str = "", *, client_ip: str = "",
                         authenticated: bool = False) -> RcptDecision:
        """The decision for ``recipient`` in a transaction from ``sender``."""
        address = self.normalise(recipient)
        local, domain = split_address(address)
        relay_domain = domain in self.relay_domains and not self.lmtp
        try:
            if not relay_domain and (not domain
                                     or not await self.directory.is_local_domain(domain)):
                if domain and self.may_relay(client_ip, authenticated):
                    return RcptDecision(R.RCPT_OK)
                return RcptDecision(R.RCPT_UNKNOWN if self.lmtp else R.RELAY_DENIED)
            address = f"{local}@{domain}"
            if self.srs is not None and not self.lmtp and self.srs.is_srs(address):
                original = self.srs.reverse(address)
                if original is None:
                    return RcptDecision(R.RCPT_UNKNOWN)
                return RcptDecision(R.RCPT_OK, forward_to=original)
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
        return RcptDecision(R.RCPT_OK, resolution)
