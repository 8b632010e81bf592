# -*- test-case-name: tests.unit.test_directory_schema -*-
"""Search results and what a mapping reads out of them.

:class:`Entry` is one search result.  The functions here interpret it
through a :class:`~mailserver.directory.schema.SchemaMapping`: its addresses
(``proxyAddresses``-style values included), whether it is a group or a
disabled account, and its restriction flags.  DN helpers normalise DNs for
comparison and for use as a search base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn

from mailserver.directory.schema import SchemaMapping

#: ``search(filter, *, base=None, base_scope=False, attributes=(), size_limit=0)``
#: -> (entries, truncated); see ``LDAPDirectory.search``.
Search = Callable[..., Tuple[List["Entry"], bool]]

_TRUE = frozenset({"true", "yes", "1"})


@dataclass
class Entry:
    """One search result: ``attributes`` keyed by lower-case name, values
    decoded as UTF-8 in the server's order."""

    dn: str
    attributes: Dict[str, List[str]]

    def values(self, name: str) -> List[str]:
        return self.attributes.get(name.lower(), []) if name else []

    def first(self, name: str) -> str:
        found = self.values(name)
        return found[0] if found else ""


def clean_dn(dn: str) -> Optional[str]:
    """``dn`` without spaces around its separators (ldap3 refuses those in a
    search base), or None when it is not a DN at all."""
    try:
        parts = parse_dn(dn, strip=True)
    except LDAPException:
        return None
    # Keep each separator: "+" joins the values of a multi-valued RDN.
    return "".join(f"{name.strip()}={value.strip()}{sep}" for name, value, sep in parts) or None


def dn_key(dn: str) -> str:
    """A comparable form of a DN: case and spacing dropped."""
    return (clean_dn(dn) or dn).lower()


def member_dn(value: str) -> str:
    """A member DN; ``uniqueMember`` may end in an ``#'0101'B`` unique id."""
    if value.endswith("'B") and "#'" in value:
        return value[: value.rindex("#'")]
    return value


def proxy_address(value: str) -> Tuple[str, bool]:
    """(address, primary) for an ``smtp:``/``SMTP:`` value; ("", False) for
    any other address type."""
    kind, sep, address = value.partition(":")
    if not sep or kind.lower() != "smtp" or not address.strip():
        return "", False
    return address.strip().lower(), kind == "SMTP"


def addresses(entry: Entry, m: SchemaMapping) -> List[str]:
    """Every address the entry owns, lower-case, without duplicates.

    The first is the primary: ``mail_attribute``, else the ``SMTP:`` proxy
    address, else the first address found.
    """
    proxies = {name.lower() for name in m.proxy_attributes}
    found: Dict[str, None] = {}
    primary = entry.first(m.mail_attribute).strip().lower()
    if m.mail_attribute.lower() in proxies:
        primary = ""
    for name in m.address_attributes:
        for value in entry.values(name):
            if name.lower() in proxies:
                address, is_primary = proxy_address(value)
                if is_primary and not primary:
                    primary = address
            else:
                address = value.strip().lower()
            if address:
                found.setdefault(address)
    if primary:
        return [primary, *(a for a in found if a != primary)]
    return list(found)


def first_address(entry: Entry, m: SchemaMapping) -> str:
    """The entry's primary address, or "" when it has none."""
    found = addresses(entry, m)
    return found[0] if found else ""


def targets(entry: Entry, m: SchemaMapping) -> List[str]:
    """The routing targets, lower-case (``smtp:`` prefixes removed from
    proxy-style attributes)."""
    proxies = {name.lower() for name in m.proxy_attributes}
    found: List[str] = []
    for name in m.target_attributes:
        for value in entry.values(name):
            target = proxy_address(value)[0] if name.lower() in proxies else value.strip().lower()
            if target:
                found.append(target)
    return found


def is_group(entry: Entry, m: SchemaMapping) -> bool:
    classes = {c.lower() for c in entry.values("objectClass")}
    return bool(classes & {c.lower() for c in m.group_classes})


def members(entry: Entry, m: SchemaMapping) -> List[str]:
    """The member values of a group, unique ids removed."""
    return [member_dn(v) for name in m.member_attributes for v in entry.values(name)]


def is_true(entry: Entry, name: str) -> bool:
    """A boolean attribute: TRUE (LDAP), or yes/1 in a custom schema."""
    return entry.first(name).strip().lower() in _TRUE if name else False


def is_disabled(entry: Entry, m: SchemaMapping) -> bool:
    """The account is switched off (``userAccountControl`` bit 2 in AD)."""
    if not m.disabled_attribute:
        return False
    value = entry.first(m.disabled_attribute).strip()
    if not value:
        return False
    if m.disabled_mask:
        try:
            return bool(int(value) & m.disabled_mask)
        except ValueError:
            return True  # unreadable: fail closed
    return value.lower() in _TRUE
