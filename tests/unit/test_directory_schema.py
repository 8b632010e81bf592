"""Schema presets, entry interpretation, restrictions, settings, and the
in-chain group expansion (run on a scripted search: no server speaks it here)."""

from __future__ import annotations

import dataclasses

import pytest

from mailserver.directory.connect import Connector
from mailserver.directory.entries import (
    Entry,
    addresses,
    first_address,
    is_disabled,
    proxy_address,
    targets,
)
from mailserver.directory.interfaces import Resolution, SenderRestriction
from mailserver.directory.reader import IN_CHAIN, Reader
from mailserver.directory.resolution import Expansion
from mailserver.directory.schema import (
    ACTIVEDIRECTORY,
    MAPPING_FIELDS,
    OPENLDAP,
    build_mapping,
    render_filter,
)
from mailserver.directory.settings import LDAPSettings
from mailserver.errors import DirectoryUnavailable
from tests.support.directory import failure_of, result_of, sync_directory_kwargs


def entry(dn, **attributes):
    return Entry(dn, {k.lower(): list(v) if isinstance(v, (list, tuple)) else [v]
                      for k, v in attributes.items()})


# -- presets ----------------------------------------------------------------------

def test_activedirectory_filters():
    """The AD address filter asks mail and smtp: proxy addresses, escaped; the
    login filter takes UPN or sAMAccountName of users that are not computers."""
    m = ACTIVEDIRECTORY
    assert render_filter(m.address_filter, address="a*)(b@x.test") == (
        r"(|(mail=a\2a\29\28b@x.test)(proxyAddresses=smtp:a\2a\29\28b@x.test))")
    assert m.login_filter == ("(&(&(objectClass=user)(!(objectClass=computer)))"
                              "(|(userPrincipalName={login})(sAMAccountName={login})))")
    assert m.login_attribute == "sAMAccountName"
    assert (m.disabled_attribute, m.disabled_mask) == ("userAccountControl", 2)
    assert m.member_of_attribute == "memberOf"


def test_openldap_login_filter_unchanged():
    """The openldap login filter built from its parts is the documented one."""
    assert OPENLDAP.login_filter == "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"


def test_login_attributes_rebuild_the_filter():
    """Overriding login_attributes (or account_filter) rebuilds login_filter;
    an explicit login_filter wins."""
    m = build_mapping("activedirectory", login_attributes=["sAMAccountName", "mail"])
    assert m.login_filter.endswith("(|(sAMAccountName={login})(mail={login})))")
    m = build_mapping("openldap", login_attributes=("uid",), account_filter="(objectClass=person)")
    assert m.login_filter == "(&(objectClass=person)(uid={login}))"
    m = build_mapping("openldap", login_attributes=("uid",), login_filter="(cn={login})")
    assert m.login_filter == "(cn={login})"


def test_none_clears_optional_attributes():
    """"none" switches a preset's optional feature off; empty keeps it."""
    m = build_mapping("activedirectory", disabled_attribute="none",
                      allowed_sender_attributes=["none"], send_as_attributes=(),
                      member_of_attribute="NONE")
    assert m.disabled_attribute == "" and m.allowed_sender_attributes == ()
    assert m.send_as_attributes == ("publicDelegates",)
    assert m.member_of_attribute == ""


@pytest.mark.parametrize("overrides, problem", [
    ({"login_attributes": ["uid)(x=*"]}, "login_attributes holds an invalid attribute"),
    ({"mail_attribute": "mail;lang-en"}, "mail_attribute holds an invalid attribute"),
    ({"send_as_attributes": ["a b"]}, "send_as_attributes"),
    ({"disabled_mask": -1}, "disabled_mask"),
    ({"login_attributes": ["none"]}, "login_attributes must name"),
    ({"account_filter": "objectClass=user"}, "account_filter must be a parenthesised"),
])
def test_bad_mapping_overrides(overrides, problem):
    """Attribute names are checked, since they go into filters unescaped."""
    with pytest.raises(ValueError, match=problem):
        build_mapping("activedirectory", **overrides)


def test_every_mapping_field_is_a_setting():
    """LDAPSettings can override each mapping field, under the same name."""
    names = {f.name for f in dataclasses.fields(LDAPSettings)}
    assert set(MAPPING_FIELDS) <= names


@pytest.mark.parametrize("kwargs, key", [
    ({"nested_groups": "recursive"}, "nested_groups"),
    ({"domain_filter": "(associatedDomain={address})"}, "domain_filter"),
    ({"domain_filter": "associatedDomain={domain}"}, "domain_filter"),
    ({"tls_key_file": "/k.pem"}, "tls_cert_file"),
    ({"schema": "activedirectory", "login_attributes": ["bad name"]}, "login_attributes"),
])
def test_settings_errors_name_the_key(kwargs, key):
    """A settings error message starts with the key at fault (the config
    loader reports it under that key)."""
    with pytest.raises(ValueError) as caught:
        LDAPSettings(**kwargs)
    assert str(caught.value).split(" ", 1)[0] == key


def test_settings_accept_the_new_fields():
    s = LDAPSettings(schema="activedirectory", starttls=True, tls_cert_file="/c.pem",
                     nested_groups="in_chain", domain_filter="(associatedDomain={domain})",
                     login_attributes=["sAMAccountName"], disabled_mask=2)
    assert s.login_attributes == ("sAMAccountName",)
    assert s.schema_mapping().login_filter.endswith("(sAMAccountName={login}))")


# -- entries ------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("SMTP:Ann@Corp.Example", ("ann@corp.example", True)),
    ("smtp:ann@corp.example", ("ann@corp.example", False)),
    ("Smtp:ann@corp.example", ("ann@corp.example", False)),
    ("X500:/o=Corp/cn=ann", ("", False)),
    ("sip:ann@corp.example", ("", False)),
    ("smtp:", ("", False)),
    ("ann@corp.example", ("", False)),
])
def test_proxy_address(value, expected):
    assert proxy_address(value) == expected


def test_addresses_primary_first():
    """mail first; else the SMTP: value; duplicates and other types dropped."""
    m = ACTIVEDIRECTORY
    with_mail = entry("cn=a", mail="A@X.test",
                      proxyAddresses=["smtp:b@x.test", "SMTP:a@x.test", "X500:/o=x"])
    assert addresses(with_mail, m) == ["a@x.test", "b@x.test"]
    without = entry("cn=c", proxyAddresses=["smtp:c2@x.test", "SMTP:C@x.test"])
    assert addresses(without, m) == ["c@x.test", "c2@x.test"]
    assert first_address(entry("cn=d", proxyAddresses=["X500:/o=x"]), m) == ""


def test_targets_strip_proxy_prefixes():
    m = build_mapping("activedirectory", target_attributes=["targetAddress"],
                      proxy_attributes=["proxyAddresses", "targetAddress"])
    assert targets(entry("cn=p", targetAddress="SMTP:Pat@Partner.Example"), m) == [
        "pat@partner.example"]


@pytest.mark.parametrize("value, disabled", [
    ("512", False), ("514", True), ("66050", True), ("66048", False), ("2", True),
    ("", False), ("garbage", True),
])
def test_user_account_control(value, disabled):
    """Bit 2 of userAccountControl disables; an unreadable value fails closed."""
    attrs = {"userAccountControl": value} if value else {}
    assert is_disabled(entry("cn=u", **attrs), ACTIVEDIRECTORY) is disabled


@pytest.mark.parametrize("value, disabled", [("TRUE", True), ("true", True), ("FALSE", False)])
def test_boolean_disabled_attribute(value, disabled):
    """With a zero mask the disabled attribute is a boolean."""
    m = build_mapping("openldap", disabled_attribute="mailDisabled")
    assert is_disabled(entry("uid=u", mailDisabled=value), m) is disabled


# -- restrictions -----------------------------------------------------------------

def test_restriction_rules():
    listed = SenderRestriction(allowed_senders=frozenset({"a@x.test"}))
    assert listed.allows("A@X.test ") and not listed.allows("b@x.test") and not listed.allows("")
    members = SenderRestriction(members_only=True, members=frozenset({"m@x.test"}))
    assert members.allows("m@x.test") and not members.allows("a@x.test")
    nobody = SenderRestriction()
    assert not nobody.allows("a@x.test")
    auth = SenderRestriction(authenticated_only=True, any_sender=True)
    assert not auth.allows("a@x.test") and auth.allows("a@x.test", authenticated=True)
    both = SenderRestriction(allowed_senders=frozenset({"a@x.test"}), authenticated_only=True)
    assert not both.allows("a@x.test") and both.allows("a@x.test", authenticated=True)
    assert not both.allows("b@x.test", authenticated=True)
    merged = auth.merge(listed)
    assert not merged.any_sender and merged.allows("a@x.test", authenticated=True)
    assert not merged.allows("b@x.test", authenticated=True)
    assert Resolution("x@y").allows("anyone")


# -- in-chain expansion (Active Directory only) ----------------------------------

class ScriptedSearch:
    """Answers searches from a table of filter -> entries and records them."""

    def __init__(self, answers, entries=()):
        self.answers = answers
        self.by_dn = {e.dn.lower(): e for e in entries}
        self.calls = []

    def __call__(self, search_filter, *, base=None, base_scope=False, attributes=(),
                 size_limit=0):
        self.calls.append((search_filter, base, base_scope, size_limit))
        if base_scope:
            found = self.by_dn.get(base.lower())
            return ([found] if found else []), False
        found = self.answers.get(search_filter, [])
        if size_limit and len(found) > size_limit:
            return found[:size_limit], True
        return found, False


GROUP = entry("cn=All (*),dc=corp", objectClass=["top", "group"], mail="all@corp.test",
              member=["cn=Ann,dc=corp", "cn=Inner,dc=corp"])
INNER = entry("cn=Inner,dc=corp", objectClass=["group"], member=["cn=Ben,dc=corp"])
ANN = entry("cn=Ann,dc=corp", objectClass=["user"], sAMAccountName="ann", mail="ann@corp.test")
BEN = entry("cn=Ben,dc=corp", objectClass=["user"], sAMAccountName="ben", mail="ben@corp.test")
DAN = entry("cn=Dan,dc=corp", objectClass=["user"], sAMAccountName="dan", mail="dan@corp.test",
            userAccountControl="514")
CHAIN = r"(&(objectClass=*)(memberOf:1.2.840.113556.1.4.1941:=cn=All \28\2a\29,dc=corp))"


def chain_settings(**overrides):
    values = dict(schema="activedirectory", nested_groups="in_chain",
                  local_domains=("corp.test",))
    values.update(overrides)
    return LDAPSettings(**values)


def test_in_chain_expansion():
    """One search with the in-chain rule (group DN escaped) returns members
    at every depth; nested groups are not expanded again, disabled members
    are left out."""
    search = ScriptedSearch({
        "(|(mail=all@corp.test)(proxyAddresses=smtp:all@corp.test))": [GROUP],
        CHAIN: [ANN, INNER, BEN, DAN],
    })
    settings = chain_settings()
    result = Expansion("all@corp.test", search, settings.schema_mapping(), settings).run()
    assert [m.login for m in result.mailboxes] == ["ann", "ben"]
    assert IN_CHAIN in CHAIN
    assert [c[0] for c in search.calls] == [
        "(|(mail=all@corp.test)(proxyAddresses=smtp:all@corp.test))", CHAIN]
    # The size limit is the budget left after the address and in-chain searches.
    assert search.calls[1][3] == settings.max_expansions - 2


def test_in_chain_respects_the_budget():
    """The in-chain search asks for no more entries than the budget allows."""
    search = ScriptedSearch({
        "(|(mail=all@corp.test)(proxyAddresses=smtp:all@corp.test))": [GROUP],
        CHAIN: [ANN, BEN, DAN],
    })
    settings = chain_settings(max_expansions=3)
    result = Expansion("all@corp.test", search, settings.schema_mapping(), settings).run()
    assert [m.login for m in result.mailboxes] == ["ann"]
    assert any("nested members" in step for step in result.trace)


def test_in_chain_groups_of():
    """groups_of asks for groups holding the DN in member, in chain."""
    search = ScriptedSearch({
        r"(&(objectClass=group)(member:1.2.840.113556.1.4.1941:=cn=Ben\2a,dc=corp))": [INNER, GROUP],
    })
    settings = chain_settings()
    reader = Reader(search, settings.schema_mapping(), settings)
    ben = entry("cn=Ben*,dc=corp", objectClass=["user"])
    assert reader.groups_of(ben) == [INNER.dn, GROUP.dn]


def test_walk_is_the_default():
    """Without in_chain, groups are read member by member (no matching rule)."""
    search = ScriptedSearch({
        "(|(mail=all@corp.test)(proxyAddresses=smtp:all@corp.test))": [GROUP],
    }, entries=[ANN, INNER, BEN])
    settings = LDAPSettings(schema="activedirectory", local_domains=("corp.test",))
    result = Expansion("all@corp.test", search, settings.schema_mapping(), settings).run()
    assert [m.login for m in result.mailboxes] == ["ann", "ben"]
    assert not any(IN_CHAIN in c[0] for c in search.calls)


# -- is_local_domain without the directory --------------------------------------

class DeadConnector(Connector):
    def open(self, failed=None):
        raise DirectoryUnavailable("down")

    def check_password(self, dn, password):
        raise DirectoryUnavailable("down")


def test_configured_domains_need_no_directory():
    """Configured domains answer without a search; others need the directory
    only when domain_filter is set."""
    from mailserver.directory.ldap import LDAPDirectory

    settings = LDAPSettings(local_domains=("example.test",))
    directory = LDAPDirectory(settings, connector=DeadConnector(), **sync_directory_kwargs())
    assert result_of(directory.is_local_domain("Example.Test.")) is True
    assert result_of(directory.is_local_domain("other.test")) is False
    with_filter = LDAPDirectory(
        dataclasses.replace(settings, domain_filter="(associatedDomain={domain})"),
        connector=DeadConnector(), **sync_directory_kwargs())
    assert result_of(with_filter.is_local_domain("example.test")) is True
    failure_of(with_filter.is_local_domain("other.test"), DirectoryUnavailable)
    failure_of(with_filter.senders_for("alice"), DirectoryUnavailable)
    assert result_of(with_filter.senders_for("")) == frozenset()


def test_in_chain_unknown_to_the_server():
    """A server that answers the in-chain search with nothing although the
    group has members does not know the rule: the group is walked."""
    search = ScriptedSearch({
        "(|(mail=all@corp.test)(proxyAddresses=smtp:all@corp.test))": [GROUP],
    }, entries=[ANN, INNER, BEN])
    settings = chain_settings()
    result = Expansion("all@corp.test", search, settings.schema_mapping(), settings).run()
    assert [m.login for m in result.mailboxes] == ["ann", "ben"]
    assert any("in-chain search found none" in step for step in result.trace)


def test_ranged_values_count_under_their_attribute():
    """AD's member;range=0-1499 values are read as member values."""
    from mailserver.directory.ldap import _entry

    item = {"dn": "cn=Big,dc=corp", "type": "searchResEntry",
            "raw_attributes": {"member;range=0-1499": [b"cn=a,dc=corp", b"cn=b,dc=corp"],
                               "objectClass": [b"group"]}}
    assert _entry(item).values("member") == ["cn=a,dc=corp", "cn=b,dc=corp"]
