"""What the rest of the server asks the directory.

The directory answers two questions: *where does mail for this address go?*
(:meth:`IDirectory.resolve`) and *is this password right for this login?*
(:meth:`IDirectory.authenticate`).  Both return Deferreds and never block the
reactor.  An outage raises :class:`mailserver.errors.DirectoryUnavailable`
(through the Deferred); "no such address" is an empty :class:`Resolution`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from zope.interface import Interface


@dataclass(frozen=True)
class Mailbox:
    """A local mailbox: ``address`` is the user's primary address (lower-case),
    ``login`` the account name (uid), ``dn`` the directory entry."""

    address: str
    login: str
    dn: str = ""


@dataclass(frozen=True)
class Resolution:
    """What an address resolves to.

    ``mailboxes``: local mailboxes, de-duplicated, in a stable order.
    ``forwards``: external addresses mail must be relayed to.
    ``trace``: human-readable steps (what matched and why), for
    ``mailserverctl lookup``.
    """

    address: str
    mailboxes: Tuple[Mailbox, ...] = ()
    forwards: Tuple[str, ...] = ()
    trace: Tuple[str, ...] = field(default=(), compare=False)

    @property
    def found(self) -> bool:
        return bool(self.mailboxes or self.forwards)


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

        Empty passwords are refused without contacting the server.  Errbacks
        with ``DirectoryUnavailable`` when the directory cannot answer.
        """

    def close():
        """Release connections and threads."""
