"""Failed-login throttle and per-login rate limits, on a fake clock."""

import pytest
from twisted.internet import task
from zope.interface.verify import verifyObject

from mailserver.throttle import (
    ILoginThrottle,
    IRateLimiter,
    LoginThrottle,
    LoginVerdict,
    RateLimiter,
    RateLimits,
    RateVerdict,
)


def run(coro):
    """Drive a coroutine that never waits to its result."""
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    return stop.value.value


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def throttle(clock):
    return LoginThrottle(clock)


def fail(throttle, client, account, times=1):
    """Make several failed attempts (check, then failed, as a protocol does)
    and return the last verdict."""
    for _ in range(times):
        verdict = run(throttle.check(client, account))
        if not verdict.blocked:
            verdict = run(throttle.failed(client, account))
    return verdict


def test_interfaces_provided(clock):
    """Both in-memory implementations provide their interfaces."""
    assert verifyObject(ILoginThrottle, LoginThrottle(clock))
    assert verifyObject(IRateLimiter, RateLimiter(clock))


def test_fresh_client_allowed(throttle):
    """A client and account with no failures may try, without delay."""
    assert run(throttle.check("192.0.2.1", "alice")) == LoginVerdict(0.0, False)


def test_delays_grow_then_cap(throttle):
    """Successive failures are delayed 2, 4, 8, then 15 seconds at most."""
    delays = [fail(throttle, "192.0.2.1", "alice").delay for _ in range(5)]
    assert delays == [2.0, 4.0, 8.0, 15.0, 15.0]


def test_account_counted_across_clients(throttle):
    """Failures for one account add up even from different client keys."""
    for i in range(3):
        verdict = fail(throttle, f"192.0.2.{i}", "alice")
    assert verdict.delay == 8.0


def test_client_counted_across_accounts(throttle):
    """Failures from one client add up even for different accounts."""
    for name in ("alice", "bob", "carol"):
        verdict = fail(throttle, "192.0.2.1", name)
    assert verdict.delay == 8.0


def test_block_at_max_failures(throttle):
    """The tenth failure blocks, and check() then refuses the client and account."""
    assert not fail(throttle, "192.0.2.1", "alice", times=9).blocked
    assert fail(throttle, "192.0.2.1", "alice").blocked
    assert run(throttle.check("192.0.2.1", "someone")) == LoginVerdict(0.0, True)
    assert run(throttle.check("198.51.100.7", "alice")).blocked
    assert not run(throttle.check("198.51.100.7", "bob")).blocked


def test_window_expiry_restores(clock, throttle):
    """Failures older than the window are forgotten, lifting a block."""
    fail(throttle, "192.0.2.1", "alice", times=10)
    clock.advance(899)
    assert run(throttle.check("192.0.2.1", "alice")).blocked
    clock.advance(1)
    assert fail(throttle, "192.0.2.1", "alice").delay == 2.0


def test_window_slides_per_failure(clock, throttle):
    """Each failure expires on its own, so the count falls one at a time."""
    fail(throttle, "192.0.2.1", "alice")
    clock.advance(600)
    fail(throttle, "192.0.2.1", "alice")
    clock.advance(300)
    assert fail(throttle, "192.0.2.1", "alice").delay == 4.0


def test_success_takes_back_only_its_own_attempt(throttle):
    """A successful login is not counted, but earlier failures stay: logging
    in with a valid account does not wipe the guesses made before."""
    fail(throttle, "192.0.2.1", "alice", times=5)
    assert not run(throttle.check("192.0.2.1", "bob")).blocked
    run(throttle.succeeded("192.0.2.1", "bob"))
    assert len(throttle.accounts) == 1  # bob's attempt taken back, alice's failures kept
    assert fail(throttle, "192.0.2.1", "carol").delay == 15.0  # the client's sixth


def test_parallel_attempts_count_before_they_fail(throttle):
    """Attempts count from check() on, so a burst of parallel tries cannot
    all pass the check before the first failure is recorded."""
    passed = [not run(throttle.check("192.0.2.1", "alice")).blocked for _ in range(25)]
    assert passed.count(True) == 10


@pytest.mark.parametrize("spelling", ["ＡＬＩＣＥ", "ali\u00adce", "Alice\u200b", "aLiCe"])
def test_account_spellings_share_a_counter(throttle, spelling):
    """Spellings the directory treats as the same login (width, case,
    ignorable characters) count against one account."""
    fail(throttle, "192.0.2.1", "alice")
    assert fail(throttle, "192.0.2.2", spelling).delay == 4.0


def test_account_case_insensitive(throttle):
    """Account names are lower-cased and stripped before counting."""
    fail(throttle, "192.0.2.1", "Alice")
    assert fail(throttle, "192.0.2.2", " ALICE ").delay == 4.0
    assert list(throttle.accounts._entries) == ["alice"]


def test_empty_account_counts_per_client_only(throttle):
    """A failure without a login counts against the client only."""
    fail(throttle, "192.0.2.1", "", times=10)
    assert len(throttle.accounts) == 0
    assert run(throttle.check("192.0.2.1", "")).blocked
    assert not run(throttle.check("192.0.2.2", "")).blocked


def test_memory_bounded(clock):
    """Past max_entries the least recently failed keys are evicted."""
    throttle = LoginThrottle(clock, max_entries=100)
    for i in range(250):
        fail(throttle, f"10.0.{i // 256}.{i % 256}", f"user{i}")
    assert len(throttle.clients) == 100
    assert len(throttle.accounts) == 100
    assert not run(throttle.check("10.0.0.0", "user0")).blocked
    assert fail(throttle, "10.0.0.249", "user249").delay == 4.0


def test_counter_keeps_at_most_max_failures(throttle):
    """A hammered key keeps no more timestamps than max_failures."""
    fail(throttle, "192.0.2.1", "alice", times=1000)
    assert len(throttle.clients._entries["192.0.2.1"]) == 10


# Rate limiter.

SMALL = RateLimits(messages_per_hour=3, messages_per_day=5,
                   recipients_per_hour=10, recipients_per_day=20)


def send(limiter, login, recipients=1, times=1):
    for _ in range(times):
        assert run(limiter.check(login, recipients)) is None
        run(limiter.record(login, recipients))


def test_messages_per_hour(clock):
    """The fourth message in an hour is refused until the first leaves the window."""
    limiter = RateLimiter(clock, SMALL)
    send(limiter, "alice", times=3)
    verdict = run(limiter.check("alice", 1))
    assert verdict == RateVerdict("messages_per_hour", 3, 3, 3660.0)
    clock.advance(3659)
    assert run(limiter.check("alice", 1)).limit == "messages_per_hour"
    clock.advance(1)
    assert run(limiter.check("alice", 1)) is None


def test_messages_per_day(clock):
    """Spread over hours, messages still stop at the daily limit."""
    limiter = RateLimiter(clock, SMALL)
    for _ in range(5):
        send(limiter, "alice")
        clock.advance(3600)
    verdict = run(limiter.check("alice", 1))
    assert (verdict.limit, verdict.value, verdict.current) == ("messages_per_day", 5, 5)
    # The first message (bucket [0, 600)) leaves the day at 87000 seconds.
    assert verdict.retry_after == 87000 - clock.seconds()
    clock.advance(verdict.retry_after)
    assert run(limiter.check("alice", 1)) is None


def test_recipients_per_hour(clock):
    """A message whose recipients would pass the hourly total is refused."""
    limiter = RateLimiter(clock, SMALL)
    send(limiter, "alice", recipients=4)
    clock.advance(120)
    send(limiter, "alice", recipients=4)
    assert run(limiter.check("alice", 2)) is None
    verdict = run(limiter.check("alice", 3))
    assert verdict == RateVerdict("recipients_per_hour", 10, 8, 3540.0)


def test_retry_after_waits_for_enough_to_leave(clock):
    """retry_after waits until enough old recipients have left to fit the message."""
    limiter = RateLimiter(clock, SMALL)
    send(limiter, "alice", recipients=2)
    clock.advance(60)
    send(limiter, "alice", recipients=8)
    verdict = run(limiter.check("alice", 5))
    assert (verdict.limit, verdict.current) == ("recipients_per_hour", 10)
    assert verdict.retry_after == 3660.0  # the second bucket must go too


def test_recipients_per_day(clock):
    """Recipients stop at the daily limit even when each hour is within its own."""
    limiter = RateLimiter(clock, SMALL)
    for _ in range(2):
        send(limiter, "alice", recipients=10)
        clock.advance(3660)
    assert run(limiter.check("alice", 1)).limit == "recipients_per_day"


def test_exempt_logins(clock):
    """Exempt logins are never refused but their usage is still counted."""
    limiter = RateLimiter(clock, SMALL, exempt=frozenset({"relay"}))
    send(limiter, "Relay", recipients=50, times=20)
    assert run(limiter.usage("relay"))["messages_hour"] == 20


def test_zero_means_unlimited(clock):
    """A limit of 0 is never enforced, while the others still are."""
    limits = RateLimits(messages_per_hour=0, messages_per_day=0,
                        recipients_per_hour=0, recipients_per_day=100)
    limiter = RateLimiter(clock, limits)
    send(limiter, "alice", times=99)
    assert run(limiter.check("alice", 2)).limit == "recipients_per_day"


def test_login_case_insensitive(clock):
    """Logins are lower-cased, so all spellings share one count."""
    limiter = RateLimiter(clock, SMALL)
    send(limiter, "Alice")
    send(limiter, "ALICE")
    assert run(limiter.usage("alice"))["messages_hour"] == 2


def test_usage_and_snapshot(clock):
    """usage() and snapshot() report current hourly and daily counts."""
    limiter = RateLimiter(clock, RateLimits())
    send(limiter, "alice", recipients=3)
    clock.advance(7200)
    send(limiter, "alice", recipients=2)
    send(limiter, "bob", recipients=1)
    assert run(limiter.usage("alice")) == {
        "messages_hour": 1, "messages_day": 2,
        "recipients_hour": 2, "recipients_day": 5,
    }
    assert run(limiter.usage("nobody")) == {
        "messages_hour": 0, "messages_day": 0,
        "recipients_hour": 0, "recipients_day": 0,
    }
    snapshot = run(limiter.snapshot())
    assert set(snapshot) == {"alice", "bob"}
    assert snapshot["bob"]["recipients_day"] == 1
    clock.advance(86400 + 600)
    assert run(limiter.snapshot()) == {}
    assert len(limiter) == 0


def test_rate_memory_bounded(clock):
    """Past max_entries the least recently active logins are evicted."""
    limiter = RateLimiter(clock, max_entries=10)
    for i in range(25):
        send(limiter, f"user{i}")
    assert len(limiter) == 10
    assert set(run(limiter.snapshot())) == {f"user{i}" for i in range(15, 25)}


def test_busy_day_stays_small(clock):
    """A login sending twice a minute all day keeps only a few hundred buckets."""
    limiter = RateLimiter(clock, RateLimits(0, 0, 0, 0))
    for _ in range(86400 // 30):
        run(limiter.record("alice", 1))
        clock.advance(30)
    usage = limiter._entries["alice"]
    assert len(usage.hour.buckets) <= 61
    assert len(usage.day.buckets) <= 145
    assert run(limiter.usage("alice"))["messages_day"] == 2880
