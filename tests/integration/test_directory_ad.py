"""The activedirectory preset on an Active-Directory-shaped tree.

Every test runs twice (``backend_kind``): on the embedded LDIF directory and
on a real slapd (``-m ldap``) holding tests/data/ad-tree.ldif with the small
AD schema in tests/data/ad.schema and the memberof overlay.  The tree's
users, groups and their purpose are described in the LDIF file itself.
"""

from __future__ import annotations

import pytest

from mailserver.directory.interfaces import Account, Mailbox
from tests.support.directory import (  # noqa: F401  (fixtures)
    ad_backend,
    ad_directory,
    ad_dn,
    ad_slapd,
    backend_kind,
    result_of,
)

ANN = Mailbox("ann@corp.example.test", "ann", ad_dn("Ann Archer"))
BEN = Mailbox("ben.baker@corp.example.test", "bbaker", ad_dn("Ben Baker"))
CAT = Mailbox("cat@corp.example.test", "ccole", ad_dn("Cat Cole"))
PAT = "pat@partner.example"
ANN_ADDRESSES = {"ann@corp.example.test", "ann.archer@corp.example.test",
                 "ann@sales.example.test"}
BEN_ADDRESSES = {"ben.baker@corp.example.test", "ben@corp.example.test"}
CAT_ADDRESSES = {"cat@corp.example.test", "c.cole@corp.example.test"}


def resolve(directory, address):
    return result_of(directory.resolve(address))


# -- addresses ------------------------------------------------------------------

@pytest.mark.parametrize("address", [
    "ann@corp.example.test",               # mail, and SMTP: proxy address
    "ANN@Corp.Example.TEST",
    "ann.archer@corp.example.test",        # smtp: proxy address
    "Ann.Archer@CORP.example.test",
    "ann@sales.example.test",              # smtp: proxy address in another domain
])
def test_user_by_any_address(ad_backend, address):
    """mail and both kinds of smtp proxy address find the user, in any case."""
    result = resolve(ad_backend, address)
    assert result.mailboxes == (ANN,)
    assert not result.disabled and result.restriction is None


@pytest.mark.parametrize("address", ["ben.baker@corp.example.test", "ben@corp.example.test"])
def test_mixed_case_mail_is_lower_cased(ad_backend, address):
    """The mailbox address is the mail attribute, lower-cased; the login is
    the sAMAccountName."""
    assert resolve(ad_backend, address).mailboxes == (BEN,)


@pytest.mark.parametrize("address", ["cat@corp.example.test", "c.cole@corp.example.test"])
def test_primary_address_from_proxy_addresses(ad_backend, address):
    """Without mail, the SMTP: (upper-case) proxy address is the primary one,
    even when an smtp: value comes first."""
    assert resolve(ad_backend, address).mailboxes == (CAT,)


@pytest.mark.parametrize("address", [
    "ann.sip@corp.example.test",                    # only as sip:
    "/o=corp/ou=exchange/cn=recipients/cn=ann",     # an X500: value
    "x500:/o=corp/ou=exchange/cn=recipients/cn=ann",
    "smtp:ann@corp.example.test",
])
def test_other_address_types_are_not_addresses(ad_backend, address):
    """Only smtp: proxy addresses are mail addresses."""
    assert not resolve(ad_backend, address).found


@pytest.mark.parametrize("address", [
    "*@corp.example.test", "*", "ann*", "ann@corp.example.test)(proxyAddresses=*",
    "*)(|(proxyAddresses=*", ")(", "a)(sAMAccountName=*@corp.example.test",
    "ann@corp.example.test\x00", "ann\x00@corp.example.test", "\\2a@corp.example.test",
    "smtp:*", "SMTP:*@corp.example.test", "ännchen@corp.example.test", "",
])
def test_filter_metacharacters_match_nothing(ad_backend, address):
    """Wildcards, parentheses, NUL and escapes in an address are data: the
    proxyAddresses filter matches nothing with them."""
    result = resolve(ad_backend, address)
    assert result.mailboxes == () and result.forwards == () and not result.disabled


def test_disabled_user(ad_backend):
    """A disabled account (userAccountControl bit 2) resolves to nothing,
    flagged disabled, so the policy can answer 550 5.2.1."""
    result = resolve(ad_backend, "dan@corp.example.test")
    assert not result.found and result.disabled
    assert any("disabled account" in step for step in result.trace)


def test_group_with_only_disabled_members(ad_backend):
    """A group whose members are all disabled is empty, not disabled."""
    result = resolve(ad_backend, "former@corp.example.test")
    assert not result.found and not result.disabled


# -- groups -----------------------------------------------------------------------

def test_nested_group(ad_backend):
    """Members are expanded at any depth; the disabled member is skipped and
    the external contact forwarded."""
    result = resolve(ad_backend, "sales@corp.example.test")
    assert result.mailboxes == (ANN, BEN)
    assert result.forwards == (PAT,)
    assert not result.disabled and result.restriction is None


def test_group_by_secondary_proxy_address(ad_backend):
    """A group is found by its smtp: proxy address in another domain too."""
    assert resolve(ad_backend, "sales@sales.example.test").mailboxes == (ANN, BEN)


def test_group_loop(ad_backend):
    """Sales East and Sales contain each other: each member once, then stop."""
    result = resolve(ad_backend, "sales-east@corp.example.test")
    assert result.mailboxes == (BEN, ANN)
    assert result.forwards == (PAT,)


def test_two_levels_of_nesting(ad_backend):
    """All Staff -> Sales -> Sales East -> Ben."""
    result = resolve(ad_backend, "all@corp.example.test")
    assert result.mailboxes == (ANN, BEN, CAT)
    assert result.forwards == (PAT,)


def test_member_of_is_maintained(ad_backend):
    """memberOf lists the direct groups (the overlay on slapd; the loader
    on the embedded backend)."""
    entries, _ = ad_backend.search("(sAMAccountName=bbaker)", attributes=("memberOf",))
    groups = {v.lower() for v in entries[0].values("memberOf")}
    assert groups == {ad_dn("Sales East").lower(), ad_dn("Team").lower()}


# -- sender restrictions --------------------------------------------------------

def test_authenticated_senders_only(ad_backend):
    """msExchRequireAuthToSendTo admits any sender who logged in, nobody else."""
    result = resolve(ad_backend, "all@corp.example.test")
    r = result.restriction
    assert r is not None and r.authenticated_only and r.any_sender
    assert not result.allows("stranger@elsewhere.example")
    assert not result.allows("ann@corp.example.test")
    assert result.allows("stranger@elsewhere.example", authenticated=True)


def test_listed_senders(ad_backend):
    """authOrig admits the listed user's addresses (any of them) only."""
    result = resolve(ad_backend, "board@corp.example.test")
    assert result.mailboxes == (ANN, CAT)
    r = result.restriction
    assert r.allowed_senders == BEN_ADDRESSES
    assert not r.members_only and not r.authenticated_only
    assert r.allows("Ben@Corp.Example.Test") and r.allows("ben.baker@corp.example.test")
    assert not r.allows("ann@corp.example.test")  # a member, but not listed
    assert not r.allows("")  # the null sender


def test_members_only(ad_backend):
    """A group listing itself in dLMemSubmitPerms admits its members, by any
    of their addresses."""
    r = resolve(ad_backend, "team@corp.example.test").restriction
    assert r.members_only and r.allowed_senders == frozenset()
    assert ANN_ADDRESSES | BEN_ADDRESSES <= r.members
    assert r.allows("ann@sales.example.test") and r.allows("ben@corp.example.test")
    assert not r.allows("cat@corp.example.test")


def test_members_of_another_group(ad_backend):
    """dLMemSubmitPerms naming another group admits that group's members."""
    r = resolve(ad_backend, "execs@corp.example.test").restriction
    assert r.allowed_senders == ANN_ADDRESSES
    assert r.allows("ann.archer@corp.example.test")
    assert not r.allows("cat@corp.example.test")  # a member of execs, not of managers


def test_restriction_fails_closed(ad_backend):
    """An authOrig naming an entry that is gone admits nobody."""
    result = resolve(ad_backend, "closed@corp.example.test")
    assert result.mailboxes == (ANN,)
    assert result.restriction.allowed_senders == frozenset()
    assert not result.allows("ann@corp.example.test")
    assert any("allowed sender not found" in step for step in result.trace)


def test_restrictions_can_be_switched_off(ad_directory):
    """Clearing the restriction attributes ("none") removes the restriction."""
    directory = ad_directory(allowed_sender_attributes=["none"],
                             authenticated_only_attribute="none")
    for address in ("board@corp.example.test", "all@corp.example.test",
                    "team@corp.example.test"):
        assert resolve(directory, address).restriction is None


# -- local domains ----------------------------------------------------------------

@pytest.mark.parametrize("domain, expected", [
    ("corp.example.test", True),      # configured
    ("sales.example.test", True),     # an msExchAcceptedDomain entry
    ("SALES.Example.Test.", True),
    ("partner.example", False),
    ("example.test", False),
    ("*", False),
    ("*.example.test", False),
    ("sales.example.test)(cn=*", False),
    ("", False),
])
def test_is_local_domain(ad_backend, domain, expected):
    """Local domains come from the config or from the directory's domain_filter."""
    assert result_of(ad_backend.is_local_domain(domain)) is expected


def test_config_only_domains(ad_directory):
    """Without domain_filter only the configured domains are local."""
    directory = ad_directory(domain_filter="")
    assert result_of(directory.is_local_domain("corp.example.test")) is True
    assert result_of(directory.is_local_domain("sales.example.test")) is False


# -- authentication ---------------------------------------------------------------

@pytest.mark.parametrize("login, password, expected", [
    ("ann", "ann-password", Account("ann", "ann@corp.example.test", ad_dn("Ann Archer"))),
    ("ANN", "ann-password", Account("ann", "ann@corp.example.test", ad_dn("Ann Archer"))),
    ("ann@corp.example.test", "ann-password",  # the UPN
     Account("ann", "ann@corp.example.test", ad_dn("Ann Archer"))),
    ("bbaker", "ben-password",
     Account("bbaker", "ben.baker@corp.example.test", ad_dn("Ben Baker"))),
    ("ben@ad.corp.example.test", "ben-password",  # a UPN unlike any address
     Account("bbaker", "ben.baker@corp.example.test", ad_dn("Ben Baker"))),
    ("ccole", "cat-password",
     Account("ccole", "cat@corp.example.test", ad_dn("Cat Cole"))),
])
def test_authenticate(ad_backend, login, password, expected):
    """sAMAccountName and userPrincipalName are logins, in any case."""
    assert result_of(ad_backend.authenticate(login, password)) == expected


@pytest.mark.parametrize("login, password", [
    ("ann", "wrong"),
    ("ann", "ANN-PASSWORD"),
    ("ann", ""),
    ("ben.baker@corp.example.test", "ben-password"),  # mail is not a login here
    ("ddrew", "dan-password"),                         # disabled
    ("ddrew@corp.example.test", "dan-password"),
    ("WS01$", "ws01-password"),                        # a computer
    ("twin", "twin-password"),                         # two accounts
    ("sales-east", "anything"),                        # a group
    ("*", "ann-password"),
    ("a*", "ann-password"),
    ("ann)(sAMAccountName=*", "ann-password"),
    ("ann\x00", "ann-password"),
])
def test_authenticate_refused(ad_backend, login, password):
    """Wrong passwords, disabled accounts, machines, groups, ambiguous and
    wildcard logins all give None."""
    assert result_of(ad_backend.authenticate(login, password)) is None


def test_disabled_account_is_never_bound(ad_backend):
    """A disabled account is refused before its password reaches the server."""
    binds = []
    original = ad_backend._connector.check_password
    ad_backend._connector.check_password = lambda dn, pw: binds.append(dn) or original(dn, pw)
    assert result_of(ad_backend.authenticate("ddrew", "dan-password")) is None
    assert binds == []
    assert result_of(ad_backend.authenticate("ann", "ann-password")) is not None
    assert binds == [ad_dn("Ann Archer")]


def test_login_attributes_are_configurable(ad_directory):
    """Adding mail to login_attributes lets users log in with their address."""
    directory = ad_directory(login_attributes=("sAMAccountName", "userPrincipalName", "mail"))
    account = result_of(directory.authenticate("Ben.Baker@corp.example.test", "ben-password"))
    assert account is not None and account.login == "bbaker"
    assert result_of(directory.authenticate("WS01$", "ws01-password")) is None


# -- envelope senders -------------------------------------------------------------

@pytest.mark.parametrize("login, expected", [
    # Ann: her addresses, and helpdesk (publicDelegates names Managers, her group).
    ("ann", ANN_ADDRESSES | {"helpdesk@corp.example.test"}),
    # Ben: his addresses, and Cat's (her publicDelegates names him).
    ("ben@ad.corp.example.test", BEN_ADDRESSES | CAT_ADDRESSES),
    ("ccole", CAT_ADDRESSES),
    ("ddrew", set()),     # disabled
    ("twin", set()),      # ambiguous
    ("nobody", set()),
    ("*", set()),
    ("", set()),
])
def test_senders_for(ad_backend, login, expected):
    """A login may use its addresses and those delegated to it or its groups."""
    assert result_of(ad_backend.senders_for(login)) == frozenset(expected)


def test_senders_without_member_of(ad_directory):
    """Without memberOf, group membership is found by searching member: same
    answer."""
    directory = ad_directory(member_of_attribute="none")
    assert result_of(directory.senders_for("ann")) == frozenset(
        ANN_ADDRESSES | {"helpdesk@corp.example.test"})


def test_in_chain_falls_back_to_walking(ad_directory):
    """nested_groups = "in_chain" needs Active Directory; slapd (and the
    embedded backend) do not know the rule, so groups are walked instead,
    with the same result."""
    directory = ad_directory(nested_groups="in_chain")
    result = resolve(directory, "all@corp.example.test")
    assert result.mailboxes == (ANN, BEN, CAT)
    assert result.forwards == (PAT,)
    assert resolve(directory, "execs@corp.example.test").restriction.allowed_senders == (
        ANN_ADDRESSES)
