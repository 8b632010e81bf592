"""What the rest of the server asks the directory.

The directory answers two questions: *where does mail for this address go?*
(:meth:`IDirectory.resolve`) and *is this password right for this login?*
(:meth:`IDirectory.authenticate`), plus two the policies need: *is this
domain ours?* (:meth:`IDirectory.is_local_domain`) and *which envelope
senders may this login use?* (:meth:`IDirectory.senders_for`).  All return
Deferreds and never block the reactor.  An outage raises
:class:`mailserver.errors.DirectoryUnavailable` (through the Deferred); "no
such address" is an empty :class:`Resolution`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Tuple

from zope.interface import Interface


@dataclass(frozen=True)
class Mailbox:
    """A local mailbox: ``address`` is the user's primary address (lower-case),
    ``login`` the account name (uid), ``dn`` the directory entry."""

    address: str
    login: str
    dn: str = ""


@dataclass(frozen=True)
class SenderRestriction:
    """Who may send to an address (a group, usually); all addresses lower-case.

    ``allowed_senders`` are listed explicitly (read from the entry, DNs
    turned into their owners' addresses, groups into their members').
    ``members_only`` admits the addressed group's own members, whose
    addresses are ``members``.  A sender must be in one of the two, unless
    ``any_sender`` says no list applies.  A list that resolved to nothing
    (its DNs are gone) admits nobody: restrictions fail closed.
    ``authenticated_only`` admits only senders who logged in (Exchange's
    ``msExchRequireAuthToSendTo``); it combines with the lists: both must
    agree.
    """

    allowed_senders: FrozenSet[str] = frozenset()
    members_only: bool = False
    members: FrozenSet[str] = frozenset()
    authenticated_only: bool = False
    any_sender: bool = False

    def allows(self, sender: str, *, authenticated: bool = False) -> bool:
        """True when ``sender`` may send here.

        ``authenticated`` says the session logged in (submission); on port 25
        it is False, so an ``authenticated_only`` address refuses everyone
        there, as Exchange does for anonymous senders.  The null sender
        (bounces) is never in a list, so a list-restricted address refuses it.
        """
        if self.authenticated_only and not authenticated:
            return False
        if self.any_sender:
            return True
        sender = sender.strip().lower()
        if sender in self.allowed_senders:
            return True
        return self.members_only and sender in self.members

    def merge(self, other: "SenderRestriction") -> "SenderRestriction":
        """Both restrictions at once, for an address owned by two entries."""
        return SenderRestriction(
            allowed_senders=self.allowed_senders | other.allowed_senders,
            members_only=self.members_only or other.members_only,
            members=self.members | other.members,
            authenticated_only=self.authenticated_only or other.authenticated_only,
            any_sender=self.any_sender and other.any_sender,
        )


@dataclass(frozen=True)
class Resolution:
    """What an address resolves to.

    ``mailboxes``: local mailboxes, de-duplicated, in a stable order.
    ``forwards``: external addresses mail must be relayed to.
    ``relayed``: mailboxes of corporate relay domains (``[domains] relay``),
    by their primary address: the queue hands them to the domain's internal
    host with the original sender; they never reach a maildir.
    ``disabled``: nothing was found because every account the address led
    to is disabled (the policy answers ``550 5.2.1``, not ``5.1.1``).
    ``restriction``: who may send to the address, when its entry says so;
    None means anyone.
    ``trace``: human-readable steps (what matched and why), for
    ``mailserverctl lookup``.
    """

    address: str
    mailboxes: Tuple[Mailbox, ...] = ()
    forwards: Tuple[str, ...] = ()
    disabled: bool = False
    restriction: Optional[SenderRestriction] = None
    trace: Tuple[str, ...] = field(default=(), compare=False)
    relayed: Tuple[str, ...] = ()

    @property
    def found(self) -> bool:
        return bool(self.mailboxes or self.forwards or self.relayed)

    def allows(self, sender: str, *, authenticated: bool = False) -> bool:
        """``restriction.allows(...)``, or True when there is no restriction."""
        if self.restriction is None:
            return True
        return self.restriction.allows(sender, authenticated=authenticated)


@dataclass(frozen=True)
class Account:
    """An authenticated login."""

    login: str
    address: str
    dn: str = ""


class IDirectory(Interface):
    """A user directory (LDAP, or the embedded LDIF-backed one)."""

    def resolve(address: str):
        """Resolve ``address`` (``local@domain``) to a :class:`Resolution`.

        Returns a Deferred.  Errbacks with ``DirectoryUnavailable`` when the
        directory cannot answer.
        """

    def authenticate(login: str, password: str):
        """Check a password; Deferred firing with an :class:`Account` or None.

        Empty passwords are refused without contacting the server, and so are
        disabled accounts (before any bind).  Errbacks with
        ``DirectoryUnavailable`` when the directory cannot answer.
        """

    def is_local_domain(domain: str):
        """Deferred firing with True when mail for ``domain`` is delivered here:
        the domain is in the configured local domains, or the directory's
        ``domain_filter`` finds an entry for it.  Errbacks with
        ``DirectoryUnavailable`` when the question needs the directory and it
        cannot answer.
        """

    def senders_for(login: str):
        """Deferred firing with the ``frozenset`` of envelope senders (lower-case
        addresses) the account named ``login`` may use: its own addresses, the
        aliases that route only to it, and the entries that delegate sending to
        it or to a group it belongs to.  Empty for an unknown, ambiguous or
        disabled login.  Errbacks with ``DirectoryUnavailable`` on an outage.
        """

    def close():
        """Release connections and threads."""
