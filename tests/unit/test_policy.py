"""Recipient policy: local or relay, known or not, who may send to whom."""

import pytest
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mailserver import reply as R
from mailserver.directory.interfaces import SenderRestriction
from mailserver.policy import RecipientPolicy
from mailserver.testing import FakeDirectory

ENTRIES = {
    "alice@example.test": ("alice@example.test",),
    "team@example.test": ("alice@example.test", "bob@example.test"),
    "postmaster@example.test": ("alice@example.test",),
    "@example.test": ("catchall@example.test",),
}


def decide(policy, rcpt, sender=""):
    return SynchronousTestCase().successResultOf(
        defer.ensureDeferred(policy.check_rcpt(rcpt, sender))
    )


@pytest.fixture
def directory():
    return FakeDirectory(ENTRIES, local_domains=("example.test", "other.test"))


@pytest.mark.parametrize("rcpt, reply", [
    ("alice@example.test", R.RCPT_OK),
    ("ALICE@EXAMPLE.TEST", R.RCPT_OK),
    ("nobody@example.test", R.RCPT_UNKNOWN),
    ("postmaster", R.RCPT_OK),
    ("someone@example.org", R.RELAY_DENIED),
    ("someone@sub.example.test", R.RELAY_DENIED),
    ("a@[127.0.0.1]", R.RELAY_DENIED),
    ("nobody@other.test", R.RCPT_UNKNOWN),
])
def test_mx_decisions(directory, rcpt, reply):
    """Local domains are checked against the directory; all else is relaying, refused."""
    assert decide(RecipientPolicy(directory, ["example.test"]), rcpt).reply == reply


def test_lmtp_never_relays(directory):
    """LMTP answers 550 5.1.1 for other domains: it only delivers locally."""
    policy = RecipientPolicy(directory, ["example.test"], lmtp=True)
    assert decide(policy, "someone@example.org").reply == R.RCPT_UNKNOWN


def test_disabled_account(directory):
    """A disabled account is 550 5.2.1, not 'unknown'."""
    directory.disabled.add("alice@example.test")
    assert decide(RecipientPolicy(directory, ["example.test"]), "alice@example.test").reply \
        == R.MAILBOX_DISABLED


def test_outage_is_temporary(directory):
    """Directory down: 451 4.4.3 for local and remote recipients alike, never 5xx."""
    directory.down = True
    policy = RecipientPolicy(directory, ["example.test"])
    assert decide(policy, "alice@example.test").reply == R.DIRECTORY_UNAVAILABLE
    assert decide(policy, "x@example.org").reply == R.DIRECTORY_UNAVAILABLE


def test_catch_all_only_when_enabled(directory):
    """Unknown users reach the @domain entry only with catch_all on."""
    off = RecipientPolicy(directory, ["example.test"])
    on = RecipientPolicy(directory, ["example.test"], catch_all=True)
    assert decide(off, "nobody@example.test").reply == R.RCPT_UNKNOWN
    decision = decide(on, "nobody@example.test")
    assert decision.reply == R.RCPT_OK
    assert [m.address for m in decision.resolution.mailboxes] == ["catchall@example.test"]
    assert decide(on, "alice@example.test").resolution.mailboxes[0].address == "alice@example.test"


def test_restricted_group(directory):
    """A members-only group takes mail from its members, refuses others and bounces."""
    directory.restricted["team@example.test"] = SenderRestriction(
        members_only=True, members=frozenset({"alice@example.test", "bob@example.test"}))
    policy = RecipientPolicy(directory, ["example.test"])
    assert decide(policy, "team@example.test", "Bob@Example.test").reply == R.RCPT_OK
    assert decide(policy, "team@example.test", "eve@example.org").reply == R.SENDER_NOT_ALLOWED
    assert decide(policy, "team@example.test", "").reply == R.SENDER_NOT_ALLOWED
