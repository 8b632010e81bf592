# -*- test-case-name: tests.unit.test_submission -*-
"""The submission service's checks (RFC 6409), as pipeline entries.

* :class:`SenderOwnership`: a logged-in user may use as envelope sender only
  an address the directory says the login owns (its addresses, aliases that
  route only to it, groups that let it send as them: ``senders_for``), else
  ``553 5.7.1`` at MAIL; by default the From: header's addresses too, else
  ``550 5.7.1`` after the data, so nobody puts a colleague's name on a
  message.  Logins in ``send_as_anyone`` are exempt (a ticket system, a
  scanner).  The null sender is allowed, as Postfix's
  ``reject_sender_login_mismatch`` allows it (vacation and delivery
  reports), but its From: header is still checked.
* :class:`RateLimit`: messages and recipients per login per hour and day
  (:class:`~mailserver.throttle.RateLimiter`); past a limit ``450 4.7.1``
  at MAIL or RCPT, logged with the figures.  Like Postfix's anvil it counts
  requests: a message when its MAIL is accepted, a recipient when its RCPT
  is, so parallel sessions of one login cannot all pass a check made before
  any of them was counted.
* :class:`SubmissionHeaders`: Message-ID and Date added when the client did
  not write them (RFC 6409 8.2, 8.3).
"""

from __future__ import annotations

import email.utils
from typing import Optional

from twisted.logger import Logger

from mailserver import reply as R
from mailserver.pipeline.acceptance import Check

log = Logger(namespace="mailserver.submission")


def header_addresses(values) -> list:
    """The addresses of address header values, lower-cased; a value that
    names no address gives ``""`` (which nobody owns)."""
    out = []
    for _name, address in email.utils.getaddresses(list(values)):
        out.append(address.strip().lower())
    return out or [""]


class SenderOwnership(Check):
    name = "sender-ownership"

    def __init__(self, *, check_from: bool = True, send_as_anyone=frozenset()) -> None:
        self.check_from = check_from
        self.send_as_anyone = frozenset(s.lower() for s in send_as_anyone)

    def _exempt(self, session) -> bool:
        return not session.authenticated or session.login.lower() in self.send_as_anyone

    async def on_mail(self, session, txn) -> Optional[R.Reply]:
        if self._exempt(session) or not txn.sender:
            return None
        if txn.sender.lower() not in session.senders:
            return R.SENDER_NOT_OWNED
        return None

    async def on_data(self, session, txn) -> Optional[R.Reply]:
        if not self.check_from or self._exempt(session):
            return None
        if "from" in txn.scanner.truncated:
            return R.FROM_NOT_OWNED  # more From: than we kept: unchecked is refused
        values = txn.scanner.fields.get("from", [])
        if not values:
            return None  # no From: at all: nothing claimed
        for address in header_addresses(values):
            if address not in session.senders:
                return R.FROM_NOT_OWNED
        return None


class RateLimit(Check):
    name = "rate-limit"

    def __init__(self, limiter) -> None:
        self.limiter = limiter  # mailserver.throttle.IRateLimiter

    async def _refuse(self, session, recipients: int, what: str) -> Optional[R.Reply]:
        # At RCPT only the recipient limits: the message passed them at MAIL.
        verdict = await self.limiter.check(session.login, recipients,
                                           messages=0 if what == "RCPT" else 1)
        if verdict is None:
            return None
        log.warn("{listener}: rate limit: {what} refused for sasl_username={login} from "
                 "{client}: {limit} = {value}, already {current}, retry after {after:.0f} s",
                 listener=session.listener, what=what, login=session.login,
                 client=session.client_ip, limit=verdict.limit, value=verdict.value,
                 current=verdict.current, after=verdict.retry_after)
        return R.RATE_LIMITED

    async def on_mail(self, session, txn) -> Optional[R.Reply]:
        if not session.authenticated:
            return None
        refusal = await self._refuse(session, 0, "MAIL")
        if refusal is None:  # counted now, so parallel sessions cannot all slip in
            await self.limiter.record(session.login, 0, messages=1)
        return refusal

    async def on_rcpt(self, session, txn, target) -> Optional[R.Reply]:
        if not session.authenticated:
            return None
        refusal = await self._refuse(session, 1, "RCPT")
        if refusal is None:
            await self.limiter.record(session.login, 1, messages=0)
        return refusal


class SubmissionHeaders(Check):
    name = "submission-headers"

    def __init__(self, hostname: str, clock) -> None:
        self.hostname = hostname
        self.clock = clock

    async def on_data(self, session, txn) -> Optional[R.Reply]:
        scanner = txn.scanner
        if not scanner.has("message-id"):
            txn.add_header("Message-ID", f"<{txn.message.queue_id}@{self.hostname}>")
        if not scanner.has("date"):
            txn.add_header("Date", email.utils.formatdate(self.clock.seconds(), localtime=False))
        return None
