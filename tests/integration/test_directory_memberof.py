"""The openldap preset with memberOf, restrictions, grants and domains
configured (tests/data/openldap-extras.ldif on top of the quick start).

Every test runs on the embedded backend and on a slapd (``-m ldap``) whose
memberof overlay maintains ``memberOf`` for groupOfNames, with
tests/data/ad.schema supplying the auxiliary class that carries the
restriction and grant attributes.
"""

from __future__ import annotations

import pytest

from mailserver.directory.interfaces import Mailbox
from tests.support.directory import (  # noqa: F401  (fixtures)
    ALICE_DN,
    BOB_DN,
    EXTRAS,
    backend_kind,
    extras_directory,
    extras_files,
    extras_slapd,
    result_of,
)

ALICE = Mailbox("alice@example.test", "alice", ALICE_DN)
BOB = Mailbox("bob@example.test", "bob", BOB_DN)
ALICE_ADDRESSES = {"alice@example.test", "alice.liddell@example.test"}
ALICE_SENDERS = ALICE_ADDRESSES | {"postmaster@example.test", "abuse@example.test"}


def test_overlay_fills_member_of(extras_directory):
    """Members of groupOfNames get memberOf values (on slapd from the overlay)."""
    directory = extras_directory()
    entries, _ = directory.search("(uid=alice)", attributes=("memberOf",))
    assert {v.lower() for v in entries[0].values("memberOf")} == {
        "cn=team,ou=groups,dc=example,dc=test", f"cn=managers,{EXTRAS}"}


@pytest.mark.parametrize("member_of", ["memberOf", "none"])
def test_send_as_through_nested_group(extras_directory, member_of):
    """publicDelegates on board names managers, a group alice is in: she may
    send as board@, whether membership comes from memberOf or from a search."""
    directory = extras_directory(member_of_attribute=member_of)
    assert result_of(directory.senders_for("alice")) == frozenset(
        ALICE_SENDERS | {"board@example.test"})
    # bob is a member of board itself, but no grant names him.
    assert result_of(directory.senders_for("bob")) == frozenset({"bob@example.test"})


def test_without_grants_configured(extras_directory):
    """With send_as_attributes cleared only own addresses and aliases count."""
    directory = extras_directory(send_as_attributes=["none"])
    assert result_of(directory.senders_for("alice")) == frozenset(ALICE_SENDERS)


def test_listed_senders_and_member_groups(extras_directory):
    """authOrig lists bob; dLMemSubmitPerms lists managers, whose members may
    write too.  Nobody else may."""
    result = result_of(extras_directory().resolve("board@example.test"))
    assert result.mailboxes == (ALICE, BOB)
    r = result.restriction
    assert r.allowed_senders == ALICE_ADDRESSES | {"bob@example.test"}
    assert result.allows("alice.liddell@example.test") and result.allows("bob@example.test")
    assert not result.allows("carol@example.test")


def test_members_only(extras_directory):
    """crew lists itself in dLMemSubmitPerms: members only."""
    result = result_of(extras_directory().resolve("crew@example.test"))
    assert result.mailboxes == (BOB,)
    assert result.restriction.members_only
    assert result.allows("bob@example.test")
    assert not result.allows("alice@example.test")


def test_restrictions_off_when_not_configured(extras_directory):
    """Without allowed_sender_attributes (the openldap default) anyone may send."""
    directory = extras_directory(allowed_sender_attributes=["none"])
    assert result_of(directory.resolve("board@example.test")).restriction is None


def test_targets_in_directory_domains_stay_local(extras_directory):
    """A target in a domain that domain_filter makes local is looked up, not
    forwarded; with config-only domains it is forwarded."""
    local = result_of(extras_directory().resolve("announce@example.test"))
    assert local.mailboxes == (ALICE,) and local.forwards == ()
    assert "news@lists.example.test: no entry" in local.trace
    config_only = result_of(extras_directory(domain_filter="").resolve("announce@example.test"))
    assert config_only.forwards == ("news@lists.example.test",)


@pytest.mark.parametrize("domain, expected", [
    ("example.test", True),           # configured
    ("lists.example.test", True),     # associatedDomain in the directory
    ("Lists.Example.Test", True),
    ("other.example.test", False),
    ("*.example.test", False),
])
def test_domains_from_the_directory(extras_directory, domain, expected):
    """domain_filter finds domainRelatedObject entries."""
    assert result_of(extras_directory().is_local_domain(domain)) is expected
