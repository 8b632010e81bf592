# -*- test-case-name: tests.unit.test_throttle -*-
"""Abuse limits for authenticated services: failed logins and sending rates.

Both guards read time only from an injected clock (anything with
``.seconds()``) and keep their state in memory.

:class:`LoginThrottle` slows down, then stops, password guessing (like
Dovecot's ``auth_failure_delay`` and Postfix's ``anvil``).  Attempts are
counted per client key (an IP or IPv6 /64, computed by the caller) and per
account, each forgotten ``window`` seconds later.  The account key is the
login as the directory compares it (NFKC, case folded, characters LDAP
ignores dropped), so spelling one account many ways does not give many
counters.  Every attempt counts as a failure from :meth:`LoginThrottle.check`
on, and :meth:`LoginThrottle.succeeded` takes it back: parallel attempts
cannot all pass the check before the first of them fails.  A success takes
back only its own attempt: earlier failures stay until they age out, so
logging in with one account does not wipe the guesses made from the same
address at others.  After a failure the answer waits ``min(base_delay * 2 **
(n - 1), max_delay)`` seconds, ``n`` being the larger count; when either
count reaches ``max_failures`` the verdict is *blocked* and
:meth:`LoginThrottle.check` refuses that client or account until old
failures age out.  The throttle only hears "this login failed": callers
report a wrong password and an unknown account alike, so neither delay nor
block tells an attacker which accounts exist.

:class:`RateLimiter` caps messages and recipients per authenticated login per
hour and per day (sliding windows; 0 disables a limit).  Exempt logins are
counted, for operators, but never refused.  Rates are summed into buckets
rather than kept as one timestamp per message: one bucket a minute for the
hour, one per ten minutes for the day, so a login busy all day holds at most
about 200 small buckets.  A bucket stays in its window until its last second
has aged out, so the windows err on the strict side by up to one bucket.

Memory is bounded: each table keeps at most ``max_entries`` keys, evicting the
least recently updated, so a botnet cycling addresses or names cannot grow it
(only push old counters out), and a failure counter keeps at most
``max_failures`` timestamps, as more cannot change the verdict.

Methods are ``async`` so that a multi-process server can back them with RPC to
the supervisor holding the one shared copy (DESIGN.md 9); these never wait.
"""

from __future__ import annotations

import unicodedata
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional

from zope.interface import Interface, implementer


class ILoginThrottle(Interface):
    """Decides how long to delay, or whether to refuse, login attempts."""

    def check(client: str, account: str):
        """Before a login: awaitable LoginVerdict, blocked when over the
        limit; otherwise the attempt is counted as a failure for now."""

    def failed(client: str, account: str):
        """After a failed login (counted at check): awaitable LoginVerdict
        with the delay to apply."""

    def succeeded(client: str, account: str):
        """After a successful login, or one that could not be checked (the
        directory was down): awaitable None; takes back the attempt."""


class IRateLimiter(Interface):
    """Per-login limits on submitted messages and recipients."""

    def check(login: str, recipients: int):
        """Awaitable RateVerdict for the first limit one more message would
        exceed, or None when it is allowed."""

    def record(login: str, recipients: int):
        """Awaitable None: count one message with that many recipients."""

    def usage(login: str):
        """Awaitable dict of the login's current counts."""

    def snapshot():
        """Awaitable dict mapping every login with any usage to its counts."""


@dataclass(frozen=True)
class LoginVerdict:
    delay: float  # seconds to wait before answering the failure (0 when none)
    blocked: bool  # refuse and disconnect (SMTP 421 4.7.0, POP3 -ERR [SYS/TEMP])


@dataclass(frozen=True)
class RateVerdict:
    limit: str  # the limit that would be exceeded, e.g. "messages_per_hour"
    value: int  # its configured value
    current: int  # what that window already counts
    retry_after: float  # seconds until enough has left the window to fit


@dataclass(frozen=True)
class RateLimits:
    messages_per_hour: int = 200
    messages_per_day: int = 1000
    recipients_per_hour: int = 1000
    recipients_per_day: int = 5000
    # 0 means no limit for that one.


_ALLOWED = LoginVerdict(delay=0.0, blocked=False)


class _Counters:
    """Failure timestamps per key, each forgotten after ``window`` seconds."""

    def __init__(self, window: float, keep: int, max_entries: int):
        self._window = window
        self._keep = keep
        self._max_entries = max_entries
        self._entries: "OrderedDict[str, Deque[float]]" = OrderedDict()

    def count(self, key: str, now: float) -> int:
        times = self._entries.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._entries[key]
        return len(times)

    def add(self, key: str, now: float) -> int:
        self.count(key, now)
        times = self._entries.pop(key, None)
        if times is None:
            times = deque(maxlen=self._keep)
        times.append(now)
        self._entries[key] = times  # most recently updated last
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return len(times)

    def clear(self, key: str) -> None:
        self._entries.pop(key, None)

    def remove_latest(self, key: str) -> None:
        """Take back the newest entry (an attempt that turned out fine)."""
        times = self._entries.get(key)
        if times:
            times.pop()
            if not times:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)


@implementer(ILoginThrottle)
class LoginThrottle:
    """In-memory failed-login throttle; see the module docstring."""

    def __init__(self, clock, *, base_delay: float = 2.0,
                 max_delay: float = 15.0, max_failures: int = 10,
                 window: float = 900.0, max_entries: int = 100000):
        if max_failures < 1 or max_entries < 1:
            raise ValueError("max_failures and max_entries must be positive")
        self._clock = clock
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._max_failures = max_failures
        self.clients = _Counters(window, max_failures, max_entries)
        self.accounts = _Counters(window, max_failures, max_entries)

    async def check(self, client: str, account: str) -> LoginVerdict:
        """Before an attempt: refused when the client or the account is at
        the limit; otherwise the attempt is counted now as a failure, until
        :meth:`succeeded` takes it back, so that parallel attempts cannot
        all pass before the first of them fails."""
        now = self._clock.seconds()
        account = _account_key(account)
        n = self.clients.count(client, now)
        if account:
            n = max(n, self.accounts.count(account, now))
        if n >= self._max_failures:
            return LoginVerdict(delay=0.0, blocked=True)
        self.clients.add(client, now)
        if account:
            self.accounts.add(account, now)
        return _ALLOWED

    async def failed(self, client: str, account: str) -> LoginVerdict:
        """After a failed attempt (already counted by :meth:`check`): the
        delay before answering, and whether to hang up."""
        now = self._clock.seconds()
        account = _account_key(account)
        n = max(self.clients.count(client, now), 1)
        if account:
            n = max(n, self.accounts.count(account, now))
        # Cap the exponent: the delay saturates long before it could overflow.
        delay = min(self._base_delay * 2.0 ** min(n - 1, 64), self._max_delay)
        return LoginVerdict(delay=delay, blocked=n >= self._max_failures)

    async def succeeded(self, client: str, account: str) -> None:
        """Take back the attempt :meth:`check` counted.  Earlier failures
        stay until they age out: a login with one account must not wipe the
        record of guesses made from the same address at other accounts, nor
        the account owner's login the guesses made at their account."""
        self.clients.remove_latest(client)
        account = _account_key(account)
        if account:
            self.accounts.remove_latest(account)


# Characters LDAP's string preparation (RFC 4518 2.2, after RFC 3454 B.1)
# maps to nothing: "ali\u00adce" is alice to the directory.
_MAPPED_TO_NOTHING = dict.fromkeys(
    [0x00AD, 0x034F, 0x1806, 0x180B, 0x180C, 0x180D, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF]
    + list(range(0xFE00, 0xFE10)))


def _account_key(login: str) -> str:
    """The account a typed login counts against: compared as the directory
    compares it (NFKC, case folded, ignorable characters dropped), so that
    "ＡＬＩＣＥ" or "ali\u00adce" are not fresh counters for alice."""
    text = unicodedata.normalize("NFKC", login.translate(_MAPPED_TO_NOTHING))
    return unicodedata.normalize("NFKC", text.casefold()).strip()


def _normal(login: str) -> str:
    return login.strip().lower()


class _Window:
    """A sliding window of (messages, recipients) summed into time buckets."""

    def __init__(self, length: float, bucket: float):
        self.length = length
        self.bucket = bucket
        self.buckets: Deque[List[int]] = deque()  # [index, messages, rcpts]
        self.messages = 0
        self.recipients = 0

    def prune(self, now: float) -> None:
        while self.buckets and self._leaves(self.buckets[0]) <= now:
            _, messages, recipients = self.buckets.popleft()
            self.messages -= messages
            self.recipients -= recipients

    def add(self, now: float, recipients: int, messages: int = 1) -> None:
        index = int(now // self.bucket)
        if self.buckets and self.buckets[-1][0] == index:
            self.buckets[-1][1] += messages
            self.buckets[-1][2] += recipients
        else:
            self.buckets.append([index, messages, recipients])
        self.messages += messages
        self.recipients += recipients

    def retry_after(self, now: float, field: int, excess: int) -> float:
        """Seconds until at least ``excess`` of ``field`` has left the window;
        the whole window length when even an empty window would not do."""
        freed = 0
        for entry in self.buckets:
            freed += entry[field]
            if freed >= excess:
                return self._leaves(entry) - now
        return self.length

    def _leaves(self, entry: List[int]) -> float:
        return (entry[0] + 1) * self.bucket + self.length


class _Usage:
    def __init__(self):
        self.hour = _Window(3600.0, 60.0)
        self.day = _Window(86400.0, 600.0)

    def prune(self, now: float) -> None:
        self.hour.prune(now)
        self.day.prune(now)

    def as_dict(self) -> Dict[str, int]:
        return {
            "messages_hour": self.hour.messages,
            "messages_day": self.day.messages,
            "recipients_hour": self.hour.recipients,
            "recipients_day": self.day.recipients,
        }


_MESSAGES, _RECIPIENTS = 1, 2  # field positions in a bucket


@implementer(IRateLimiter)
class RateLimiter:
    """In-memory per-login rate limiter; see the module docstring."""

    def __init__(self, clock, limits: RateLimits = RateLimits(), *,
                 exempt: frozenset = frozenset(), max_entries: int = 100000):
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._clock = clock
        self._limits = limits
        self._exempt = frozenset(_normal(login) for login in exempt)
        self._max_entries = max_entries
        self._entries: "OrderedDict[str, _Usage]" = OrderedDict()

    async def check(self, login: str, recipients: int,
                    messages: int = 1) -> Optional[RateVerdict]:
        """The first limit one more message (``messages=0``: only more
        recipients, as at RCPT) with ``recipients`` would pass, or None."""
        login = _normal(login)
        if login in self._exempt:
            return None
        now = self._clock.seconds()
        usage = self._current(login, now) or _Usage()
        limits = self._limits
        rules = [
            ("messages_per_hour", limits.messages_per_hour, usage.hour, _MESSAGES, messages),
            ("messages_per_day", limits.messages_per_day, usage.day, _MESSAGES, messages),
            ("recipients_per_hour", limits.recipients_per_hour, usage.hour,
             _RECIPIENTS, recipients),
            ("recipients_per_day", limits.recipients_per_day, usage.day,
             _RECIPIENTS, recipients),
        ]
        for name, value, window, field, adding in rules:
            current = window.messages if field == _MESSAGES else window.recipients
            if value and current + adding > value:
                excess = current + adding - value
                return RateVerdict(
                    limit=name, value=value, current=current,
                    retry_after=window.retry_after(now, field, excess),
                )
        return None

    async def record(self, login: str, recipients: int, messages: int = 1) -> None:
        """Count ``messages`` more messages and ``recipients`` more recipients."""
        login = _normal(login)
        now = self._clock.seconds()
        usage = self._entries.pop(login, None) or _Usage()
        usage.prune(now)
        usage.hour.add(now, recipients, messages)
        usage.day.add(now, recipients, messages)
        self._entries[login] = usage  # most recently updated last
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def usage(self, login: str) -> Dict[str, int]:
        usage = self._current(_normal(login), self._clock.seconds())
        return (usage or _Usage()).as_dict()

    async def snapshot(self) -> Dict[str, Dict[str, int]]:
        now = self._clock.seconds()
        result = {}
        for login in list(self._entries):
            usage = self._current(login, now)
            if usage is not None:
                result[login] = usage.as_dict()
        return result

    def __len__(self) -> int:
        return len(self._entries)

    def _current(self, login: str, now: float) -> Optional[_Usage]:
        """The login's pruned usage, or None (forgetting it) when empty."""
        usage = self._entries.get(login)
        if usage is None:
            return None
        usage.prune(now)
        if not usage.day.buckets:
            del self._entries[login]
            return None
        return usage
