"""Resolution and authentication, run against both directory backends.

Every test here runs twice through the ``backend`` fixture: on the embedded
LDIF directory and on a real slapd (``-m ldap``) holding the same entries, so
the two are shown to behave alike.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mailserver import reply as R
from mailserver.address import parse_path
from mailserver.directory.interfaces import Account, Mailbox
from mailserver.policy import RecipientPolicy
from tests.support.directory import (  # noqa: F401  (fixtures)
    ALICE_DN,
    BOB_DN,
    CASES,
    CAROL_DN,
    backend,
    cases_files,
    cases_slapd,
    result_of,
)

ALICE = Mailbox("alice@example.test", "alice", ALICE_DN)
BOB = Mailbox("bob@example.test", "bob", BOB_DN)
CAROL = Mailbox("carol@example.test", "carol", CAROL_DN)


def resolve(directory, address):
    return result_of(directory.resolve(address))


def authenticate(directory, login, password):
    return result_of(directory.authenticate(login, password))


@pytest.mark.parametrize("address", [
    "alice@example.test", "ALICE@Example.TEST", " alice@example.test ",
    "alice.liddell@example.test",
])
def test_user_addresses(backend, address):
    """A user is found by its primary or alternate address, in any case."""
    result = resolve(backend, address)
    assert result.mailboxes == (ALICE,)
    assert result.forwards == ()
    assert result.found


def test_stored_address_is_lower_cased(backend):
    """The mailbox address is the primary mail attribute, lower-cased."""
    assert resolve(backend, "carol@example.test").mailboxes == (CAROL,)


def test_unknown_address(backend):
    """An address nobody owns resolves to nothing, without error."""
    result = resolve(backend, "nobody@example.test")
    assert not result.found
    assert result.mailboxes == () and result.forwards == ()
    assert "nobody@example.test: no entry" in result.trace


@pytest.mark.parametrize("address", [
    "*@example.test", "*", "a)(uid=*@example.test", "alice@example.test)(mail=*",
    "*)(|(mail=*", "ali\\ce@example.test", "\\2a@example.test", "alice\x00@example.test",
    "ålice@example.test", "alice@exämple.test", "", "(", ")",
    "alice@example.test\x00", "alice@example.test\x00junk", "alice@example.test\r\nrcpt",
])
def test_filter_metacharacters_match_nothing(backend, address):
    """Filter metacharacters, NUL and non-ASCII in an address are data, not syntax."""
    result = resolve(backend, address)
    assert result.mailboxes == () and result.forwards == ()


def rcpt(directory, path):
    """The RCPT decision for ``path`` as a client sends it (``<...>``)."""
    address = str(parse_path(path, smtputf8=False, for_rcpt=True))
    policy = RecipientPolicy(directory, ["example.test"])
    return result_of(defer.Deferred.fromCoroutine(policy.check_rcpt(address)))


@pytest.mark.parametrize("path", ['<"alice"@example.test>', '<"ALICE"@Example.TEST>',
                                  '<"\\a\\l\\i\\c\\e"@example.test>',
                                  '<"alice.liddell"@example.test>'])
def test_quoted_local_part_reaches_the_mailbox(backend, path):
    """"alice"@example.test is alice@example.test: the quotes it does not
    need are gone before the lookup, so alice gets the mail."""
    decision = rcpt(backend, path)
    assert decision.reply == R.RCPT_OK
    assert decision.resolution.mailboxes == (ALICE,)


@pytest.mark.parametrize("path", ['<"bob@evil.example"@example.test>',
                                  '<"bob@example.test"@example.test>',
                                  '<"a b"@example.test>'])
def test_quoted_local_part_that_needs_quotes_is_looked_up_quoted(backend, path):
    """A quoted "@" (or space) stays in the quoted local part of a local
    address: an unknown user (550 5.1.1), never a relay to evil.example
    nor a second way to spell bob's address."""
    assert rcpt(backend, path).reply == R.RCPT_UNKNOWN


@pytest.mark.parametrize("address", ["postmaster@example.test", "Abuse@example.test"])
def test_alias_to_user(backend, address):
    """An alias resolves its target again, down to the user's mailbox."""
    assert resolve(backend, address).mailboxes == (ALICE,)


def test_group_members(backend):
    """A group resolves to its members' mailboxes, in member order."""
    result = resolve(backend, "team@example.test")
    assert result.mailboxes == (ALICE, BOB)
    assert any("group with 2 member(s)" in step for step in result.trace)


def test_nested_group_without_duplicates(backend):
    """Nested groups are expanded; a member reached twice appears once."""
    assert resolve(backend, "all@example.test").mailboxes == (ALICE, BOB, CAROL)


def test_member_dn_spelling(backend):
    """Member DNs differing only in case and spacing name the same entry once."""
    assert resolve(backend, "spaced@example.test").mailboxes == (ALICE, BOB)


def test_group_of_unique_names(backend):
    """uniqueMember values, with or without a #'..'B uid suffix, are members."""
    assert resolve(backend, "ops@example.test").mailboxes == (BOB, CAROL)


@pytest.mark.parametrize("address, expected", [
    ("loop-a@example.test", (BOB, ALICE)),  # loop-a: [loop-b: [loop-a, bob], alice]
    ("loop-b@example.test", (ALICE, BOB)),  # loop-b: [loop-a: [loop-b, alice], bob]
])
def test_group_loop(backend, address, expected):
    """Groups that contain each other expand once, depth first, and terminate."""
    assert resolve(backend, address).mailboxes == expected


def test_alias_loop(backend):
    """Aliases pointing at each other terminate with nothing found."""
    result = resolve(backend, "ping@example.test")
    assert not result.found
    assert any("already resolved" in step for step in result.trace)


def missing_warnings(events):
    """The text of the "does not exist" warnings among captured log events."""
    return [formatEvent(e) for e in events
            if e.get("log_level") == LogLevel.warn and "does not exist" in formatEvent(e)]


def test_dangling_alias(backend):
    """An alias to a local address nobody owns resolves to nothing (so RCPT
    gets 550 5.1.1), and the dangling target is logged and traced, naming
    the alias."""
    with capturedLogs() as events:
        result = resolve(backend, "ghost@example.test")
    assert not result.found
    assert result.mailboxes == () and result.forwards == () and not result.disabled
    assert missing_warnings(events) == [
        "directory: alias ghost@example.test: target nobody@example.test does not exist, "
        "left out (lookup of ghost@example.test)"]
    assert f"cn=ghost,{CASES}: target nobody@example.test does not exist, left out" \
        in result.trace


def test_alias_with_a_dangling_target_delivers_to_the_others(backend):
    """One target gone: the others still get the mail, and the gone one is logged."""
    with capturedLogs() as events:
        result = resolve(backend, "halfway@example.test")
    assert result.mailboxes == (BOB,)
    assert missing_warnings(events) == [
        "directory: alias halfway@example.test: target nobody@example.test does not exist, "
        "left out (lookup of halfway@example.test)"]
    assert f"cn=halfway,{CASES}: target nobody@example.test does not exist, left out" \
        in result.trace


def test_missing_member_is_skipped(backend):
    """A member DN with no entry is left out, logged and traced with the
    group's name; the other members still count."""
    with capturedLogs() as events:
        result = resolve(backend, "partial@example.test")
    assert result.mailboxes == (BOB,)
    assert missing_warnings(events) == [
        f"directory: group partial@example.test: member uid=gone,{CASES} does not exist, "
        "left out (lookup of partial@example.test)"]
    assert f"cn=partial,{CASES}: member uid=gone,{CASES} does not exist, left out" \
        in result.trace


def test_group_whose_members_are_all_gone_is_unknown(backend):
    """With no member left, the group resolves to not found (550 5.1.1 at
    RCPT), never to an empty success; each gone member is logged."""
    with capturedLogs() as events:
        result = resolve(backend, "vanished@example.test")
    assert not result.found and not result.disabled
    assert len(missing_warnings(events)) == 2
    policy = RecipientPolicy(backend, ["example.test"])
    for address in ("vanished@example.test", "ghost@example.test"):
        decision = result_of(defer.Deferred.fromCoroutine(policy.check_rcpt(address)))
        assert decision.reply == R.RCPT_UNKNOWN


@pytest.mark.parametrize("address", ["ping@example.test", "loop-a@example.test",
                                     "deep0@example.test", "nobody@example.test"])
def test_loops_limits_and_unknown_addresses_are_not_missing_targets(backend, address):
    """Only a target or member that has no entry is logged as missing: not a
    loop, not a depth limit, not the looked-up address itself being unknown."""
    with capturedLogs() as events:
        resolve(backend, address)
    assert missing_warnings(events) == []


def test_alias_with_local_and_external_targets(backend):
    """Local targets become mailboxes; targets outside the local domains, forwards."""
    result = resolve(backend, "list@example.test")
    assert result.mailboxes == (BOB, ALICE)
    assert result.forwards == ("friend@elsewhere.example",)


def test_user_with_routing_address_forwards(backend):
    """A user whose mailRoutingAddress is external is forwarded, not delivered."""
    result = resolve(backend, "dave@example.test")
    assert result.mailboxes == ()
    assert result.forwards == ("dave@elsewhere.example",)


def test_external_contact_in_group(backend):
    """A group member without a login whose address is external is forwarded."""
    result = resolve(backend, "partners@example.test")
    assert result.mailboxes == (BOB,)
    assert result.forwards == ("partner@elsewhere.example",)


def test_depth_is_bounded(backend):
    """Nesting deeper than max_depth is not followed; shallower nesting is."""
    deep = resolve(backend, "deep0@example.test")
    assert not deep.found
    assert any("max_depth" in step for step in deep.trace)
    assert resolve(backend, "deep5@example.test").mailboxes == (ALICE,)


@pytest.mark.parametrize("login", ["alice", "alice@example.test", "ALICE@example.test"])
def test_authenticate(backend, login):
    """The right password for a uid or an address gives the account."""
    assert authenticate(backend, login, "alice-password") == Account(
        login="alice", address="alice@example.test", dn=ALICE_DN)


def test_authenticate_forwarding_user(backend):
    """A user whose mail is forwarded can still log in."""
    account = authenticate(backend, "dave", "dave-password")
    assert account is not None and account.address == "dave@example.test"


@pytest.mark.parametrize("login, password", [
    ("alice", "wrong"),
    ("alice", "ALICE-PASSWORD"),
    ("alice", "alice-password "),
    ("alice", "bob-password"),
    ("nobody", "alice-password"),
    ("alice", ""),
    ("", "alice-password"),
    ("*", "alice-password"),
    ("alice)(uid=*", "alice-password"),
    ("al*", "alice-password"),
    ("alice\x00", "alice-password"),
    ("alice@example.test\x00", "alice-password"),
    ("alice@example.test\x00junk", "alice-password"),
    ("twin", "twin-password"),
    ("nopass", "anything"),
    ("cn=mailserver,dc=example,dc=test", "mailserver-password"),
])
def test_authenticate_refused(backend, login, password):
    """Wrong, empty or case-changed passwords, unknown, ambiguous and wildcard
    logins all give None."""
    assert authenticate(backend, login, password) is None


@pytest.mark.parametrize("login, expected", [
    # alice's addresses, and the aliases routing to her alone (postmaster, abuse).
    ("alice", {"alice@example.test", "alice.liddell@example.test",
               "postmaster@example.test", "abuse@example.test"}),
    ("ALICE@example.test", {"alice@example.test", "alice.liddell@example.test",
                            "postmaster@example.test", "abuse@example.test"}),
    # list@ routes to bob and others: a list, not one of bob's identities.
    ("bob", {"bob@example.test"}),
    ("dave", {"dave@example.test"}),  # forwarded elsewhere, still his address
    ("twin", set()),
    ("nobody", set()),
    ("*", set()),
    ("alice\x00", set()),
    ("", set()),
])
def test_senders_for(backend, login, expected):
    """The envelope senders of a login: its addresses and its own aliases."""
    assert result_of(backend.senders_for(login)) == frozenset(expected)


def test_resolution_is_not_restricted_by_default(backend):
    """The openldap preset reads no restriction attributes: anyone may send."""
    result = resolve(backend, "team@example.test")
    assert result.restriction is None and result.allows("anyone@elsewhere.example")
    assert not result.disabled


@pytest.mark.parametrize("domain, expected", [
    ("example.test", True), ("EXAMPLE.test.", True), ("elsewhere.example", False),
    ("", False),
])
def test_is_local_domain_from_config(backend, domain, expected):
    """Without domain_filter, the local domains are the configured ones."""
    assert result_of(backend.is_local_domain(domain)) is expected
