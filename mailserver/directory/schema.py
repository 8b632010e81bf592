# -*- test-case-name: tests.unit.test_directory_schema -*-
"""How directory entries map onto mail concepts, kept as data.

A :class:`SchemaMapping` says which LDAP filter finds the entries owning an
address, which filter finds an account by its login, and which attributes
hold addresses, routing targets, group members, login names, the disabled
flag and sender restrictions.  Filters are templates with
``{placeholders}``; :func:`render_filter` fills them with values escaped by
RFC 4515 rules, so no caller ever splices raw input into a filter.

Presets are named mappings selected by ``LDAPSettings.schema``.

``openldap`` covers, at once, the conventions a plain OpenLDAP server with
the stock schemas can hold:

* users: ``inetOrgPerson`` with ``uid`` (login) and ``mail`` (primary address);
* extra addresses: ``mailLocalAddress`` (misc.schema ``inetLocalMailRecipient``)
  and ``mailAlternateAddress`` (qmail/Sun schemas);
* aliases and forwards: ``mailRoutingAddress`` (misc.schema),
  ``rfc822MailMember`` (misc.schema ``nisMailAlias``) and
  ``mailForwardingAddress`` (qmail/Sun);
* groups: ``groupOfNames`` (``member``) and ``groupOfUniqueNames``
  (``uniqueMember``), with an address in ``mail`` or ``mailLocalAddress``.

The stock schemas have no attribute for a disabled account, a sender
restriction or a send-as grant, so these are off in ``openldap`` until the
configuration names attributes for them.

``activedirectory`` follows Active Directory with Exchange attributes:

* users: ``(objectClass=user)`` without computers; logins are
  ``userPrincipalName`` or ``sAMAccountName`` (the latter names the mailbox);
* addresses: ``mail`` and ``proxyAddresses``, whose values carry a type
  prefix: ``SMTP:`` marks the primary address, ``smtp:`` the others, and
  other types (``X500:``, ``sip:``) are not mail addresses.  The address
  filter asks for ``proxyAddresses=smtp:{address}``; AD compares that
  attribute without regard to case, so it matches ``SMTP:`` values too;
* groups: ``objectClass=group`` with ``member`` DNs; ``memberOf`` answers
  "which groups is this entry in";
* disabled accounts: ``userAccountControl`` with bit 2 (ACCOUNTDISABLE) set;
* sender restrictions: ``authOrig`` (accept only from these DNs),
  ``dLMemSubmitPerms`` (accept only from members of these groups; a group
  that lists itself accepts only its members) and
  ``msExchRequireAuthToSendTo`` (refuse senders who did not log in);
* send-as grants: ``publicDelegates`` (Exchange's "send on behalf" list), the
  one delegation AD keeps as an attribute.  Exchange's Send-As right is an
  access-control entry in the security descriptor, not readable by a simple
  search, so it is not consulted.

Naming an attribute that the server's schema lacks is harmless inside an
``|`` filter: OpenLDAP evaluates that component as Undefined and the others
still match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Dict, Tuple

from ldap3.utils.conv import escape_filter_chars

#: Placeholders a filter template may use.
ADDRESS_PLACEHOLDERS = ("address", "localpart", "domain")
LOGIN_PLACEHOLDERS = ("login",)
DOMAIN_PLACEHOLDERS = ("domain",)

#: An override with this value switches a preset's optional feature off.
NONE = "none"

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_ATTRIBUTE_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)+)$")


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


def login_filter_for(account_filter: str, login_attributes: Tuple[str, ...]) -> str:
    """The login filter: an account (``account_filter``) whose value of any
    of ``login_attributes`` equals ``{login}``."""
    if not login_attributes:
        raise ValueError("login_attributes must name at least one attribute")
    choices = "".join(f"({name}={{login}})" for name in login_attributes)
    if len(login_attributes) > 1:
        choices = f"(|{choices})"
    return f"(&{account_filter}{choices})"


@dataclass(frozen=True)
class SchemaMapping:
    """Filters and attribute names for one directory layout.

    ``address_filter`` finds every entry that owns an address; placeholders:
    ``{address}`` (the whole address, lower-cased), ``{localpart}`` and
    ``{domain}``.  ``login_filter`` finds the account for a login name
    (placeholder ``{login}``); presets build it from ``account_filter`` and
    ``login_attributes``.  ``entry_filter`` is applied when a group member is
    read by its DN (a way to skip entries outright).

    An entry whose object classes include one of ``group_classes`` is a
    group; its members are the DNs in ``member_attributes``, and
    ``member_of_attribute`` (when set) lists the groups an entry is in.  An
    entry with values in ``target_attributes`` routes its mail to those
    addresses (an alias or a forward).  Otherwise an entry with a value in
    ``login_attribute`` is a mailbox whose address is the first value of
    ``mail_attribute``.  ``address_attributes`` are all the attributes that
    hold an entry's own addresses; those also in ``proxy_attributes`` hold
    ``type:address`` values of which only ``smtp:`` ones count.

    ``disabled_attribute`` marks a disabled account: an integer with any
    ``disabled_mask`` bit set, or, with a zero mask, the value ``TRUE``.

    ``allowed_sender_attributes`` list who may send to an entry (DNs of
    users or groups, or plain addresses); ``members_only_attribute`` (a
    boolean) admits only the group's members; ``authenticated_only_attribute``
    (a boolean) only senders who logged in.  ``send_as_attributes`` list the
    DNs (users or groups) allowed to use the entry's addresses as envelope
    sender.  An empty name or tuple switches the feature off.
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
    account_filter: str = "(objectClass=*)"
    login_attributes: Tuple[str, ...] = ()
    proxy_attributes: Tuple[str, ...] = ()
    member_of_attribute: str = ""
    disabled_attribute: str = ""
    disabled_mask: int = 0
    allowed_sender_attributes: Tuple[str, ...] = ()
    members_only_attribute: str = ""
    authenticated_only_attribute: str = ""
    send_as_attributes: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_template("address_filter", self.address_filter, ADDRESS_PLACEHOLDERS)
        check_template("login_filter", self.login_filter, LOGIN_PLACEHOLDERS)
        check_template("entry_filter", self.entry_filter, ())
        check_template("account_filter", self.account_filter, ())
        if not self.mail_attribute or not self.login_attribute:
            raise ValueError("mail_attribute and login_attribute must not be empty")
        if self.disabled_mask < 0:
            raise ValueError("disabled_mask must not be negative")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_attribute") or f.name.endswith("_attributes"):
                names = value if isinstance(value, tuple) else (value,) if value else ()
                for name in names:
                    if not _ATTRIBUTE_NAME.match(name):
                        raise ValueError(f"{f.name} holds an invalid attribute name {name!r}")

    @property
    def requested_attributes(self) -> Tuple[str, ...]:
        """Every attribute a lookup reads, without duplicates."""
        names = ["objectClass", self.mail_attribute, self.login_attribute,
                 *self.address_attributes, *self.target_attributes, *self.member_attributes,
                 self.disabled_attribute, *self.allowed_sender_attributes,
                 self.members_only_attribute, self.authenticated_only_attribute]
        return _unique(names)

    @property
    def account_attributes(self) -> Tuple[str, ...]:
        """The attributes read for an account (login, addresses, state)."""
        return _unique([self.login_attribute, self.mail_attribute, *self.address_attributes,
                        self.disabled_attribute, self.member_of_attribute])


def _unique(names) -> Tuple[str, ...]:
    seen: Dict[str, str] = {}
    for name in names:
        if name:
            seen.setdefault(name.lower(), name)
    return tuple(seen.values())


OPENLDAP = SchemaMapping(
    address_filter=(
        "(|(mail={address})(mailLocalAddress={address})(mailAlternateAddress={address}))"
    ),
    login_filter=login_filter_for("(objectClass=inetOrgPerson)", ("uid", "mail")),
    entry_filter="(objectClass=*)",
    mail_attribute="mail",
    address_attributes=("mail", "mailLocalAddress", "mailAlternateAddress"),
    login_attribute="uid",
    target_attributes=("mailRoutingAddress", "rfc822MailMember", "mailForwardingAddress"),
    group_classes=("groupOfNames", "groupOfUniqueNames"),
    member_attributes=("member", "uniqueMember"),
    account_filter="(objectClass=inetOrgPerson)",
    login_attributes=("uid", "mail"),
)

#: Users but not computers (a computer is a subclass of user in AD).
_AD_ACCOUNTS = "(&(objectClass=user)(!(objectClass=computer)))"

ACTIVEDIRECTORY = SchemaMapping(
    address_filter="(|(mail={address})(proxyAddresses=smtp:{address}))",
    login_filter=login_filter_for(_AD_ACCOUNTS, ("userPrincipalName", "sAMAccountName")),
    entry_filter="(objectClass=*)",
    mail_attribute="mail",
    address_attributes=("mail", "proxyAddresses"),
    login_attribute="sAMAccountName",
    target_attributes=(),
    group_classes=("group",),
    member_attributes=("member",),
    account_filter=_AD_ACCOUNTS,
    login_attributes=("userPrincipalName", "sAMAccountName"),
    proxy_attributes=("proxyAddresses",),
    member_of_attribute="memberOf",
    disabled_attribute="userAccountControl",
    disabled_mask=2,
    allowed_sender_attributes=("authOrig", "dLMemSubmitPerms"),
    authenticated_only_attribute="msExchRequireAuthToSendTo",
    send_as_attributes=("publicDelegates",),
)

PRESETS: Dict[str, SchemaMapping] = {"openldap": OPENLDAP, "activedirectory": ACTIVEDIRECTORY}

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


def any_of(attributes, values) -> str:
    """``(|(a=v1)(a=v2)(b=v1)...)`` over every attribute and value, escaped;
    a single pair needs no ``|``."""
    parts = [f"({a}={escape_filter_chars(v)})" for a in attributes for v in values]
    if len(parts) == 1:
        return parts[0]
    return "(|" + "".join(parts) + ")"


def _is_unset(value) -> bool:
    return value in ("", (), None, 0) and value is not False


def _is_none(value) -> bool:
    if isinstance(value, str):
        return value.lower() == NONE
    if isinstance(value, tuple):
        return len(value) == 1 and isinstance(value[0], str) and value[0].lower() == NONE
    return False


def build_mapping(preset: str, **overrides) -> SchemaMapping:
    """The preset called ``preset`` with non-empty ``overrides`` applied.

    Empty strings, empty tuples and zero mean "keep the preset's value",
    which is how settings express "not configured"; the word ``none`` (or a
    list holding only it) clears an optional attribute the preset sets.  When
    ``login_attributes`` or ``account_filter`` is overridden and
    ``login_filter`` is not, the login filter is rebuilt from them.
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
        if isinstance(value, list):
            value = tuple(value)
        if _is_unset(value):
            continue
        if _is_none(value):
            value = "" if isinstance(getattr(base, key), str) else ()
        chosen[key] = value
    if not chosen:
        return base
    if "login_filter" not in chosen and {"login_attributes", "account_filter"} & set(chosen):
        chosen["login_filter"] = login_filter_for(
            chosen.get("account_filter", base.account_filter),
            chosen.get("login_attributes", base.login_attributes),
        )
    return replace(base, **chosen)
