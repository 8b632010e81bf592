# -*- test-case-name: tests.unit.test_directory_schema -*-
"""The directory's settings: one frozen dataclass, validated when built.

The config's ``[directory]`` table maps onto :class:`LDAPSettings` field by
field (``backend`` and ``ldif_file`` choose the connector and stay in the
config); :mod:`mailserver.directory.factory` copies the same-named fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Tuple

from mailserver.directory.schema import (
    DOMAIN_PLACEHOLDERS,
    MAPPING_FIELDS,
    SchemaMapping,
    build_mapping,
    check_template,
)

#: Search scopes by name (ldap3's constants are strings too).
SCOPES = ("subtree", "one")
NESTED_GROUPS = ("walk", "in_chain")

_TUPLES = ("uris", "address_attributes", "target_attributes", "group_classes",
           "member_attributes", "login_attributes", "proxy_attributes",
           "allowed_sender_attributes", "send_as_attributes")


def _as_tuple(value) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


@dataclass(frozen=True)
class LDAPSettings:
    """Everything the directory needs.

    The mapping fields (``address_filter`` ... ``send_as_attributes``)
    override the preset named by ``schema`` one at a time: empty (or 0)
    means "the preset's", and ``"none"`` clears an optional one.
    """

    #: LDAP server URIs (``ldap://host:port``, ``ldaps://...``), tried in order.
    uris: Tuple[str, ...] = ()
    #: Search base for every lookup; the embedded backend defaults it to the
    #: first entry of the LDIF file.
    base_dn: str = ""
    #: PEM CA bundle that signs the servers' certificates, for ``ldaps://``
    #: and StartTLS; empty means the system's CAs.  Certificates (and the
    #: host name in them) are always verified.
    tls_ca_file: str = ""
    #: PEM client certificate (and its key) presented to servers that ask.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Upgrade ``ldap://`` connections with StartTLS before any bind or
    #: search; a server that refuses is unavailable.  ``ldaps://`` URIs are
    #: TLS from the start and ignore this.
    starttls: bool = False
    #: Service account used for searches; empty means anonymous.
    bind_dn: str = ""
    bind_password: str = field(default="", repr=False)
    #: ``subtree`` or ``one`` (one level below ``base_dn``).
    scope: str = "subtree"
    #: Preset schema mapping: ``openldap`` or ``activedirectory``.
    schema: str = "openldap"
    address_filter: str = ""
    login_filter: str = ""
    entry_filter: str = ""
    mail_attribute: str = ""
    address_attributes: Tuple[str, ...] = ()
    login_attribute: str = ""
    target_attributes: Tuple[str, ...] = ()
    group_classes: Tuple[str, ...] = ()
    member_attributes: Tuple[str, ...] = ()
    account_filter: str = ""
    login_attributes: Tuple[str, ...] = ()
    proxy_attributes: Tuple[str, ...] = ()
    member_of_attribute: str = ""
    disabled_attribute: str = ""
    disabled_mask: int = 0
    allowed_sender_attributes: Tuple[str, ...] = ()
    members_only_attribute: str = ""
    authenticated_only_attribute: str = ""
    send_as_attributes: Tuple[str, ...] = ()
    #: How nested groups are expanded: ``walk`` reads level by level (any
    #: server); ``in_chain`` asks Active Directory for all levels at once
    #: with LDAP_MATCHING_RULE_IN_CHAIN, which other servers do not know.
    nested_groups: str = "walk"
    #: Filter finding an entry that makes ``{domain}`` local (for example
    #: ``(&(objectClass=domainRelatedObject)(associatedDomain={domain}))``);
    #: empty: the local domains come from the config only.
    domain_filter: str = ""
    #: Search base for ``domain_filter``; empty means ``base_dn``.
    domain_base_dn: str = ""
    #: Domains delivered here; routing targets elsewhere become forwards.
    #: Not part of ``[directory]``: the service copies ``[domains] local``.
    #: Empty (with no ``domain_filter``) means every domain counts as local.
    local_domains: Tuple[str, ...] = ()
    #: Corporate relay domains (``[domains] relay``): their addresses are
    #: resolved like local ones, but their mailboxes come back as
    #: ``Resolution.relayed``, never as maildirs.  Copied by the service too.
    relay_domains: Tuple[str, ...] = ()
    #: Seconds to open a TCP connection to one server.
    connect_timeout: float = 5.0
    #: Seconds to wait for one answer (socket receive and server time limit).
    operation_timeout: float = 10.0
    #: Threads, hence at most this many connections.
    pool_size: int = 4
    #: Alias/group nesting deeper than this is not followed.
    max_depth: int = 10
    #: Entries read while resolving one address, at most.
    max_expansions: int = 1000

    def __post_init__(self) -> None:
        for name in _TUPLES:
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        domains = tuple(d.lower().rstrip(".") for d in _as_tuple(self.local_domains))
        object.__setattr__(self, "local_domains", domains)
        relay = tuple(d.lower().rstrip(".") for d in _as_tuple(self.relay_domains))
        object.__setattr__(self, "relay_domains", relay)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if self.nested_groups not in NESTED_GROUPS:
            raise ValueError(f"nested_groups must be one of {', '.join(NESTED_GROUPS)}, "
                             f"not {self.nested_groups!r}")
        for name in ("connect_timeout", "operation_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("pool_size", "max_depth", "max_expansions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_cert_file is required when tls_key_file is set")
        if self.domain_filter:
            check_template("domain_filter", self.domain_filter, DOMAIN_PLACEHOLDERS)
        self.schema_mapping()  # raises ValueError on a bad preset or filter

    def schema_mapping(self) -> SchemaMapping:
        """The preset with this settings' overrides applied."""
        return build_mapping(self.schema, **{name: getattr(self, name) for name in MAPPING_FIELDS})
