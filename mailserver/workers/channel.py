# -*- test-case-name: tests.unit.test_workers -*-
"""The AMP conversation between a worker and its supervisor.

Each worker holds one end of a UNIX socket pair the supervisor made for it
(no file in the file system, so nothing else can connect).  The worker
calls; the supervisor answers from the one copy of the state that must hold
across workers:

* :class:`Ready`: the worker adopted its listening sockets and serves.
* :class:`Wake`: the worker queued a message; the supervisor runs the queue.
* :class:`LoginCheck`, :class:`LoginFailed`, :class:`LoginSucceeded`: the
  failed-login throttle (:class:`~mailserver.throttle.LoginThrottle`).
* :class:`RateCheck`, :class:`RateRecord`: the per-login sending rates
  (:class:`~mailserver.throttle.RateLimiter`).
* :class:`ConnectionOpen`, :class:`ConnectionClose`: the listeners'
  connection limits and connection rates
  (:mod:`mailserver.protocols.limits`).  The supervisor remembers which
  worker holds which slots and frees them when that worker's channel closes
  (the worker died), so a crash never leaks a slot.

:class:`SupervisorState` is the supervisor's side; :class:`WorkerChannel`
the worker's, which gives the listeners the same interfaces they use in one
process (:class:`RemoteLoginThrottle`, :class:`RemoteRateLimiter`).  When
the channel is down or slow every answer fails safe: a login is refused
with the temporary "blocked" reply, a message with the temporary rate-limit
reply, a connection with 421; never an open door, never a 5xx.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailserver import reply as R
from mailserver.throttle import LoginVerdict, RateVerdict
from mailserver.workers.metrics import MetricsReport

log = Logger(namespace="mailserver")

#: Seconds a worker waits for the supervisor before failing safe.
CALL_TIMEOUT = 5.0



class OneProtocol(protocol.Factory):
    """Builds the one channel protocol given, for ``adoptStreamConnection``
    of a socket pair's end."""

    noisy = False

    def __init__(self, proto) -> None:
        self.proto = proto

    def buildProtocol(self, addr):
        return self.proto

class Ready(amp.Command):
    arguments = [(b"pid", amp.Integer())]
    response = []


class Wake(amp.Command):
    arguments = []
    response = []
    requiresAnswer = False


class _Login(amp.Command):
    arguments = [(b"client", amp.Unicode()), (b"account", amp.Unicode())]
    response = [(b"delay", amp.Float()), (b"blocked", amp.Boolean())]


class LoginCheck(_Login):
    pass


class LoginFailed(_Login):
    pass


class LoginSucceeded(amp.Command):
    arguments = [(b"client", amp.Unicode()), (b"account", amp.Unicode())]
    response = []


class RateCheck(amp.Command):
    arguments = [(b"login", amp.Unicode()), (b"recipients", amp.Integer()),
                 (b"messages", amp.Integer())]
    # limit "" = allowed
    response = [(b"limit", amp.Unicode()), (b"value", amp.Integer()),
                (b"current", amp.Integer()), (b"retry_after", amp.Float())]


class RateRecord(amp.Command):
    arguments = [(b"login", amp.Unicode()), (b"recipients", amp.Integer()),
                 (b"messages", amp.Integer())]
    response = []


class ConnectionOpen(amp.Command):
    arguments = [(b"listener", amp.Unicode()), (b"key", amp.Unicode()), (b"ip", amp.Unicode())]
    # refusal: "" (counted: release it later), "rate", "total" or "client"
    response = [(b"refusal", amp.Unicode())]


class ConnectionClose(amp.Command):
    arguments = [(b"listener", amp.Unicode()), (b"key", amp.Unicode())]
    response = []
    requiresAnswer = False


class _QuietAMP(amp.AMP):
    """AMP without its two log lines per connection (the supervisor logs the
    workers' starts and ends itself)."""

    def makeConnection(self, transport):
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


# -- the supervisor's side -------------------------------------------------------
class SupervisorState:
    """The shared state: one throttle, one rate limiter, and per listener one
    :class:`~mailserver.protocols.limits.ConnectionLimiter` and one
    :class:`~mailserver.protocols.limits.ConnectionRateLimiter`
    (``limits``: listener name -> that pair)."""

    def __init__(self, clock, throttle, rate_limiter, limits: Dict[str, tuple],
                 wake=lambda: None, ready=lambda worker, pid: None, metrics=None) -> None:
        self.clock = clock
        self.throttle = throttle
        self.rate_limiter = rate_limiter
        self.limits = limits
        self.wake = wake
        self.ready = ready
        self.metrics = metrics  # workers.metrics.Aggregate, when [metrics] is on

    def open(self, held: Dict[Tuple[str, str], int], listener: str, key: str, ip: str) -> str:
        pair = self.limits.get(listener)
        if pair is None:
            return "total"  # not a listener of ours: refuse
        limiter, rate = pair
        if rate is not None and not rate.allow(key, self.clock.seconds(), ip):
            return "rate"
        refusal = limiter.acquire(key)
        if refusal is not None:
            return "total" if refusal is R.TOO_MANY_CONNECTIONS else "client"
        held[(listener, key)] = held.get((listener, key), 0) + 1
        return ""

    def close(self, held: Dict[Tuple[str, str], int], listener: str, key: str) -> None:
        n = held.get((listener, key), 0)
        if not n:
            return  # not held (a duplicate close): counting it would free another's slot
        if n == 1:
            del held[(listener, key)]
        else:
            held[(listener, key)] = n - 1
        self.limits[listener][0].release(key)

    def release_all(self, held: Dict[Tuple[str, str], int]) -> None:
        """A worker went away: free every slot it held."""
        for (listener, key), n in list(held.items()):
            for _ in range(n):
                self.limits[listener][0].release(key)
        held.clear()


class SupervisorChannel(_QuietAMP):
    """The supervisor's end of one worker's channel."""

    def __init__(self, state: SupervisorState, worker=None) -> None:
        super().__init__()
        self.shared = state
        self.worker = worker  # the supervisor's handle on the process (or None)
        self.held: Dict[Tuple[str, str], int] = {}

    @Ready.responder
    def ready(self, pid):
        self.shared.ready(self.worker, pid)
        return {}

    @Wake.responder
    def wake(self):
        self.shared.wake()
        return {}

    @MetricsReport.responder
    def metrics_report(self, samples):
        if self.shared.metrics is not None:
            self.shared.metrics.report(self.worker, samples)
        return {}

    @LoginCheck.responder
    async def login_check(self, client, account):
        v = await self.shared.throttle.check(client, account)
        return {"delay": float(v.delay), "blocked": v.blocked}

    @LoginFailed.responder
    async def login_failed(self, client, account):
        v = await self.shared.throttle.failed(client, account)
        return {"delay": float(v.delay), "blocked": v.blocked}

    @LoginSucceeded.responder
    async def login_succeeded(self, client, account):
        await self.shared.throttle.succeeded(client, account)
        return {}

    @RateCheck.responder
    async def rate_check(self, login, recipients, messages):
        v = await self.shared.rate_limiter.check(login, recipients, messages=messages)
        if v is None:
            return {"limit": "", "value": 0, "current": 0, "retry_after": 0.0}
        return {"limit": v.limit, "value": v.value, "current": v.current,
                "retry_after": float(v.retry_after)}

    @RateRecord.responder
    async def rate_record(self, login, recipients, messages):
        await self.shared.rate_limiter.record(login, recipients, messages=messages)
        return {}

    @ConnectionOpen.responder
    def connection_open(self, listener, key, ip):
        return {"refusal": self.shared.open(self.held, listener, key, ip)}

    @ConnectionClose.responder
    def connection_close(self, listener, key):
        self.shared.close(self.held, listener, key)
        return {}

    def connectionLost(self, reason):
        self.shared.release_all(self.held)
        super().connectionLost(reason)
        lost = getattr(self.worker, "channel_lost", None)
        if lost is not None:
            lost()


# -- the worker's side -----------------------------------------------------------
class WorkerChannel(_QuietAMP):
    """The worker's end: calls with a timeout, and fail-safe answers."""

    def __init__(self, clock, timeout: float = CALL_TIMEOUT, on_lost=lambda: None) -> None:
        super().__init__()
        self.clock = clock
        self.timeout = timeout
        self.on_lost = on_lost
        self.up = False
        self.login_throttle = RemoteLoginThrottle(self)
        self.rate_limiter = RemoteRateLimiter(self)

    def connectionMade(self):
        super().connectionMade()
        self.up = True

    def connectionLost(self, reason):
        self.up = False
        super().connectionLost(reason)
        self.on_lost()

    async def call(self, command, late=None, **kw):
        """The answer, or an exception when the channel is down or too slow.
        An answer that comes after the timeout goes to ``late`` (so a
        connection slot counted too late can be given back)."""
        if not self.up:
            raise ConnectionError("supervisor channel is down")
        waiting = defer.Deferred()

        def answered(result):
            if not waiting.called:
                waiting.callback(result)  # a Failure errbacks
            elif late is not None and not isinstance(result, Failure):
                late(result)

        def too_slow():
            if not waiting.called:
                waiting.errback(TimeoutError(f"no answer in {self.timeout} s"))

        self.callRemote(command, **kw).addBoth(answered)
        timer = self.clock.callLater(self.timeout, too_slow)
        try:
            return await waiting
        finally:
            if timer.active():
                timer.cancel()

    def send(self, command, **kw) -> None:
        """A call nobody waits for (Wake, ConnectionClose)."""
        if self.up:
            try:
                self.callRemote(command, **kw)
            except Exception:
                log.failure("cannot reach the supervisor")

    def wake(self) -> None:
        self.send(Wake)


def _down(what: str, failure) -> None:
    log.error("supervisor unreachable ({what}), failing safe: {e}", what=what, e=failure)


class RemoteLoginThrottle:
    """:class:`~mailserver.throttle.ILoginThrottle` answered by the supervisor."""

    _UNSURE = LoginVerdict(delay=0.0, blocked=True)

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    async def check(self, client: str, account: str) -> LoginVerdict:
        return await self._verdict(LoginCheck, "login check", client, account)

    async def failed(self, client: str, account: str) -> LoginVerdict:
        return await self._verdict(LoginFailed, "failed login", client, account)

    async def _verdict(self, command, what: str, client: str, account: str) -> LoginVerdict:
        try:
            r = await self.channel.call(command, client=client, account=account)
        except Exception as e:
            _down(what, e)
            return self._UNSURE
        return LoginVerdict(delay=r["delay"], blocked=r["blocked"])

    async def succeeded(self, client: str, account: str) -> None:
        try:
            await self.channel.call(LoginSucceeded, client=client, account=account)
        except Exception as e:
            _down("login", e)


class RemoteRateLimiter:
    """The submission rate limits (:class:`~mailserver.throttle.IRateLimiter`'s
    check and record) answered by the supervisor."""

    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    async def check(self, login: str, recipients: int, messages: int = 1) -> Optional[RateVerdict]:
        try:
            r = await self.channel.call(RateCheck, login=login, recipients=recipients,
                                        messages=messages)
        except Exception as e:
            _down("rate check", e)
            return RateVerdict(limit="supervisor unreachable", value=0, current=0,
                               retry_after=60.0)
        if not r["limit"]:
            return None
        return RateVerdict(limit=r["limit"], value=r["value"], current=r["current"],
                           retry_after=r["retry_after"])

    async def record(self, login: str, recipients: int, messages: int = 1) -> None:
        try:
            await self.channel.call(RateRecord, login=login, recipients=recipients,
                                    messages=messages)
        except Exception as e:
            _down("rate record", e)
