"""Sender Rewriting Scheme."""

import pytest

from mailserver.srs import HASH_LENGTH, SRS


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


def _parts(address):
    """The hash, stamp, domain and local part of an SRS0 address."""
    return address.rpartition("@")[0][5:].split("=", 3)


def test_hash_shape(srs):
    """The hash is HASH_LENGTH base32 characters: 50 bits, whatever the case."""
    given, stamp, _, _ = _parts(srs.forward("alice@example.org"))
    assert len(given) == HASH_LENGTH == 10
    assert set(given) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    assert len(stamp) == 2


def test_boundary_shift_refused(srs):
    """Moving the '=' between domain and local part keeps the hashed characters
    in the same order but must not keep the hash valid."""
    rewritten = srs.forward("n.smith@gmail.comjoh")
    given, stamp, _, _ = _parts(rewritten)
    assert srs.reverse(rewritten) == "n.smith@gmail.comjoh"
    shifted = f"SRS0={given}={stamp}=gmail.com=john.smith@example.test"
    assert srs.reverse(shifted) is None
    shifted = f"SRS0={given}={stamp}=gmail.comjo=hn.smith@example.test"
    assert srs.reverse(shifted) is None


@pytest.mark.parametrize("position", range(HASH_LENGTH))
def test_changed_hash_character_refused(srs, position):
    """Changing any one character of the hash makes the address invalid."""
    rewritten = srs.forward("alice@example.org")
    given = _parts(rewritten)[0]
    char = "A" if given[position] != "A" else "B"
    forged = rewritten.replace(given, given[:position] + char + given[position + 1:], 1)
    assert srs.reverse(forged) is None


@pytest.mark.parametrize("given", ["ABCD", "ABCDEFGHIJK", "ÄBCDEFGHIJ"])
def test_hash_of_wrong_shape_refused(srs, given):
    """A hash of the old length, too long, or not ASCII is refused without error."""
    stamp = _parts(srs.forward("alice@example.org"))[1]
    assert srs.reverse(f"SRS0={given}={stamp}=example.org=alice@example.test") is None


def test_case_folded_accepted(srs):
    """Relays may change the case of the address: upper or lower, it still checks."""
    rewritten = srs.forward("Alice@Example.org")
    local = rewritten.rpartition("@")[0]
    assert srs.reverse(local.upper() + "@EXAMPLE.TEST") == "ALICE@EXAMPLE.ORG"
    assert srs.reverse(local.lower() + "@example.test") == "alice@example.org"


def test_expired_refused_even_with_valid_hash(srs):
    """An address past max_age_days is refused; so is a stamp from the future."""
    rewritten = srs.forward("alice@example.org")
    srs.now[0] += 22 * 86400
    assert srs.reverse(rewritten) is None
    srs.now[0] -= 30 * 86400  # the stamp is now 8 days ahead: (today - day) wraps
    assert srs.reverse(rewritten) is None


def test_long_original_not_rewritten(srs):
    """A rewrite whose local part would pass 64 octets is not made: the bounce
    to it would be refused (553 5.1.3) by our own parser."""
    fits = "a" * 33 + "@example.org"  # SRS0=H*10=TT= is 19, then 11 + 1 + 33
    rewritten = srs.forward(fits)
    assert len(rewritten.rpartition("@")[0]) == 64
    assert srs.reverse(rewritten) == fits
    too_long = "a" * 34 + "@example.org"
    assert srs.forward(too_long) == too_long
