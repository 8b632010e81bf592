# -*- test-case-name: tests.unit.test_submission -*-
"""Logging users in: SASL credentials checked through twisted.cred.

:class:`Authenticator` takes the :class:`~mailserver.sasl.Credentials` a
protocol core collected and answers with a reply: ``235 2.7.0`` and the
session's login and allowed senders set; ``535 5.7.8`` for a wrong password
or an unknown login alike; ``454 4.7.0`` when the directory cannot answer
(never a 5xx); ``421 4.7.0`` once the failed-login throttle blocks the
client or the account.

Timing: a failure is answered ``delay`` seconds (the throttle's, growing
with the failures) after the attempt *started*, not after the directory
answered, so a wrong password (search and bind) and an unknown login (a
search only) take the same time as seen by the client.  Time comes from the
injected clock.
"""

from __future__ import annotations

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.logger import Logger

from mailserver import reply as R
from mailserver.errors import ReplyError

log = Logger(namespace="mailserver.auth")


def _printable(text: str) -> str:
    """A login as typed, safe for a log line."""
    return "".join(c if c.isprintable() and not c.isspace() else "?" for c in text)[:256]


class Authenticator:
    """Checks credentials with ``checker`` (an ``ICredentialsChecker``, the
    directory's), slowed and stopped by ``throttle`` (an ``ILoginThrottle``);
    ``directory.senders_for`` gives the envelope senders of a login."""

    def __init__(self, checker, throttle, directory, clock, metrics=None) -> None:
        from mailserver.metrics import NO_METRICS

        self.checker = checker
        self.throttle = throttle
        self.directory = directory
        self.clock = clock
        self.metrics = metrics or NO_METRICS  # failed and blocked logins, per listener

    async def authenticate(self, session, credentials, *, senders: bool = True) -> R.Reply:
        """Log ``session`` in with ``credentials``; ``senders``: also read the
        envelope senders the login may use (submission needs them, POP3 not)."""
        typed = credentials.login
        started = self.clock.seconds()
        verdict = await self.throttle.check(session.client_key, typed)
        if verdict.blocked:
            log.info("{listener}: {client}: login blocked after too many failures: "
                     "sasl_method={mech}, sasl_username={login}", listener=session.listener,
                     client=session.client_ip, mech=credentials.mechanism,
                     login=_printable(typed))
            self.metrics.login_blocked(session.listener)
            return R.LOGIN_BLOCKED
        creds = UsernamePassword(typed.encode("utf-8"), credentials.password.encode("utf-8"))
        try:
            avatar = await self.checker.requestAvatarId(creds)
            owned = (await self.directory.senders_for(avatar.account.login)) if senders else ()
        except UnauthorizedLogin:
            verdict = await self.throttle.failed(session.client_key, typed)
            wait = verdict.delay - (self.clock.seconds() - started)
            if wait > 0:
                await task.deferLater(self.clock, wait, lambda: None)
            log.info("{listener}: {client}: authentication failed: sasl_method={mech}, "
                     "sasl_username={login}", listener=session.listener,
                     client=session.client_ip, mech=credentials.mechanism,
                     login=_printable(typed))
            self.metrics.auth_failed(session.listener)
            if verdict.blocked:
                self.metrics.login_blocked(session.listener)
            return R.LOGIN_BLOCKED if verdict.blocked else R.AUTH_FAILED
        except ReplyError as e:  # the directory is down: try again later
            await self.throttle.succeeded(session.client_key, typed)  # no guess was judged
            log.warn("{listener}: {client}: authentication unavailable: {reason}",
                     listener=session.listener, client=session.client_ip, reason=e.reason)
            return R.AUTH_TEMPORARY
        await self.throttle.succeeded(session.client_key, typed)
        session.login = avatar.account.login
        session.address = avatar.account.address
        session.senders = frozenset(s.lower() for s in owned)
        log.info("{listener}: {client}: authenticated: sasl_method={mech}, "
                 "sasl_username={login}", listener=session.listener, client=session.client_ip,
                 mech=credentials.mechanism, login=session.login)
        return R.AUTH_OK
