# -*- test-case-name: tests.unit.test_directory_ldif -*-
"""How directory entries map onto mail concepts, kept as data.

A :class:`SchemaMapping` says which LDAP filter finds the entries owning an
address, which filter finds an account by its login, and which attributes
hold addresses, routing targets, group members and login names.  Filters are
templates with ``{placeholders}``; :func:`render_filter` fills them with
values escaped by RFC 4515 rules, so no caller ever splices raw input into a
filter.

Presets are named mappings selected by ``LDAPSettings.schema``.  The
``openldap`` preset covers, at once, the conventions a plain OpenLDAP server
with the stock schemas can hold:

* users: ``inetOrgPerson`` with ``uid`` (login) and ``mail`` (primary address);
* extra addresses: ``mailLocalAddress`` (misc.schema ``inetLocalMailRecipient``)
  and ``mailAlternateAddress`` (qmail/Sun schemas);
* aliases and forwards: ``mailRoutingAddress`` (misc.schema),
  ``rfc822MailMember`` (misc.schema ``nisMailAlias``) and
  ``mailForwardingAddress`` (qmail/Sun);
* groups: ``groupOfNames`` (``member``) and ``groupOfUniqueNames``
  (``uniqueMember``), with an address in ``mail`` or ``mailLocalAddress``.

Naming an attribute that the server's schema lacks is harmless: OpenLDAP
evaluates such a filter component as Undefined and simply matches nothing
through it.  Active Directory (``proxyAddresses``, ``sAMAccountName``,
disabled accounts) gets its own preset in a later change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Dict, Tuple

from ldap3.utils.conv import escape_filter_chars

#: Placeholders a filter template may use.
ADDRESS_PLACEHOLDERS = ("address", "localpart", "domain")
LOGIN_PLACEHOLDERS = ("login",)

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


def check_template(name: str, template: str, allowed: Tuple[str, ...]) -> None:
    """Raise ValueError when ``template`` is empty, unbalanced or uses an
    unknown placeholder."""
    if not template:
        raise ValueError(f"{name} must not be empty")
    if not (template.startswith("(") and template.endswith(")")):
        raise ValueError(f"{name} must be a parenthesised LDAP filter: {template!r}")
    depth = 0
    for ch in template:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        raise ValueError(f"{name} has unbalanced parentheses: {template!r}")
    for found in _PLACEHOLDER.findall(template):
        if found not in allowed:
            choices = ", ".join("{%s}" % a for a in allowed) or "none"
            raise ValueError(f"{name} uses unknown placeholder {{{found}}} (allowed: {choices})")


@dataclass(frozen=True)
class SchemaMapping:
    """Filters and attribute names for one directory layout.

    ``address_filter`` finds every entry that owns an address; placeholders:
    ``{address}`` (the whole address, lower-cased), ``{localpart}`` and
    ``{domain}``.  ``login_filter`` finds the account for a login name;
    placeholder ``{login}``.  ``entry_filter`` is applied when a group
    member is read by its DN (a way to skip disabled entries).

    An entry whose object classes include one of ``group_classes`` is a
    group; its members are the DNs in ``member_attributes``.  An entry with
    values in ``target_attributes`` routes its mail to those addresses (an
    alias or a forward).  Otherwise an entry with a value in
    ``login_attribute`` is a mailbox whose address is the first value of
    ``mail_attribute``.  ``address_attributes`` are all the attributes that
    hold an entry's own addresses.
    """

    address_filter: str
    login_filter: str
    entry_filter: str
    mail_attribute: str
    address_attributes: Tuple[str, ...]
    login_attribute: str
    target_attributes: Tuple[str, ...]
    group_classes: Tuple[str, ...]
    member_attributes: Tuple[str, ...]

    def __post_init__(self) -> None:
        check_template("address_filter", self.address_filter, ADDRESS_PLACEHOLDERS)
        check_template("login_filter", self.login_filter, LOGIN_PLACEHOLDERS)
        check_template("entry_filter", self.entry_filter, ())
        if not self.mail_attribute or not self.login_attribute:
            raise ValueError("mail_attribute and login_attribute must not be empty")

    @property
    def requested_attributes(self) -> Tuple[str, ...]:
        """Every attribute a lookup reads, without duplicates."""
        names = ["objectClass", self.mail_attribute, self.login_attribute,
                 *self.address_attributes, *self.target_attributes, *self.member_attributes]
        seen: Dict[str, str] = {}
        for name in names:
            seen.setdefault(name.lower(), name)
        return tuple(seen.values())


OPENLDAP = SchemaMapping(
    address_filter=(
        "(|(mail={address})(mailLocalAddress={address})(mailAlternateAddress={address}))"
    ),
    login_filter="(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",
    entry_filter="(objectClass=*)",
    mail_attribute="mail",
    address_attributes=("mail", "mailLocalAddress", "mailAlternateAddress"),
    login_attribute="uid",
    target_attributes=("mailRoutingAddress", "rfc822MailMember", "mailForwardingAddress"),
    group_classes=("groupOfNames", "groupOfUniqueNames"),
    member_attributes=("member", "uniqueMember"),
)

PRESETS: Dict[str, SchemaMapping] = {"openldap": OPENLDAP}

#: Names of the mapping fields that settings may override one by one.
MAPPING_FIELDS = tuple(f.name for f in fields(SchemaMapping))


def render_filter(template: str, **values: str) -> str:
    """Fill ``{name}`` placeholders with RFC 4515-escaped values.

    Only placeholders named in ``values`` are replaced; braces anywhere else
    are left alone.  Every value goes through ``escape_filter_chars``, so
    ``*``, ``(``, ``)``, ``\\`` and NUL lose their filter meaning.
    """

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            return match.group(0)
        return escape_filter_chars(values[name])

    return _PLACEHOLDER.sub(fill, template)


def build_mapping(preset: str, **overrides) -> SchemaMapping:
    """The preset called ``preset`` with non-empty ``overrides`` applied.

    Empty strings and empty tuples mean "keep the preset's value", which is
    how settings express "not configured".
    """
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(
            f"unknown schema preset {preset!r} (known: {', '.join(sorted(PRESETS))})"
        ) from None
    unknown = set(overrides) - set(MAPPING_FIELDS)
    if unknown:
        raise ValueError(f"not schema mapping fields: {', '.join(sorted(unknown))}")
    chosen = {}
    for key, value in overrides.items():
        if value in ("", (), None):
            continue
        chosen[key] = tuple(value) if isinstance(value, list) else value
    return replace(base, **chosen) if chosen else base
