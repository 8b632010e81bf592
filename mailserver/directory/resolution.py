# -*- test-case-name: tests.integration.test_directory_backends -*-
"""The rules of address resolution, apart from how entries are fetched.

:class:`Expansion` resolves one address depth first:

* the entries owning the address are found with the mapping's
  ``address_filter``;
* a disabled account (``disabled_attribute``) is skipped; when the address
  itself names one and nothing else is found, the resolution says
  ``disabled``;
* a group entry expands to its members, read one by one by DN (nested groups
  expand in turn), or, with ``nested_groups = "in_chain"``, all at once by
  Active Directory's transitive-membership matching rule;
* an entry with routing targets (an alias, or a user whose mail goes
  elsewhere) resolves each target again; a target outside the local domains
  becomes a forward, and a target equal to one of the entry's own addresses
  keeps a copy in the entry's own mailbox;
* any other entry with a login is a mailbox; one without a login but with an
  external address (a contact) is a forward.  A mailbox whose primary
  address is in a corporate relay domain (``relay_domains``) is *relayed*:
  its address goes to the domain's internal host, never to a maildir.
  Relay domains count as known domains, so targets in them are resolved,
  not forwarded.

A target address or member DN that has no entry (the account was deleted,
the alias was not updated) is left out, with a warning naming the alias or
group and the missing target, and a trace line; the other targets still
count.  When nothing is left at all, the resolution is empty: the address is
unknown (``550 5.1.1`` at RCPT), never accepted to be dropped.

Each address and each DN is expanded once per resolution, which ends loops
and removes duplicates while keeping first-seen order.  Nesting deeper than
``max_depth`` is not followed, and at most ``max_expansions`` directory reads
are made; both leave a line in the trace.

The entries the address itself matched may restrict who sends to it (see
:mod:`mailserver.directory.restrictions`); the restriction of a group
reached through another group or alias is not applied.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

from twisted.logger import Logger

from mailserver.directory.entries import (  # noqa: F401  (re-exported names)
    Entry,
    Search,
    addresses,
    clean_dn,
    dn_key,
    first_address,
    is_disabled,
    is_group,
    members,
    targets,
)
from mailserver.directory.interfaces import Mailbox, Resolution, SenderRestriction
from mailserver.directory.reader import Limits, Reader
from mailserver.directory.restrictions import read_restriction
from mailserver.directory.schema import SchemaMapping, render_filter
from mailserver.errors import DirectoryUnavailable

log = Logger()


class Expansion(Reader):
    """The state of one resolution: what was seen, found, and why.

    ``is_local(domain)`` says whether a domain is delivered here; by default
    it is "in ``local_domains``, or every domain when that is empty".
    """

    def __init__(self, address: str, search: Search, mapping: SchemaMapping,
                 limits: Limits, is_local: Optional[Callable[[str], bool]] = None) -> None:
        super().__init__(search, mapping, limits, subject=address)
        self.address = address
        self.mailboxes: Dict[str, Mailbox] = {}
        self.forwards: Dict[str, None] = {}
        self.relayed: Dict[str, None] = {}
        self.member_addresses: Dict[str, None] = {}
        self.seen_addresses: set = set()
        self.seen_dns: set = set()
        self.top_entries: List[Entry] = []
        self.disabled_seen = False
        self._domain_check = is_local
        self._domains: Dict[str, bool] = {}

    def run(self) -> Resolution:
        if self.address:
            self.resolve_address(self.address, 0)
        restriction: Optional[SenderRestriction] = None
        for entry in self.top_entries:
            found = read_restriction(self, entry)
            if found is not None:
                restriction = found if restriction is None else restriction.merge(found)
        found_anything = bool(self.mailboxes or self.forwards or self.relayed)
        return Resolution(address=self.address, mailboxes=tuple(self.mailboxes.values()),
                          forwards=tuple(self.forwards), relayed=tuple(self.relayed),
                          disabled=self.disabled_seen and not found_anything,
                          restriction=restriction, trace=tuple(self.trace))

    def is_local(self, address: str) -> bool:
        domain = address.rpartition("@")[2].rstrip(".").lower()
        if domain not in self._domains:
            relay = getattr(self.settings, "relay_domains", ())
            if domain in relay:
                self._domains[domain] = True
            elif self._domain_check is not None:
                self._domains[domain] = bool(self._domain_check(domain))
            else:
                local = self.settings.local_domains
                self._domains[domain] = not (local or relay) or domain in local
        return self._domains[domain]

    def resolve_address(self, address: str, depth: int) -> bool:
        """Resolve ``address`` into the results.  False when the directory
        has no entry for it (the caller says what pointed there); True
        otherwise, also when it was skipped (loop, duplicate, limits)."""
        if address in self.seen_addresses:
            self.trace.append(f"{address}: already resolved (loop or duplicate), skipped")
            return True
        self.seen_addresses.add(address)
        if depth > self.settings.max_depth:
            self.trace.append(f"{address}: deeper than max_depth {self.settings.max_depth}, "
                              "not followed")
            return True
        if depth and not self.is_local(address):
            self.trace.append(f"{address}: outside the local domains, forwarded")
            self.add_forward(address)
            return True
        if not self.budget(address):
            return True
        localpart, _, domain = address.rpartition("@") if "@" in address else (address, "", "")
        m = self.mapping
        entries, truncated = self.search(
            render_filter(m.address_filter, address=address, localpart=localpart, domain=domain),
            attributes=m.requested_attributes,
        )
        if truncated:
            # Some owners would silently miss the mail: temporary, as Postfix
            # treats a size limit, until the server's limit or data is fixed.
            log.error("directory: {address} matches more entries than the server returns "
                      "(its size limit); mail to it is deferred", address=address)
            raise DirectoryUnavailable(f"{address}: the search hit the server's size limit "
                                       f"after {len(entries)} entries")
        if not entries:
            self.trace.append(f"{address}: no entry")
            return False
        for entry in entries:
            self.trace.append(f"{address}: matches {entry.dn}")
            if depth == 0:
                self.top_entries.append(entry)
            self.expand_entry(entry, depth)
        return True

    def expand_entry(self, entry: Entry, depth: int) -> None:
        key = dn_key(entry.dn)
        if key in self.seen_dns:
            self.trace.append(f"{entry.dn}: already expanded, skipped")
            return
        self.seen_dns.add(key)
        m = self.mapping
        if is_disabled(entry, m):
            self.trace.append(f"{entry.dn}: disabled account, skipped")
            self.disabled_seen = self.disabled_seen or depth == 0
            return
        routes = targets(entry, m)
        login = entry.first(m.login_attribute)
        if is_group(entry, m):
            self.expand_group(entry, depth)
            if routes:
                self.route(entry, routes, login, depth)
        elif routes:
            self.route(entry, routes, login, depth)
        elif login:
            self.add_mailbox(entry, login)
        else:
            mail = first_address(entry, m)
            if mail and not self.is_local(mail):
                self.trace.append(f"{entry.dn}: external contact {mail}, forwarded")
                self.add_forward(mail)
            else:
                self.trace.append(f"{entry.dn}: no login, members or targets: not a mailbox")

    def add_forward(self, address: str) -> None:
        self.forwards.setdefault(address)
        self.member_addresses.setdefault(address)

    def add_mailbox(self, entry: Entry, login: str) -> None:
        owned = addresses(entry, self.mapping)
        if not owned:
            self.trace.append(f"{entry.dn}: user {login} has no address, skipped")
            return
        domain = owned[0].rpartition("@")[2]
        if domain in getattr(self.settings, "relay_domains", ()):
            self.trace.append(f"{entry.dn}: mailbox {owned[0]} (login {login}) in relay domain "
                              f"{domain}: relayed to its internal host")
            self.relayed.setdefault(owned[0])
        else:
            self.trace.append(f"{entry.dn}: mailbox {owned[0]} (login {login})")
            self.mailboxes.setdefault(dn_key(entry.dn),
                                      Mailbox(address=owned[0], login=login, dn=entry.dn))
        for address in owned:
            self.member_addresses.setdefault(address)

    def route(self, entry: Entry, routes: List[str], login: str, depth: int) -> None:
        owned = addresses(entry, self.mapping)
        own = set(owned)
        self.trace.append(f"{entry.dn}: routes to {', '.join(routes)}")
        for target in routes:
            if "@" not in target:
                target = self.qualify(entry, target, owned)
                if not target:
                    continue
            if target in own and login:
                self.add_mailbox(entry, login)  # "forward, and keep a copy here"
            elif not self.resolve_address(target, depth + 1):
                self.missing(entry, "alias", "target", target)

    def qualify(self, entry: Entry, name: str, owned: List[str]) -> str:
        """A bare target (``bob``, as in an aliases file) in the domain of the
        entry's own address, else of the first local domain; "" when there
        is none (never a forward to a domainless address)."""
        domains = [a.rpartition("@")[2] for a in owned] + list(self.settings.local_domains)
        if not domains or not name:
            self.trace.append(f"{entry.dn}: target {name!r} has no domain, skipped")
            return ""
        self.trace.append(f"{entry.dn}: target {name} taken as {name}@{domains[0]}")
        return f"{name}@{domains[0]}"

    def expand_group(self, entry: Entry, depth: int) -> None:
        if self.in_chain and self.expand_chain(entry, depth):
            return
        values = members(entry, self.mapping)
        self.trace.append(f"{entry.dn}: group with {len(values)} member(s)")
        if depth + 1 > self.settings.max_depth:
            self.trace.append(f"{entry.dn}: members deeper than max_depth "
                              f"{self.settings.max_depth}, not followed")
            return
        for value in values:
            dn = clean_dn(value)
            if dn is None:
                self.trace.append(f"{value!r}: not a valid DN, member skipped")
                continue
            if dn.lower() in self.seen_dns:
                self.trace.append(f"{dn}: already expanded, skipped")
                continue
            if not self.budget(dn):
                return
            found = self.read(dn)
            if found is None:
                self.missing(entry, "group", "member", dn)
                continue
            self.expand_entry(found, depth + 1)

    def missing(self, entry: Entry, kind: str, what: str, target: str) -> None:
        """``entry`` (an alias or a group) names ``target``, which has no
        entry: it is left out, and the administrator should hear of it."""
        self.trace.append(f"{entry.dn}: {what} {target} does not exist, left out")
        log.warn("directory: {kind} {name}: {what} {target} does not exist, left out "
                 "(lookup of {address})", kind=kind, name=first_address(entry, self.mapping)
                 or entry.dn, dn=entry.dn, what=what, target=target, address=self.address)

    def expand_chain(self, entry: Entry, depth: int) -> bool:
        """Every member at any depth from one in-chain search; the nested
        groups themselves are marked done, since their members are already
        in the answer.  False when the server did not understand the search
        and the group must be walked."""
        found = self._chain_members(entry)
        if found is None:
            return False
        self.trace.append(f"{entry.dn}: group with {len(found)} member(s) at any depth "
                          "(in-chain search)")
        nested = [e for e in found if is_group(e, self.mapping)]
        for group in nested:
            self.seen_dns.add(dn_key(group.dn))
        for member in found:
            if not is_group(member, self.mapping):
                self.expand_entry(member, depth + 1)
        return True
