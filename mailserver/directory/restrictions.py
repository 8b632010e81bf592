# -*- test-case-name: tests.integration.test_directory_backends -*-
"""Who may send to an address: reading a :class:`SenderRestriction`.

An entry restricts its senders through the mapping's attributes:

* ``allowed_sender_attributes``: each value is a DN or a plain address.  A
  DN naming a user admits that user's addresses; a DN naming a group admits
  its members at any depth; a DN naming the entry itself admits its own
  members (that is how Exchange says "members only" in
  ``dLMemSubmitPerms``).  A DN that no longer exists admits nobody.
* ``members_only_attribute`` (boolean): only the group's members.
* ``authenticated_only_attribute`` (boolean): only senders who logged in.

The members of the addressed group are the addresses of every mailbox and
forward its resolution reached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Set

from mailserver.directory.entries import (
    Entry,
    addresses,
    clean_dn,
    dn_key,
    is_disabled,
    is_group,
    is_true,
)
from mailserver.directory.interfaces import SenderRestriction

if TYPE_CHECKING:
    from mailserver.directory.resolution import Expansion


def read_restriction(expansion: "Expansion", entry: Entry) -> Optional[SenderRestriction]:
    """The restriction ``entry`` carries, or None when it admits anyone."""
    m = expansion.mapping
    members_only = is_true(entry, m.members_only_attribute)
    authenticated_only = is_true(entry, m.authenticated_only_attribute)
    listed = False
    allowed: Set[str] = set()
    for name in m.allowed_sender_attributes:
        for value in entry.values(name):
            value = value.strip()
            if not value:
                continue
            listed = True
            if "@" in value and "=" not in value:
                allowed.add(value.lower())
                continue
            dn = clean_dn(value)
            if dn is None:
                expansion.trace.append(f"{entry.dn}: {name} value {value!r} is not a DN, ignored")
            elif dn_key(dn) == dn_key(entry.dn):
                members_only = True
            else:
                allowed.update(_addresses_at(expansion, dn))
    if not (listed or members_only or authenticated_only):
        return None
    restriction = SenderRestriction(
        allowed_senders=frozenset(allowed),
        members_only=members_only,
        members=frozenset(expansion.member_addresses) if members_only else frozenset(),
        authenticated_only=authenticated_only,
        any_sender=not (listed or members_only),
    )
    expansion.trace.append(_describe(entry, restriction))
    return restriction


def _addresses_at(expansion: "Expansion", dn: str) -> Set[str]:
    """The addresses of the entry at ``dn``, or of every member when it is
    a group; disabled accounts count for nothing."""
    if not expansion.budget(dn):
        return set()
    entry = expansion.read(dn)
    if entry is None:
        expansion.trace.append(f"{dn}: allowed sender not found")
        return set()
    m = expansion.mapping
    if is_group(entry, m):
        found: Set[str] = set()
        for member in expansion.member_entries(entry):
            found.update(addresses(member, m))
        return found
    if is_disabled(entry, m):
        return set()
    return set(addresses(entry, m))


def _describe(entry: Entry, r: SenderRestriction) -> str:
    parts = []
    if r.authenticated_only:
        parts.append("authenticated senders only")
    if r.members_only:
        parts.append(f"members ({len(r.members)} addresses)")
    if not r.any_sender:
        parts.append(f"{len(r.allowed_senders)} listed sender address(es)")
    return f"{entry.dn}: restricted to " + ", ".join(parts)
