# -*- test-case-name: tests.integration.test_directory_backends,tests.integration.test_directory_ad -*-
"""Accounts: finding one by its login, and the senders it may use.

:func:`find_account` is the search half of search-then-bind: the mapping's
``login_filter`` (built from ``login_attributes``: uid, mail, UPN,
sAMAccountName...) must match exactly one entry.  The bind half belongs to
the connector.

:func:`senders_for` answers "which envelope senders may this login use" for
submission.  They are, all lower-case:

* the account's own addresses (``mail``, alternates, ``smtp:`` proxy
  addresses);
* the addresses of aliases that route to it and to nothing else (an alias
  shared with other people is a list, not an identity), followed through
  chains of such aliases up to ``max_depth``;
* the addresses of entries whose ``send_as_attributes`` name the account,
  or a group the account belongs to at any depth (``publicDelegates`` in
  Active Directory; none by default for OpenLDAP).

Disabled entries give nothing, and a disabled account has no senders.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional

from mailserver.directory.entries import (
    Entry,
    addresses,
    dn_key,
    is_disabled,
    is_group,
    targets,
)
from mailserver.directory.reader import Reader
from mailserver.directory.schema import any_of, render_filter


def find_account(reader: Reader, login: str) -> Optional[Entry]:
    """The one entry ``login`` names, or None (no entry, or several)."""
    m = reader.mapping
    entries, truncated = reader.search(render_filter(m.login_filter, login=login),
                                       size_limit=2, attributes=m.account_attributes)
    if truncated or len(entries) != 1:
        return None
    return entries[0]


def senders_for(reader: Reader, login: str) -> FrozenSet[str]:
    """The envelope senders ``login`` may use (see the module docstring)."""
    m = reader.mapping
    account = find_account(reader, login)
    if account is None or is_disabled(account, m):
        return frozenset()
    senders: Dict[str, None] = dict.fromkeys(addresses(account, m))
    if m.target_attributes:
        _add_aliases(reader, account, senders)
    if m.send_as_attributes:
        granted_to = [account.dn, *reader.groups_of(account)]
        found, _ = reader.search(any_of(m.send_as_attributes, granted_to),
                                 attributes=m.requested_attributes)
        for entry in found:
            if not is_disabled(entry, m):
                senders.update(dict.fromkeys(addresses(entry, m)))
    return frozenset(senders)


def _add_aliases(reader: Reader, account: Entry, senders: Dict[str, None]) -> None:
    m = reader.mapping
    own = dn_key(account.dn)
    frontier: List[str] = list(senders)
    for _depth in range(reader.settings.max_depth):
        if not frontier or not reader.budget("aliases"):
            return
        found, _ = reader.search(any_of(m.target_attributes, frontier),
                                 attributes=m.requested_attributes)
        frontier = []
        for alias in found:
            if dn_key(alias.dn) == own or is_group(alias, m) or is_disabled(alias, m):
                continue
            routes = targets(alias, m)
            if routes and all(route in senders for route in routes):
                for address in addresses(alias, m):
                    if address not in senders:
                        senders[address] = None
                        frontier.append(address)
