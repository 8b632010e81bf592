# -*- test-case-name: tests.unit.test_directory_ldif -*-
"""The embedded directory: an LDIF file served by ldap3's in-process server.

:func:`embedded_directory` loads an LDIF file into ldap3's MOCK_SYNC server
and returns an ordinary :class:`~mailserver.directory.ldap.LDAPDirectory`
whose connector opens MOCK connections instead of sockets.  Searches go
through ldap3's own filter parser and evaluator, so the quick start runs the
same filters and the same resolution code as production.

When the schema mapping names a ``member_of_attribute`` (``memberOf``) and
no entry in the file carries it, the loader computes it, as Active Directory
and OpenLDAP's memberof overlay do: each entry gets the DNs of the groups
(``group_classes``) that list it directly in a ``member_attributes`` value.

Two differences from a real server, both deliberate:

* There is no schema (``get_info=NONE``): ldap3's bundled OpenLDAP schema
  lacks misc.schema, and with it ldap3 would reject ``mailLocalAddress`` in a
  filter.  Without a schema, object classes are not expanded to their
  superclasses, so list every class an entry has (as slapd LDIFs do anyway).
* ldap3's mock bind compares ``userPassword`` case-insensitively.  The
  connector checks the password again, byte for byte, after the mock bind
  succeeds.  Only plaintext ``userPassword`` values are understood.

The LDIF reader is a small RFC 2849 subset written here rather than a
dependency: content records only (``changetype: add`` is accepted, other
change records are refused), comments, folded lines, ``::`` base64 values,
repeated attributes.  ``:<`` URL values are refused.  The ``ldif`` package on
PyPI parses more, but we need only this much and it adds nothing the loader
would use.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from typing import Dict, List, Optional, Set, Tuple

from ldap3 import MOCK_SYNC, NONE, Connection, Server

from mailserver.directory.connect import Connector
from mailserver.directory.ldap import LDAPDirectory, LDAPSettings
from mailserver.directory.entries import clean_dn, dn_key, member_dn
from mailserver.directory.schema import SchemaMapping

Record = Tuple[str, Dict[str, List[bytes]]]

_ATTRIBUTE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*)(?:;[A-Za-z0-9-]+)*$")


class LDIFError(ValueError):
    """The LDIF text is malformed; the message names the source and line."""

    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}:{line}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


def _logical_lines(text: str, source: str):
    """Yield (line number, unfolded line); "" marks a record boundary."""
    current: Optional[str] = None
    start = 0
    in_comment = False
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.startswith(" "):
            if in_comment:
                continue
            if current is None:
                raise LDIFError(source, number, "continuation line with nothing to continue")
            current += raw[1:]
            continue
        if current is not None:
            yield start, current
            current = None
        in_comment = raw.startswith("#")
        if in_comment:
            continue
        if not raw.strip():
            yield number, ""
            continue
        current, start = raw, number
    if current is not None:
        yield start, current


def _split(line: str, number: int, source: str) -> Tuple[str, bytes]:
    name, sep, rest = line.partition(":")
    if not sep:
        raise LDIFError(source, number, f"expected 'attribute: value', got {line[:40]!r}")
    name = name.strip()
    if rest.startswith(":"):
        try:
            return name, base64.b64decode(rest[1:].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise LDIFError(source, number, f"bad base64 value for {name}") from None
    if rest.startswith("<"):
        raise LDIFError(source, number, f"URL values are not supported ({name})")
    return name, rest.lstrip(" ").encode("utf-8")


def parse_ldif(text, source: str = "<ldif>") -> List[Record]:
    """Parse LDIF content records into ``[(dn, {attribute: [bytes, ...]})]``.

    Attribute names keep the spelling of their first occurrence; later
    occurrences in any case add values to it.  Raises :class:`LDIFError`.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LDIFError(source, 0, f"not UTF-8: {e}") from None
    records: List[Record] = []
    dns: set = set()
    lines: List[Tuple[int, str]] = []

    def finish() -> None:
        if lines:
            record = _record(lines, source)
            if record is not None:
                key = dn_key(record[0])
                if key in dns:
                    raise LDIFError(source, lines[0][0], f"duplicate entry {record[0]}")
                dns.add(key)
                records.append(record)
            lines.clear()

    for number, line in _logical_lines(text, source):
        if line:
            lines.append((number, line))
        else:
            finish()
    finish()
    return records


def _record(lines: List[Tuple[int, str]], source: str) -> Optional[Record]:
    first_number, first = lines[0]
    name, value = _split(first, first_number, source)
    if name.lower() == "version":
        if value != b"1":
            raise LDIFError(source, first_number, "only LDIF version 1 is supported")
        if len(lines) == 1:
            return None
        lines = lines[1:]
        first_number, first = lines[0]
        name, value = _split(first, first_number, source)
    if name.lower() != "dn":
        raise LDIFError(source, first_number, f"a record must start with dn:, not {name}:")
    dn = clean_dn(value.decode("utf-8"))
    if dn is None:
        raise LDIFError(source, first_number, f"invalid DN {value.decode(errors='replace')!r}")
    attributes: Dict[str, List[bytes]] = {}
    spelling: Dict[str, str] = {}
    for number, line in lines[1:]:
        name, value = _split(line, number, source)
        lower = name.lower()
        if lower == "changetype":
            if value.lower() != b"add":
                raise LDIFError(source, number, f"only content records are supported "
                                                f"(changetype {value.decode(errors='replace')})")
            continue
        if lower in ("control", "dn"):
            raise LDIFError(source, number, f"unexpected {name}: line")
        if not _ATTRIBUTE.match(name):
            raise LDIFError(source, number, f"invalid attribute name {name!r}")
        key = spelling.setdefault(lower, name)
        attributes.setdefault(key, []).append(value)
    if not attributes:
        raise LDIFError(source, first_number, f"entry {dn} has no attributes")
    return dn, attributes


def read_ldif(path: str) -> List[Record]:
    """Parse the LDIF file at ``path``."""
    with open(path, "rb") as f:
        return parse_ldif(f.read(), source=str(path))


class _EmbeddedConnection(Connection):
    """A MOCK_SYNC connection that searches from the stored spelling of a DN.

    ldap3's mock server echoes the search base back as the entry's DN, where
    a real server answers with the DN as stored; mapping the base first makes
    both report the same DN for a member written in another case or spacing.
    """

    def __init__(self, *args, stored_dns: Dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stored_dns = stored_dns

    def search(self, search_base, *args, **kwargs):
        return super().search(self._stored_dns.get(dn_key(search_base), search_base),
                              *args, **kwargs)


def with_member_of(records: List[Record], mapping: SchemaMapping) -> List[Record]:
    """``records`` with ``mapping.member_of_attribute`` filled in from the
    groups' member lists; unchanged when the mapping names no such attribute
    or any entry already has one."""
    attribute = mapping.member_of_attribute
    if not attribute:
        return records
    lower = attribute.lower()
    if any(name.lower() == lower for _dn, attrs in records for name in attrs):
        return records
    classes = {c.lower().encode() for c in mapping.group_classes}
    member_names = {a.lower() for a in mapping.member_attributes}
    groups_of: Dict[str, List[bytes]] = {}
    for dn, attrs in records:
        object_classes = {v.lower() for name, values in attrs.items()
                          if name.lower() == "objectclass" for v in values}
        if not object_classes & classes:
            continue
        for name, values in attrs.items():
            if name.lower() in member_names:
                for value in values:
                    member = member_dn(value.decode("utf-8", "replace"))
                    groups_of.setdefault(dn_key(member), []).append(dn.encode("utf-8"))
    result: List[Record] = []
    for dn, attrs in records:
        groups = groups_of.get(dn_key(dn))
        if groups:
            attrs = {**attrs, attribute: list(dict.fromkeys(groups))}
        result.append((dn, attrs))
    return result


class EmbeddedConnector(Connector):
    """Opens MOCK_SYNC connections on one shared in-process server.

    All connections made here see the same entries (ldap3 keeps them on the
    ``Server`` object); the directory only reads them.
    """

    def __init__(self, records: List[Record], settings: LDAPSettings) -> None:
        self._settings = settings
        self.server = Server("embedded", get_info=NONE)
        loader = Connection(self.server, client_strategy=MOCK_SYNC)
        records = with_member_of(records, settings.schema_mapping())
        self._passwords: Dict[str, List[bytes]] = {}
        self._stored_dns: Dict[str, str] = {}
        for dn, attributes in records:
            self._stored_dns[dn_key(dn)] = dn
            # ldap3 rewrites the dict it is given; hand it a copy.
            if not loader.strategy.add_entry(dn, {k: list(v) for k, v in attributes.items()}):
                raise LDIFError("<embedded>", 0, f"entry {dn} was refused")
            for name, values in attributes.items():
                if name.lower() == "userpassword":
                    self._passwords[dn_key(dn)] = list(values)

    def describe(self) -> str:
        return "embedded LDIF directory"

    def _connection(self, user: Optional[str], password: Optional[str]) -> Connection:
        return _EmbeddedConnection(self.server, user=user, password=password,
                                   client_strategy=MOCK_SYNC, raise_exceptions=False,
                                   read_only=True, stored_dns=self._stored_dns)

    def open(self, failed: Optional[Set[str]] = None) -> Connection:
        from mailserver.errors import DirectoryUnavailable

        s = self._settings
        conn = self._connection(s.bind_dn or None, s.bind_password or None)
        conn.open()
        if s.bind_dn and not conn.bind():
            raise DirectoryUnavailable(f"service bind as {s.bind_dn} refused")
        return conn

    def check_password(self, dn: str, password: str) -> bool:
        conn = self._connection(dn, password)
        try:
            if not conn.bind():
                return False
        finally:
            conn.unbind()
        stored = self._passwords.get(dn_key(dn), [])
        return password.encode("utf-8") in stored  # exact, unlike the mock bind


def embedded_directory(ldif_path: str, settings: Optional[LDAPSettings] = None, *,
                       reactor=None, threadpool=None) -> LDAPDirectory:
    """An :class:`LDAPDirectory` over the entries of ``ldif_path``.

    ``settings.uris`` is ignored.  An empty ``base_dn`` becomes the DN of the
    file's first entry.  ``nested_groups`` is always ``walk``: the mock server
    knows no matching rules, Active Directory's in-chain rule included.
    """
    records = read_ldif(ldif_path)
    if not records:
        raise LDIFError(str(ldif_path), 0, "no entries")
    settings = settings or LDAPSettings()
    if settings.nested_groups != "walk":
        # ldap3's mock knows no extensible matching rules.
        settings = dataclasses.replace(settings, nested_groups="walk")
    if not settings.base_dn:
        settings = dataclasses.replace(settings, base_dn=records[0][0])
    connector = EmbeddedConnector(records, settings)
    return LDAPDirectory(settings, reactor=reactor, threadpool=threadpool, connector=connector)
