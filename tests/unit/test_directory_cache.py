"""CachingDirectory: TTLs, shared lookups, failures, bounds, clear()."""

from __future__ import annotations

import pytest
from twisted.internet import defer, task
from twisted.python.failure import Failure

from mailserver.directory.cache import CachingDirectory, TTLCache
from mailserver.directory.interfaces import Account, IDirectory, Resolution
from mailserver.errors import DirectoryUnavailable
from mailserver.testing import FakeDirectory

ENTRIES = {"alice@example.test": ("alice@example.test",),
           "team@example.test": ("alice@example.test", "bob@example.test")}


def result_of(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: defer.Deferred) -> Failure:
    out = []
    d.addBoth(out.append)
    assert out and isinstance(out[0], Failure), out
    return out[0]


def resolves(fake: FakeDirectory) -> list:
    return [c for c in fake.calls if c[0] == "resolve"]


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def fake():
    return FakeDirectory(ENTRIES, passwords={"alice": "alice-password"})


def make(fake, clock, **kw) -> CachingDirectory:
    return CachingDirectory(fake, clock=clock, **kw)


def test_provides_idirectory(fake, clock):
    assert IDirectory.providedBy(make(fake, clock))


def test_found_cached_for_positive_ttl(fake, clock):
    cache = make(fake, clock, positive_ttl=60, negative_ttl=10)
    first = result_of(cache.resolve("alice@example.test"))
    assert first.found
    clock.advance(59.9)
    assert result_of(cache.resolve("alice@example.test")) == first
    assert len(resolves(fake)) == 1
    clock.advance(0.1)
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 2
    assert (cache.hits, cache.misses) == (1, 2)


def test_unknown_cached_for_negative_ttl(fake, clock):
    cache = make(fake, clock, positive_ttl=60, negative_ttl=10)
    assert not result_of(cache.resolve("nobody@example.test")).found
    clock.advance(9)
    result_of(cache.resolve("nobody@example.test"))
    assert len(resolves(fake)) == 1
    clock.advance(1)
    # A new account is seen once the negative entry expires.
    fake.entries["nobody@example.test"] = ("nobody@example.test",)
    assert result_of(cache.resolve("nobody@example.test")).found
    assert len(resolves(fake)) == 2


def test_keys_are_case_insensitive(fake, clock):
    cache = make(fake, clock)
    result_of(cache.resolve("Alice@Example.TEST"))
    result_of(cache.resolve("alice@example.test"))
    result_of(cache.resolve(" ALICE@EXAMPLE.TEST "))
    assert len(resolves(fake)) == 1


def test_failures_are_not_cached(fake, clock):
    cache = make(fake, clock)
    fake.down = True
    failure_of(cache.resolve("alice@example.test")).trap(DirectoryUnavailable)
    failure_of(cache.resolve("alice@example.test")).trap(DirectoryUnavailable)
    assert len(resolves(fake)) == 2
    fake.down = False  # recovery is seen at once
    assert result_of(cache.resolve("alice@example.test")).found
    assert len(cache) == 1


def test_synchronous_exception_is_a_failure(clock):
    class Broken(FakeDirectory):
        def resolve(self, address):
            raise DirectoryUnavailable("boom")

    cache = make(Broken(), clock)
    failure_of(cache.resolve("a@example.test")).trap(DirectoryUnavailable)
    assert len(cache) == 0


def test_concurrent_lookups_share_one_request(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    ds = [cache.resolve("team@example.test") for _ in range(50)]
    assert len(resolves(fake)) == 1 and len(fake.pending) == 1
    assert not any(d.called for d in ds)
    fake.release(0)
    answers = [result_of(d) for d in ds]
    assert all(a.found and len(a.mailboxes) == 2 for a in answers)
    assert (cache.misses, cache.joined) == (1, 49)
    # and now it is cached
    result_of(cache.resolve("team@example.test"))
    assert len(resolves(fake)) == 1


def test_different_keys_are_not_shared(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    cache.resolve("alice@example.test")
    cache.resolve("team@example.test")
    assert len(fake.pending) == 2


def test_shared_failure_reaches_every_caller_and_is_not_cached(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    ds = [cache.resolve("alice@example.test") for _ in range(3)]
    fake.pending[0][1].errback(DirectoryUnavailable("gone"))
    for d in ds:
        failure_of(d).trap(DirectoryUnavailable)
    fake.slow = False
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 2


def test_one_caller_cancelling_does_not_affect_others(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    a, b, c = (cache.resolve("alice@example.test") for _ in range(3))
    b.cancel()
    failure_of(b).trap(defer.CancelledError)
    assert not fake.pending[0][1].called  # the shared request goes on
    fake.release(0)
    assert result_of(a).found and result_of(c).found
    assert len(cache) == 1


def test_every_caller_cancelling_still_fills_the_cache(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    d = cache.resolve("alice@example.test")
    d.cancel()
    failure_of(d).trap(defer.CancelledError)
    fake.release(0)
    fake.slow = False
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 1


def test_an_error_in_one_callers_callbacks_stays_there(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    a = cache.resolve("alice@example.test")
    b = cache.resolve("alice@example.test")

    def explode(_):
        raise RuntimeError("caller bug")

    a.addCallback(explode)
    fake.release(0)
    failure_of(a).trap(RuntimeError)
    assert result_of(b).found


def test_joining_after_the_answer_is_a_hit(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    first = cache.resolve("alice@example.test")
    fake.release(0)
    result_of(first)
    assert result_of(cache.resolve("alice@example.test")).found
    assert cache.hits == 1 and len(fake.pending) == 1


def test_clear_forgets_everything(fake, clock):
    cache = make(fake, clock)
    result_of(cache.resolve("alice@example.test"))
    result_of(cache.resolve("nobody@example.test"))
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 3


def test_request_in_flight_at_clear_is_answered_not_cached(fake, clock):
    cache = make(fake, clock)
    fake.slow = True
    old = cache.resolve("alice@example.test")
    cache.clear()
    new = cache.resolve("alice@example.test")  # not joined to the old request
    assert len(fake.pending) == 2
    fake.release(0)
    assert result_of(old).found and not new.called
    assert len(cache) == 0
    fake.release(1)
    assert result_of(new).found and len(cache) == 1


def test_size_bound_drops_least_recently_used(fake, clock):
    cache = make(fake, clock, max_entries=2)
    for address in ("a@example.test", "b@example.test"):
        result_of(cache.resolve(address))
    result_of(cache.resolve("a@example.test"))  # a is now the most recent
    result_of(cache.resolve("c@example.test"))  # evicts b
    assert len(cache) == 2
    before = len(resolves(fake))
    result_of(cache.resolve("a@example.test"))
    assert len(resolves(fake)) == before
    result_of(cache.resolve("b@example.test"))
    assert len(resolves(fake)) == before + 1


def test_zero_ttl_disables_caching_but_still_shares(fake, clock):
    cache = make(fake, clock, positive_ttl=0, negative_ttl=0)
    result_of(cache.resolve("alice@example.test"))
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 2 and len(cache) == 0
    fake.slow = True
    ds = [cache.resolve("alice@example.test") for _ in range(3)]
    assert len(fake.pending) == 1
    fake.release(0)
    assert all(result_of(d).found for d in ds)


def test_zero_entries_caches_nothing(fake, clock):
    cache = make(fake, clock, max_entries=0)
    result_of(cache.resolve("alice@example.test"))
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        CachingDirectory(FakeDirectory(), positive_ttl=-1)
    with pytest.raises(ValueError):
        CachingDirectory(FakeDirectory(), max_entries=-1)


def test_authenticate_is_never_cached(fake, clock):
    cache = make(fake, clock)
    assert result_of(cache.authenticate("alice", "alice-password")).login == "alice"
    fake.passwords["alice"] = "changed"
    assert result_of(cache.authenticate("alice", "alice-password")) is None
    assert result_of(cache.authenticate("alice", "changed")) == Account("alice", "alice")
    assert len([c for c in fake.calls if c[0] == "authenticate"]) == 3
    fake.down = True
    failure_of(cache.authenticate("alice", "changed")).trap(DirectoryUnavailable)


def test_default_clock_is_the_global_reactor_at_call_time(fake, monkeypatch):
    import twisted.internet

    cache = CachingDirectory(fake)  # no reactor needed to build it
    fake_reactor = task.Clock()
    monkeypatch.setattr(twisted.internet, "reactor", fake_reactor, raising=False)
    result_of(cache.resolve("alice@example.test"))
    fake_reactor.advance(61)
    result_of(cache.resolve("alice@example.test"))
    assert len(resolves(fake)) == 2


def test_close_clears_and_closes_the_wrapped_directory(fake, clock):
    closed = []
    fake.close = lambda: closed.append(True)
    cache = make(fake, clock)
    result_of(cache.resolve("alice@example.test"))
    cache.close()
    assert closed == [True] and len(cache) == 0


class DomainDirectory(FakeDirectory):
    """A FakeDirectory with the newer IDirectory methods."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.domains = {"example.test"}

    def is_local_domain(self, domain):
        self.calls.append(("is_local_domain", domain))
        if self.down:
            return defer.fail(DirectoryUnavailable("fake outage"))
        return defer.succeed(domain.lower() in self.domains)

    def senders_for(self, login):
        self.calls.append(("senders_for", login))
        return defer.succeed(frozenset({f"{login}@example.test"}))


def test_is_local_domain_is_cached_with_both_ttls(clock):
    fake = DomainDirectory()
    cache = make(fake, clock, positive_ttl=60, negative_ttl=10)
    assert result_of(cache.is_local_domain("Example.Test.")) is True
    assert result_of(cache.is_local_domain("example.test")) is True
    assert result_of(cache.is_local_domain("elsewhere.test")) is False
    clock.advance(10)
    assert result_of(cache.is_local_domain("elsewhere.test")) is False
    assert result_of(cache.is_local_domain("example.test")) is True
    domain_calls = [c for c in fake.calls if c[0] == "is_local_domain"]
    assert [c[1] for c in domain_calls] == ["example.test", "elsewhere.test", "elsewhere.test"]
    fake.down = True
    failure_of(cache.is_local_domain("other.test")).trap(DirectoryUnavailable)


def test_domains_and_addresses_do_not_collide(clock):
    fake = DomainDirectory({"example.test": ("x@example.test",)})
    cache = make(fake, clock)
    assert result_of(cache.is_local_domain("example.test")) is True
    assert isinstance(result_of(cache.resolve("example.test")), Resolution)


def test_senders_for_cached_for_the_positive_ttl(clock):
    """One search per login within the TTL; after it, and after clear(), asked again."""
    fake = DomainDirectory()
    cache = make(fake, clock)
    assert result_of(cache.senders_for("bob")) == frozenset({"bob@example.test"})
    assert result_of(cache.senders_for("bob")) == frozenset({"bob@example.test"})
    asked = lambda: [c for c in fake.calls if c[0] == "senders_for"]  # noqa: E731
    assert asked() == [("senders_for", "bob")]
    clock.advance(cache.positive_ttl + 1)
    result_of(cache.senders_for("bob"))
    assert len(asked()) == 2
    cache.clear()
    result_of(cache.senders_for("bob"))
    assert len(asked()) == 3


def test_missing_newer_methods_fail_cleanly(clock):
    class OldDirectory:
        """A directory from before is_local_domain and senders_for."""

        def resolve(self, address):
            return defer.succeed(Resolution(address=address))

    cache = make(OldDirectory(), clock)
    assert not result_of(cache.resolve("a@example.test")).found
    failure_of(cache.is_local_domain("example.test")).trap(NotImplementedError)
    failure_of(cache.senders_for("alice")).trap(NotImplementedError)


def test_ttlcache_expiry_and_bound():
    c = TTLCache(2)
    c.put("a", 1, 5, now=0)
    assert c.get("a", now=4.9) == 1
    assert c.get("a", now=5) is None and len(c) == 0
    c.put("a", 1, 5, 0)
    c.put("b", 2, 5, 0)
    c.put("c", 3, 5, 0)
    assert len(c) == 2 and c.get("b", 0) == 2 and c.get("c", 0) == 3
    assert c.get("a", 0, default="miss") == "miss"
