# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""The acceptance pipeline: every decision about a message, with no transport.

The SMTP, submission and LMTP adapters see bytes; this module sees a
:class:`~mailserver.pipeline.session.Session` and a
:class:`~mailserver.pipeline.session.Transaction` and answers with replies:

* ``connect``, ``helo``, ``mail``, ``rcpt`` and ``end_data`` run the
  listener's :class:`Check` entries in order; the first one that returns a
  :class:`~mailserver.reply.Reply` decides, ``None`` means "no objection".
  RCPT always goes through the recipient policy first (local domains, the
  directory, relay rights), the checks after it;
* checks may add header lines to the transaction at the end of the data
  (a submission's Message-ID and Date; later Authentication-Results and
  DKIM-Signature); they go below our Received line;
* then the message is handed to the one per-recipient delivery step,
  :class:`~mailserver.delivery.recipients.RecipientDelivery`, which the queue
  uses too for the local recipients it delivers.

The 250 (or, in LMTP, each recipient's 250) is returned only once every copy
it promises is on stable storage.  This is Postfix's smtpd -> cleanup split
and maddy's check / modify / deliver stages, in one place, so a new check
(SPF, DKIM, a content filter) is one more entry in a listener's list.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from twisted.logger import Logger

from mailserver import reply as R
from mailserver.delivery.recipients import Message, RecipientDelivery, Target
from mailserver.errors import is_known
from mailserver.incoming import IncomingMessage, new_queue_id
from mailserver.pipeline.session import Session, Transaction
from mailserver.received import HeaderScanner, SessionInfo, received_header

log = Logger(namespace="mailserver.smtpd")

KEPT_HEADERS = ("from", "sender", "message-id", "date")
"""Header fields the scanner keeps for checks at the end of the data."""


class Check:
    """One entry of a listener's pipeline.  Every hook may be ``async`` and
    returns a Reply to decide or None for no objection; the base class has
    no objections.  ``accepted`` is told about each message taken in."""

    name = "check"

    async def on_connect(self, session: Session) -> Optional[R.Reply]:
        return None

    async def on_helo(self, session: Session) -> Optional[R.Reply]:
        return None

    async def on_mail(self, session: Session, txn: Transaction) -> Optional[R.Reply]:
        return None

    async def on_rcpt(self, session: Session, txn: Transaction,
                      target: Target) -> Optional[R.Reply]:
        return None

    async def on_data(self, session: Session, txn: Transaction) -> Optional[R.Reply]:
        return None

    async def accepted(self, session: Session, txn: Transaction) -> None:
        return None


class Acceptance:
    """The pipeline of one listener kind."""

    def __init__(self, *, kind: str, hostname: str, recipients, local, delivery:
                 RecipientDelivery, spool_dir: str, clock, checks: Sequence[Check] = (),
                 outbox=None, max_received: int = 50, hide_client: bool = False,
                 queue_id: Callable[[], str] = new_queue_id, etrn: bool = False,
                 authenticator=None, max_line: int = 1000, metrics=None) -> None:
        self.kind = kind
        self.lmtp = kind == "lmtp"
        self.hostname = hostname
        self.recipients = recipients  # mailserver.policy.RecipientPolicy
        self.local = local  # mailserver.delivery.local.LocalDelivery (RCPT-time store check)
        self.delivery = delivery
        self.spool_dir = spool_dir
        self.clock = clock
        self.checks = tuple(checks)
        self.outbox = outbox
        self.max_received = max_received
        self.hide_client = hide_client
        self.queue_id = queue_id
        self.etrn_enabled = etrn and outbox is not None
        self.authenticator = authenticator  # mailserver.pipeline.auth.Authenticator
        self.max_line = max_line  # the listener's text line limit
        from mailserver.metrics import NO_METRICS

        self.metrics = metrics or NO_METRICS  # mailserver.metrics.Metrics when on

    async def _run(self, hook: str, *args) -> Optional[R.Reply]:
        for check in self.checks:
            reply = await getattr(check, hook)(*args)
            if reply is not None:
                return reply
        return None

    # -- connection and envelope -------------------------------------------
    async def connect(self, session: Session) -> Optional[R.Reply]:
        return await self._run("on_connect", session)

    async def helo(self, session: Session) -> Optional[R.Reply]:
        return await self._run("on_helo", session)

    async def authenticate(self, session: Session, credentials) -> R.Reply:
        if self.authenticator is None:
            return R.AUTH_NOT_ENABLED
        return await self.authenticator.authenticate(session, credentials)

    async def mail(self, session: Session, txn: Transaction) -> R.Reply:
        reply = await self._run("on_mail", session, txn)
        if reply is R.RATE_LIMITED:
            self.metrics.rate_limited(session.listener)
        if reply is not None and not reply.is_positive:
            log.info("{listener}: NOQUEUE: reject: MAIL from {client}: {reply}; from=<{sender}>"
                     "{login}", listener=session.listener, client=session.client_ip,
                     reply=str(reply), sender=txn.sender, login=_login(session))
        return reply or R.SENDER_OK

    async def rcpt(self, session: Session, txn: Transaction, recipient: str,
                   params: dict) -> R.Reply:
        txn.rcpt_count += 1
        decision = await self.recipients.check_rcpt(
            recipient, txn.sender, client_ip=session.client_ip,
            authenticated=session.authenticated)
        reply = decision.reply
        if reply.is_positive and decision.resolution is not None:
            reply = self.local.check(decision.resolution) or reply
        target = None
        if reply.is_positive:
            orcpt, notify = _dsn_params(recipient, params)
            target = Target(decision.forward_to or recipient, decision.resolution,
                            orcpt=orcpt, notify=notify)
            reply = await self._run("on_rcpt", session, txn, target) or reply
        self.metrics.recipient(session.listener, reply)
        if reply is R.RATE_LIMITED:
            self.metrics.rate_limited(session.listener)
        if reply.is_positive:
            txn.targets.append(target)
        else:  # accepted recipients are logged with the message
            log.info("{listener}: NOQUEUE: reject: RCPT from {client}: {reply}; from=<{sender}> "
                     "to=<{rcpt}>{login}", listener=session.listener, client=session.client_ip,
                     reply=str(reply), sender=txn.sender, rcpt=recipient, login=_login(session))
        return reply

    # -- content ------------------------------------------------------------
    def begin_data(self, txn: Transaction) -> None:
        txn.message = IncomingMessage(self.spool_dir, self.queue_id())
        if self.metrics.enabled:
            txn.message.started = self.clock.seconds()
        txn.scanner = HeaderScanner(self.max_line, keep=KEPT_HEADERS)

    @staticmethod
    def data(txn: Transaction, chunk: bytes) -> None:
        if txn.message is None:  # BDAT chunks of a refused transaction
            return
        txn.message.write(chunk)
        txn.scanner.feed(chunk)
        txn.line_open = not chunk.endswith(b"\n")

    async def end_data(self, session: Session, txn: Transaction) -> list:
        """The replies to the end of the data: one, or one per accepted
        recipient in LMTP.  The transaction's content is discarded after."""
        count = len(txn.targets) if self.lmtp else 1
        try:
            replies = await self._finish(session, txn, max(count, 1))
        finally:
            txn.discard()
        accepted = any(r.is_positive for r in replies)
        self.metrics.message(session.listener, "accepted" if accepted else "refused")
        return replies

    async def _finish(self, session: Session, txn: Transaction, count: int) -> list:
        message = txn.message
        if message is None or not txn.targets:
            return [R.NO_VALID_RCPTS] * count
        queue_id = message.queue_id
        if txn.line_open:  # BDAT content may stop mid-line: end it, as Postfix does
            message.write(b"\r\n")
        message.finish()
        txn.scanner.finish()
        if txn.scanner.received > self.max_received:
            log.info("{id}: refused, {n} Received headers (loop)", id=queue_id,
                     n=txn.scanner.received)
            return [R.MAIL_LOOP] * count
        refusal = await self._run("on_data", session, txn)
        if refusal is not None and not refusal.is_positive:
            log.info("{id}: refused: {reply}; from=<{sender}>{login}", id=queue_id,
                     reply=str(refusal), sender=txn.sender, login=_login(session))
            return [refusal] * count
        info = SessionInfo(
            peer_ip=session.client_ip, helo=session.helo or session.client_ip,
            hostname=self.hostname, protocol="LMTP" if self.lmtp else "SMTP",
            esmtp=session.esmtp, smtputf8=txn.smtputf8, tls_version=session.tls_version,
            tls_cipher=session.tls_cipher if session.tls_version else None,
            authenticated=session.authenticated,
            hide_client=self.hide_client and session.authenticated)
        only = txn.targets[0].address if len(txn.targets) == 1 else None
        prefix = received_header(info, queue_id, only) + b"".join(txn.headers)
        log.info("{id}: client={client}, from=<{sender}>, size={size}, nrcpt={n}{login}",
                 id=queue_id, client=session.client_ip, sender=txn.sender, size=message.size,
                 n=len(txn.targets), login=_login(session))
        content = Message(queue_id, txn.sender, "", prefix,
                          eight_bit=txn.body_8bit, smtputf8=txn.smtputf8,
                          envid=txn.params.get("ENVID"), ret=_ret(txn.params), reuse_id=True,
                          folder=txn.folder,
                          requiretls="REQUIRETLS" in txn.params,
                          incoming=message)
        outcomes = await self.delivery.deliver(content, txn.targets,
                                               requeue="partial" if self.lmtp else "always")
        self._count_deliveries(outcomes, txn)
        if self.lmtp:
            replies = [o.reply if not o.reply.is_positive else R.DELIVERED.with_text(
                R.DELIVERED.text.format(rcpt=t.address, id=queue_id))
                for t, o in zip(txn.targets, outcomes)]
        else:
            failed = [o.reply for o in outcomes if not o.reply.is_positive]
            replies = failed[:1] or [R.QUEUED.with_text(R.QUEUED.text.format(id=queue_id))]
        if any(r.is_positive for r in replies):
            # Only a recipient with NOTIFY=SUCCESS gets a "delivered" report
            # (bounce.should_notify's rule); otherwise nothing is built.
            if txn.sender and any("SUCCESS" in t.notify for t in txn.targets):
                await self._report_delivered(session, txn, queue_id, message, outcomes)
            for check in self.checks:
                await check.accepted(session, txn)
        return replies

    def _count_deliveries(self, outcomes, txn: Transaction) -> None:
        """Local copies made now count as deliveries; their delay runs from
        the start of the data."""
        if not self.metrics.enabled:
            return
        started = getattr(txn.message, "started", None)
        latency = None if started is None else self.clock.seconds() - started
        copies = {}  # one copy per mailbox, however many recipients lead to it
        for outcome in outcomes:
            copies.update(getattr(outcome, "by_mailbox", None) or {})
        for reply in copies.values():
            # A copy that failed now is queued, counted here as "deferred"
            # and again by the queue when it is delivered.
            self.metrics.delivery("local", reply, latency)

    async def _report_delivered(self, session: Session, txn: Transaction, queue_id: str,
                                message, outcomes) -> None:
        """RFC 3461: queue a "delivered" DSN for the mailboxes that got their
        copy now, when their recipient's NOTIFY has SUCCESS.

        Copies queued instead are reported by the queue manager once
        delivered.  This runs before the 250, while the content is still on
        disk; a failure is logged and the 250 stands.
        """
        if not txn.sender or self.outbox is None:
            return  # never report on a bounce
        from mailserver.queue import bounce
        from mailserver.queue.envelope import DELIVERED, ClientInfo, Envelope, Recipient
        now = self.clock.seconds()
        recipients, seen = [], set()
        for target, outcome in zip(txn.targets, outcomes):
            if not outcome.local:
                continue
            for mb, reply in outcome.by_mailbox.items():
                if not reply.is_positive or (mb.address, target.orig) in seen:
                    continue
                seen.add((mb.address, target.orig))
                recipients.append(Recipient(address=mb.address, orcpt=target.orig,
                                            notify=target.notify, state=DELIVERED, attempts=1,
                                            last_reply=reply, remote="local", last_attempt=now))
        original = Envelope(
            id=queue_id, sender=txn.sender, recipients=recipients, arrival=now,
            size=message.size, eight_bit=txn.body_8bit, smtputf8=txn.smtputf8,
            envid=txn.params.get("ENVID"), ret=_ret(txn.params),
            client=ClientInfo(address=session.client_ip, helo=session.helo,
                              protocol=session.protocol))
        wanted = [r for r in recipients if bounce.should_notify(original, r, "success")]
        if not wanted:
            return
        try:
            dsn_id = await self.outbox.enqueue_dsn(
                original=original, recipients=wanted, kind="success",
                reporting_mta=self.hostname, original_path=message.path, now=now)
        except Exception:
            log.failure("{id}: could not queue the delivery report to <{sender}>", id=queue_id,
                        sender=txn.sender)
            return
        log.info("{id}: sender success notification: {dsn}", id=queue_id, dsn=dsn_id)

    # -- ETRN -----------------------------------------------------------------
    async def etrn(self, session: Session, node: str) -> R.Reply:
        """RFC 1985: run the deferred mail for ``node`` now (trusted clients only)."""
        def say(template):
            return template.with_text(template.text.format(node=node[:255]))

        if self.outbox is None or not self.recipients.may_relay(session.client_ip, False):
            return say(R.ETRN_DENIED)
        if node.startswith("#"):  # named queues: we have none
            return say(R.ETRN_UNAVAILABLE)
        try:
            moved = await self.outbox.flush(node.lstrip("@").lower())
        except Exception as e:
            if not is_known(e):
                log.failure("ETRN {node} failed", node=node)
            return say(R.ETRN_UNAVAILABLE)
        log.info("{listener}: ETRN {node} from {client}: {n} message(s)",
                 listener=session.listener, node=node, client=session.client_ip, n=len(moved))
        return say(R.ETRN_STARTED if moved else R.ETRN_NOTHING)


def _login(session: Session) -> str:
    return f", sasl_username={session.login}" if session.authenticated else ""


def _ret(params: dict) -> Optional[str]:
    return (params.get("RET") or "").upper() or None


def _dsn_params(recipient: str, params: dict) -> tuple:
    """(ORCPT, NOTIFY) for a recipient, from its RCPT parameters."""
    orcpt = params.get("ORCPT") or f"rfc822;{recipient}"
    notify = tuple(n.strip().upper() for n in (params.get("NOTIFY") or "").split(",")
                   if n.strip())
    return orcpt, notify


__all__ = ["Acceptance", "Check"]
