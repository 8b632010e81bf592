# -*- test-case-name: tests.integration.test_directory_backends,tests.unit.test_directory_schema -*-
"""Bounded reads of entries, groups and memberships.

A :class:`Reader` wraps a search function with the limits every directory
walk shares: at most ``max_expansions`` reads, nesting followed no deeper
than ``max_depth``, each DN visited once, and a trace line whenever a limit
stops the walk.  On it sit the two group questions:

* :meth:`Reader.member_entries`: every entry below a group, nested groups
  included;
* :meth:`Reader.groups_of`: every group an entry is in, directly or through
  other groups.

Each has three ways to ask, chosen by settings and mapping:
``nested_groups = "in_chain"`` sends one search with Active Directory's
LDAP_MATCHING_RULE_IN_CHAIN (OID 1.2.840.113556.1.4.1941), which only AD
understands; otherwise the walk goes level by level, upwards through
``member_of_attribute`` (``memberOf``, kept by AD and by OpenLDAP's memberof
overlay) when the mapping names one, or by searching for groups whose
member attributes hold the DN, which works on any server.
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Tuple

from twisted.logger import Logger

from mailserver.directory.entries import (
    Entry,
    Search,
    clean_dn,
    dn_key,
    is_disabled,
    is_group,
    members,
)
from mailserver.directory.schema import SchemaMapping, any_of, render_filter

log = Logger()

#: Active Directory's transitive-membership matching rule.
IN_CHAIN = "1.2.840.113556.1.4.1941"


class Limits(Protocol):
    """The settings a walk reads (``LDAPSettings`` provides them)."""

    local_domains: Tuple[str, ...]
    max_depth: int
    max_expansions: int
    nested_groups: str


class Reader:
    """Directory reads on a budget, with a trace of what happened."""

    def __init__(self, search: Search, mapping: SchemaMapping, limits: Limits,
                 subject: str = "") -> None:
        self.search = search
        self.mapping = mapping
        self.settings = limits
        self.subject = subject
        self.trace: List[str] = []
        self.reads = 0
        self.exhausted = False

    @property
    def in_chain(self) -> bool:
        return getattr(self.settings, "nested_groups", "walk") == "in_chain"

    def budget(self, what: str) -> bool:
        """Count one directory read; False once ``max_expansions`` is spent."""
        if self.reads >= self.settings.max_expansions:
            if not self.exhausted:
                self.exhausted = True
                self.trace.append(f"expansion limit {self.settings.max_expansions} reached; "
                                  f"{what} and anything after it not expanded")
                log.warn("directory: expansion limit reached for {subject}",
                         subject=self.subject)
            return False
        self.reads += 1
        return True

    def read(self, dn: str, attributes: Optional[Tuple[str, ...]] = None) -> Optional[Entry]:
        """The entry at ``dn`` passing ``entry_filter``, or None.  The caller
        has counted the read against the budget."""
        found, _ = self.search(self.mapping.entry_filter, base=dn, base_scope=True,
                               attributes=attributes or self.mapping.requested_attributes)
        return found[0] if found else None

    # -- members of a group -------------------------------------------------

    def member_entries(self, group: Entry) -> List[Entry]:
        """Every non-group entry below ``group``, nested groups expanded,
        each once, disabled accounts left out."""
        if self.in_chain:
            chained = self._chain_members(group)
            if chained is not None:
                return [e for e in chained if not is_group(e, self.mapping)]
        found: List[Entry] = []
        seen = {dn_key(group.dn)}
        self._walk_members(group, 1, seen, found)
        return found

    def _walk_members(self, group: Entry, depth: int, seen: set, found: List[Entry]) -> None:
        if depth > self.settings.max_depth:
            self.trace.append(f"{group.dn}: members deeper than max_depth "
                              f"{self.settings.max_depth}, not followed")
            return
        for value in members(group, self.mapping):
            dn = clean_dn(value)
            if dn is None or dn.lower() in seen:
                continue
            seen.add(dn.lower())
            if not self.budget(dn):
                return
            entry = self.read(dn)
            if entry is None:
                continue
            if is_group(entry, self.mapping):
                self._walk_members(entry, depth + 1, seen, found)
            elif is_disabled(entry, self.mapping):
                self.trace.append(f"{entry.dn}: disabled account, left out")
            else:
                found.append(entry)

    def _chain_members(self, group: Entry) -> Optional[List[Entry]]:
        """All entries below ``group`` in one in-chain search, or None when
        the search found nothing although the group lists members: a server
        that does not know the matching rule (OpenLDAP, ldap3's mock)
        evaluates it as Undefined and answers nothing, and the caller then
        walks the group instead."""
        if not self.budget(group.dn):
            return []
        m = self.mapping
        member_of = m.member_of_attribute or "memberOf"
        search_filter = (f"(&{m.entry_filter}"
                         + render_filter(f"({member_of}:{IN_CHAIN}:={{dn}})", dn=group.dn) + ")")
        left = max(1, self.settings.max_expansions - self.reads)
        entries, truncated = self.search(search_filter, attributes=m.requested_attributes,
                                         size_limit=left)
        self.reads += len(entries)
        if not entries and members(group, m):
            self.trace.append(f"{group.dn}: the in-chain search found none of its members "
                              "(does the server support LDAP_MATCHING_RULE_IN_CHAIN?); "
                              "reading them one by one")
            log.warn("directory: in-chain search found no members of {group}; "
                     "nested_groups = \"in_chain\" needs Active Directory", group=group.dn)
            return None
        if truncated:
            self.trace.append(f"{group.dn}: more than {left} nested members, the rest not read")
        kept = []
        for entry in entries:
            if is_disabled(entry, m):
                self.trace.append(f"{entry.dn}: disabled account, left out")
            else:
                kept.append(entry)
        return kept

    # -- groups of an entry -------------------------------------------------

    def groups_of(self, entry: Entry) -> List[str]:
        """The DNs of every group that contains ``entry``, at any depth."""
        m = self.mapping
        if not m.group_classes or not m.member_attributes:
            return []
        if self.in_chain:
            return self._chain_groups(entry)
        found: List[str] = []
        seen = {dn_key(entry.dn)}
        level = [entry]
        for _depth in range(self.settings.max_depth):
            above: List[Entry] = []
            for item in level:
                for group in self._direct_groups(item):
                    key = dn_key(group.dn)
                    if key not in seen:
                        seen.add(key)
                        found.append(group.dn)
                        above.append(group)
            if not above:
                break
            level = above
        return found

    def _group_class_filter(self) -> str:
        return any_of(("objectClass",), self.mapping.group_classes)

    def _direct_groups(self, entry: Entry) -> List[Entry]:
        """The groups listing ``entry`` directly (as entries, so that the
        next level up can be read from them)."""
        m = self.mapping
        if m.member_of_attribute:
            groups = []
            for value in entry.values(m.member_of_attribute):
                dn = clean_dn(value)
                if dn is None or not self.budget(dn):
                    continue
                group = self.read(dn, attributes=("objectClass", m.member_of_attribute))
                if group is not None:
                    groups.append(group)
            return groups
        if not self.budget(f"groups of {entry.dn}"):
            return []
        groups, _ = self.search(
            f"(&{self._group_class_filter()}{any_of(m.member_attributes, [entry.dn])})",
            attributes=("objectClass",))
        return groups

    def _chain_groups(self, entry: Entry) -> List[str]:
        m = self.mapping
        if not self.budget(f"groups of {entry.dn}"):
            return []
        chained = "".join(render_filter(f"({name}:{IN_CHAIN}:={{dn}})", dn=entry.dn)
                          for name in m.member_attributes)
        if len(m.member_attributes) > 1:
            chained = f"(|{chained})"
        groups, _ = self.search(f"(&{self._group_class_filter()}{chained})",
                                attributes=("objectClass",))
        return [g.dn for g in groups]
