# -*- test-case-name: tests.integration.test_directory_backends -*-
"""The rules of address resolution, apart from how entries are fetched.

:class:`Expansion` resolves one address depth first:

* the entries owning the address are found with the mapping's
  ``address_filter``;
* a group entry expands to its members, read one by one by DN; nested groups
  expand in turn;
* an entry with routing targets (an alias, or a user whose mail goes
  elsewhere) resolves each target again; a target outside the local domains
  becomes a forward, and a target equal to one of the entry's own addresses
  keeps a copy in the entry's own mailbox;
* any other entry with a login is a mailbox; one without a login but with an
  external address (a contact) is a forward.

Each address and each DN is expanded once per resolution, which ends loops
and removes duplicates while keeping first-seen order.  Nesting deeper than
``max_depth`` is not followed, and at most ``max_expansions`` directory reads
are made; both leave a line in the trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Tuple

from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import parse_dn
from twisted.logger import Logger

from mailserver.directory.interfaces import Mailbox, Resolution
from mailserver.directory.schema import SchemaMapping, render_filter

log = Logger()


@dataclass
class Entry:
    """One search result: ``attributes`` keyed by lower-case name, values
    decoded as UTF-8 in the server's order."""

    dn: str
    attributes: Dict[str, List[str]]

    def values(self, name: str) -> List[str]:
        return self.attributes.get(name.lower(), [])

    def first(self, name: str) -> str:
        found = self.values(name)
        return found[0] if found else ""


class Limits(Protocol):
    """The settings an expansion reads (``LDAPSettings`` provides them)."""

    local_domains: Tuple[str, ...]
    max_depth: int
    max_expansions: int


#: ``search(filter, *, base=None, base_scope=False, attributes=(), size_limit=0)``
#: -> (entries, truncated); see ``LDAPDirectory.search``.
Search = Callable[..., Tuple[List[Entry], bool]]


def first_address(entry: Entry, m: SchemaMapping) -> str:
    for name in m.address_attributes:
        if entry.first(name):
            return entry.first(name)
    return ""


def clean_dn(dn: str) -> Optional[str]:
    """``dn`` without spaces around its separators (ldap3 refuses those in a
    search base), or None when it is not a DN at all."""
    try:
        parts = parse_dn(dn, strip=True)
    except LDAPException:
        return None
    return ",".join(f"{name.strip()}={value.strip()}" for name, value, _sep in parts) or None


def dn_key(dn: str) -> str:
    """A comparable form of a DN: case and spacing dropped."""
    return (clean_dn(dn) or dn).lower()


def _member_dn(value: str) -> str:
    """A member DN; ``uniqueMember`` may end in an ``#'0101'B`` unique id."""
    if value.endswith("'B") and "#'" in value:
        return value[: value.rindex("#'")]
    return value


class Expansion:
    """The state of one resolution: what was seen, found, and why."""

    def __init__(self, address: str, search: Search, mapping: SchemaMapping,
                 limits: Limits) -> None:
        self.search = search
        self.mapping = mapping
        self.settings = limits
        self.address = address
        self.mailboxes: Dict[str, Mailbox] = {}
        self.forwards: Dict[str, None] = {}
        self.trace: List[str] = []
        self.seen_addresses: set = set()
        self.seen_dns: set = set()
        self.reads = 0
        self.exhausted = False

    def run(self) -> Resolution:
        if self.address:
            self.resolve_address(self.address, 0)
        return Resolution(address=self.address, mailboxes=tuple(self.mailboxes.values()),
                          forwards=tuple(self.forwards), trace=tuple(self.trace))

    def is_local(self, address: str) -> bool:
        local = self.settings.local_domains
        return not local or address.rpartition("@")[2].rstrip(".") in local

    def budget(self, what: str) -> bool:
        """Count one directory read; False once ``max_expansions`` is spent."""
        if self.reads >= self.settings.max_expansions:
            if not self.exhausted:
                self.exhausted = True
                self.trace.append(f"expansion limit {self.settings.max_expansions} reached; "
                                  f"{what} and anything after it not expanded")
                log.warn("directory: expansion limit reached resolving {address}",
                         address=self.address)
            return False
        self.reads += 1
        return True

    def resolve_address(self, address: str, depth: int) -> None:
        if address in self.seen_addresses:
            self.trace.append(f"{address}: already resolved (loop or duplicate), skipped")
            return
        self.seen_addresses.add(address)
        if depth > self.settings.max_depth:
            self.trace.append(f"{address}: deeper than max_depth {self.settings.max_depth}, "
                              "not followed")
            return
        if depth and not self.is_local(address):
            self.trace.append(f"{address}: outside the local domains, forwarded")
            self.forwards.setdefault(address)
            return
        if not self.budget(address):
            return
        localpart, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
        m = self.mapping
        entries, truncated = self.search(
            render_filter(m.address_filter, address=address, localpart=localpart, domain=domain),
            attributes=m.requested_attributes,
        )
        if truncated:
            self.trace.append(f"{address}: size limit hit, using the first {len(entries)} entries")
        if not entries:
            self.trace.append(f"{address}: no entry")
            return
        for entry in entries:
            self.trace.append(f"{address}: matches {entry.dn}")
            self.expand_entry(entry, depth)

    def expand_entry(self, entry: Entry, depth: int) -> None:
        key = dn_key(entry.dn)
        if key in self.seen_dns:
            self.trace.append(f"{entry.dn}: already expanded, skipped")
            return
        self.seen_dns.add(key)
        m = self.mapping
        classes = {c.lower() for c in entry.values("objectClass")}
        targets = [t.strip().lower() for name in m.target_attributes for t in entry.values(name)]
        login = entry.first(m.login_attribute)
        if classes & {c.lower() for c in m.group_classes}:
            self.expand_group(entry, depth)
            if targets:
                self.route(entry, targets, login, depth)
        elif targets:
            self.route(entry, targets, login, depth)
        elif login:
            self.add_mailbox(entry, login)
        else:
            mail = (entry.first(m.mail_attribute) or first_address(entry, m)).lower()
            if mail and not self.is_local(mail):
                self.trace.append(f"{entry.dn}: external contact {mail}, forwarded")
                self.forwards.setdefault(mail)
            else:
                self.trace.append(f"{entry.dn}: no login, members or targets: not a mailbox")

    def add_mailbox(self, entry: Entry, login: str) -> None:
        m = self.mapping
        address = (entry.first(m.mail_attribute) or first_address(entry, m)).lower()
        if not address:
            self.trace.append(f"{entry.dn}: user {login} has no address, skipped")
            return
        self.trace.append(f"{entry.dn}: mailbox {address} (login {login})")
        key = dn_key(entry.dn)
        self.mailboxes.setdefault(key, Mailbox(address=address, login=login, dn=entry.dn))

    def route(self, entry: Entry, targets: List[str], login: str, depth: int) -> None:
        own = {a.lower() for name in self.mapping.address_attributes for a in entry.values(name)}
        self.trace.append(f"{entry.dn}: routes to {', '.join(targets)}")
        for target in targets:
            if target in own and login:
                self.add_mailbox(entry, login)  # "forward, and keep a copy here"
            else:
                self.resolve_address(target, depth + 1)

    def expand_group(self, entry: Entry, depth: int) -> None:
        members = [_member_dn(v) for name in self.mapping.member_attributes
                   for v in entry.values(name)]
        self.trace.append(f"{entry.dn}: group with {len(members)} member(s)")
        if depth + 1 > self.settings.max_depth:
            self.trace.append(f"{entry.dn}: members deeper than max_depth "
                              f"{self.settings.max_depth}, not followed")
            return
        for value in members:
            dn = clean_dn(value)
            if dn is None:
                self.trace.append(f"{value!r}: not a valid DN, member skipped")
                continue
            if dn.lower() in self.seen_dns:
                self.trace.append(f"{dn}: already expanded, skipped")
                continue
            if not self.budget(dn):
                return
            found, _ = self.search(self.mapping.entry_filter, base=dn, base_scope=True,
                                   attributes=self.mapping.requested_attributes)
            if not found:
                self.trace.append(f"{dn}: member not found")
                continue
            self.expand_entry(found[0], depth + 1)
