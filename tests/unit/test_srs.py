"""Sender Rewriting Scheme."""

import pytest

from mailserver.srs import SRS


@pytest.fixture
def srs():
    now = [1_800_000_000.0]
    s = SRS("secret", "example.test", clock=lambda: now[0])
    s.now = now
    return s


def test_round_trip(srs):
    """A rewritten sender reverses to the original."""
    rewritten = srs.forward("alice@example.org")
    assert rewritten.startswith("SRS0=") and rewritten.endswith("=example.org=alice@example.test")
    assert srs.reverse(rewritten) == "alice@example.org"
    assert srs.reverse(rewritten.upper().replace("@EXAMPLE.TEST", "@example.test")) \
        == "ALICE@EXAMPLE.ORG"


def test_left_alone(srs):
    """Bounces, our own domain and addresses already rewritten are not rewritten."""
    assert srs.forward("") == ""
    assert srs.forward("bob@example.test") == "bob@example.test"
    once = srs.forward("alice@example.org")
    assert srs.forward(once) == once


@pytest.mark.parametrize("mangle", [
    lambda a: a.replace("SRS0=", "SRS0=x", 1),          # hash changed
    lambda a: a.replace("=alice@", "=mallory@"),        # local part changed
    lambda a: a.replace("example.org", "example.net"),  # domain changed
    lambda a: "SRS0=abcd@example.test",                 # malformed
    lambda a: a.replace("@example.test", "@other.test"),  # not ours
])
def test_forgeries_refused(srs, mangle):
    """Changed or malformed SRS addresses reverse to nothing."""
    assert srs.reverse(mangle(srs.forward("alice@example.org"))) is None


def test_expiry(srs):
    """An SRS address older than max_age_days is refused."""
    rewritten = srs.forward("alice@example.org")
    srs.now[0] += 20 * 86400
    assert srs.reverse(rewritten) == "alice@example.org"
    srs.now[0] += 2 * 86400
    assert srs.reverse(rewritten) is None
