# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""The Twisted edge of the SMTP and LMTP listeners.

:class:`SMTPServerProtocol` owns the transport and nothing else of substance:
it feeds bytes to the sans-IO :class:`~mailserver.sansio.smtp_server.SMTPServerConnection`,
answers the decisions it returns (asking :mod:`mailserver.policy` and the
directory, writing to the store), writes the core's output, runs the idle
timeouts on an injected clock and starts TLS.  While a decision is pending the
transport is paused, and pipelined commands wait in the core's buffer, so
replies always leave in command order.

The 250 after the data is sent only when :mod:`mailserver.delivery` reports
every local copy durable (file and directory fsynced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailserver import reply as R
from mailserver.delivery.local import LocalDelivery
from mailserver.errors import is_known, to_reply
from mailserver.policy import RecipientPolicy
from mailserver.sansio import smtp_events as ev
from mailserver.sansio.smtp_server import Limits, Mode, SMTPServerConnection
from mailserver.protocols.limits import ConnectionLimiter, client_key
from mailserver.received import HeaderScanner, SessionInfo, received_header
from mailserver.incoming import IncomingMessage, new_queue_id

log = Logger(namespace="mailserver.smtpd")


@dataclass
class ListenerContext:
    """Everything the connections of one listener share."""

    mode: Mode
    hostname: str
    limits: Limits
    policy: RecipientPolicy
    delivery: LocalDelivery
    spool_dir: str
    clock: IReactorTime
    limiter: ConnectionLimiter
    name: str = "smtp"
    tls: Any = None  # ReloadableTLS or None
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    max_received: int = 50
    queue_id: Callable[[], str] = field(default=new_queue_id)
    outbox: Any = None  # mailserver.queue.outbox.Outbox, for relayed and forwarded mail
    etrn: bool = False
    srs: Any = None  # mailserver.srs.SRS when forwarded mail is rewritten
    close_grace: float = 10.0  # seconds a closing connection may take to drain


def _peer_ip(transport) -> str:
    """The client's IP address, or ``"unix"`` for a UNIX-socket peer."""
    peer = transport.getPeer()
    return getattr(peer, "host", None) or "unix"


@implementer(IPushProducer)
class SMTPServerProtocol(Protocol):
    """One SMTP or LMTP session.

    Input is read only while no decision is pending and the transport's write
    buffer has room (the protocol is registered as the transport's producer),
    so a client that pipelines without reading its replies cannot grow our
    memory: its own socket fills up instead.
    """

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.core: Optional[SMTPServerConnection] = None
        self.client = "unknown"
        self.helo = ""
        self.esmtp = False
        self.tls_active = False
        self.busy = False
        self.write_paused = False
        self.reading_paused = False
        self.closing = False
        self.counted = False
        self.registered = False  # as the transport's producer
        self.timer = None
        self.abort_timer = None
        self.due = 1  # replies owed for the pending decision
        self._reset_transaction()

    # -- transaction state -----------------------------------------------
    def _reset_transaction(self) -> None:
        self.sender: Optional[str] = None
        self.smtputf8 = False
        self.body_8bit = False
        self.mail_params: dict = {}
        self.rcpt_params: dict = {}  # recipient -> its RCPT parameters
        self.accepted: List[tuple] = []  # (recipient, Resolution or None) in RCPT order
        message = getattr(self, "message", None)
        if message is not None:
            message.discard()
        self.message: Optional[IncomingMessage] = None
        self.scanner: Optional[HeaderScanner] = None

    # -- Twisted callbacks -------------------------------------------------
    def connectionMade(self) -> None:
        self.client = _peer_ip(self.transport)
        self.key = client_key(self.client)
        refusal = self.ctx.limiter.acquire(self.key)
        if refusal is not None:
            log.info("{listener}: refused connection from {client}: {reply}",
                     listener=self.ctx.name, client=self.client, reply=str(refusal))
            self.transport.write(refusal.to_bytes())
            self.closing = True
            self._hang_up()
            return
        self.counted = True
        log.info("{listener}: connect from {client}", listener=self.ctx.name, client=self.client)
        self.core = SMTPServerConnection(
            mode=self.ctx.mode,
            hostname=self.ctx.hostname,
            limits=self.ctx.limits,
            tls_available=self.ctx.tls is not None,
            tls_active=False,
            etrn=self.ctx.outbox is not None and self.ctx.etrn,
            dsn=self.ctx.outbox is not None,
        )
        self.transport.registerProducer(self, True)
        self.registered = True
        self.core.greeting()
        self._flush()
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.core is None:
            return
        self.core.receive_data(data)
        self._drive()

    def connectionLost(self, reason=None) -> None:
        self._cancel_timer()
        if self.abort_timer is not None and self.abort_timer.active():
            self.abort_timer.cancel()
        self.abort_timer = None
        self.closing = True
        self._reset_transaction()
        if self.counted:
            self.counted = False
            self.ctx.limiter.release(self.key)
            log.info("{listener}: disconnect from {client}", listener=self.ctx.name,
                     client=self.client)

    # -- the event loop ----------------------------------------------------
    def _drive(self) -> None:
        progressed = False
        try:
            while not self.busy and not self.closing and not self.write_paused:
                event = self.core.next_event()
                if event is ev.NEED_DATA or event is ev.PAUSED:
                    break
                progressed = True
                handler = self.HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
        except Exception:
            log.failure("{listener}: internal error, closing session with {client}",
                        listener=self.ctx.name, client=self.client)
            self._close(R.SERVICE_UNAVAILABLE)
            return
        if self._flush() or progressed:
            # Only progress (a command, a reply, a block of data) restarts the
            # idle timer; a byte at a time of an unfinished line does not.
            self._arm_timer()

    def _flush(self) -> bool:
        """Write what the core has queued; True when there was something."""
        if self.core is None:
            return False
        out = self.core.data_to_send()
        if out:
            self.transport.write(out)
        return bool(out)

    def _update_reading(self) -> None:
        """Read from the socket only when nothing holds us back."""
        if self.closing:
            return
        hold = self.busy or self.write_paused
        if hold and not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()
        elif not hold and self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

    # -- IPushProducer: the transport's write buffer is full / has room ----
    def pauseProducing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resumeProducing(self) -> None:
        if not self.write_paused:
            return
        self.write_paused = False
        self._update_reading()
        if not self.busy and self.core is not None:
            self._drive()

    def stopProducing(self) -> None:
        self.closing = True

    def _close(self, last: Optional[R.Reply] = None) -> None:
        """Send what the core has queued, then ``last`` (a 421 of ours), and
        hang up."""
        try:
            self._flush()
        except Exception:  # a broken core must not keep the connection open
            log.failure("{listener}: could not flush replies to {client}",
                        listener=self.ctx.name, client=self.client)
        if last is not None:
            self.transport.write(last.to_bytes())
        self.closing = True
        self._cancel_timer()
        self._hang_up()

    def _hang_up(self) -> None:
        """Close once the replies are written, or abort after ``close_grace``.

        A client that pipelines and never reads keeps the write buffer full,
        and ``loseConnection`` alone would wait for it forever, holding the
        client's connection slot.  Unregistering as the transport's producer
        first matters too: a paused streaming producer is resumed, instead of
        the connection closed, when the buffer drains.
        """
        if self.registered:
            self.registered = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self.abort_timer is None:
            self.abort_timer = self.ctx.clock.callLater(self.ctx.close_grace, self._abort)

    def _abort(self) -> None:
        self.abort_timer = None
        log.info("{listener}: {client} did not read the closing reply; connection aborted",
                 listener=self.ctx.name, client=self.client)
        self.transport.abortConnection()

    def _decide(self, coro, due: int = 1) -> None:
        """Run an async decision owing ``due`` replies; the core waits for them."""
        self.busy = True
        self.due = due
        self._cancel_timer()
        self._update_reading()
        d = defer.ensureDeferred(coro)
        d.addErrback(self._decision_failed)
        d.addCallback(self._decided)
        d.addErrback(self._broken)

    def _decision_failed(self, failure) -> list:
        if not is_known(failure.value):
            log.failure("{listener}: decision failed", failure, listener=self.ctx.name)
        return [to_reply(failure.value)] * self.due

    def _decided(self, replies) -> None:
        self.busy = False
        if self.closing:
            return
        for reply in replies:
            self.core.send(reply)
        self._update_reading()
        self._drive()

    def _broken(self, failure) -> None:
        """Last resort: a bug while answering.  Say 421 and hang up, never hang."""
        log.failure("{listener}: internal error, closing session with {client}", failure,
                    listener=self.ctx.name, client=self.client)
        if not self.closing:
            self._close(R.SERVICE_UNAVAILABLE)

    # -- timeouts ----------------------------------------------------------
    def _arm_timer(self) -> None:
        self._cancel_timer()
        if self.busy or self.closing:
            return
        seconds = self.ctx.data_timeout if self.message is not None else self.ctx.command_timeout
        self.timer = self.ctx.clock.callLater(seconds, self._timed_out)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        log.info("{listener}: timeout from {client}", listener=self.ctx.name, client=self.client)
        self._close(R.TIMEOUT)

    # -- event handlers ----------------------------------------------------
    def on_hello(self, event: ev.Hello) -> None:
        self.helo = event.domain
        self.esmtp = event.verb.upper() != "HELO"
        self._reset_transaction()

    def on_starttls(self, event: ev.StartTLS) -> None:
        if self.ctx.tls is None:
            self.core.send(R.TLS_UNAVAILABLE)
            return
        self.core.send(R.READY_TLS)
        self._flush()
        self.transport.startTLS(self.ctx.tls.options)
        self.tls_active = True
        self.helo = ""
        self._reset_transaction()
        self.core.tls_started()

    def on_mail(self, event: ev.MailFrom) -> None:
        self._reset_transaction()
        self.sender = event.sender
        self.smtputf8 = event.smtputf8
        self.body_8bit = (event.body or "").upper() == "8BITMIME"
        self.mail_params = dict(event.params)
        self.core.send(R.SENDER_OK)

    def on_rcpt(self, event: ev.RcptTo) -> None:
        self.rcpt_params[event.recipient] = dict(event.params)
        self._decide(self._check_rcpt(event.recipient))

    async def _check_rcpt(self, recipient: str) -> list:
        decision = await self.ctx.policy.check_rcpt(recipient, self.sender or "",
                                                    client_ip=self.client)
        reply = decision.reply
        if reply.is_positive and decision.resolution is not None:
            reply = self.ctx.delivery.check(decision.resolution) or reply
        if reply.is_positive:
            self.accepted.append((decision.forward_to or recipient, decision.resolution))
            if decision.forward_to:
                self.rcpt_params[decision.forward_to] = self.rcpt_params.get(recipient, {})
        if not reply.is_positive:  # accepted recipients are logged with the message
            log.info("{listener}: NOQUEUE: reject: RCPT from {client}: {reply}; from=<{sender}> "
                     "to=<{rcpt}>", listener=self.ctx.name, client=self.client, reply=str(reply),
                     sender=self.sender, rcpt=recipient)
        return [reply]

    def on_data_start(self, event: ev.DataStart) -> None:
        self.message = IncomingMessage(self.ctx.spool_dir, self.ctx.queue_id())
        self.scanner = HeaderScanner()

    def on_data_chunk(self, event: ev.DataChunk) -> None:
        if self.message is None:  # BDAT chunks of a refused transaction
            return
        self.message.write(event.data)
        self.scanner.feed(event.data)

    def on_data_aborted(self, event: ev.DataAborted) -> None:
        log.info("{listener}: message from {client} refused: {reply}",
                 listener=self.ctx.name, client=self.client, reply=str(event.reply))
        self._reset_transaction()

    def on_data_end(self, event: ev.DataEnd) -> None:
        due = len(self.accepted) if self.ctx.mode is Mode.LMTP else 1
        self._decide(self._finish_message(), due=max(due, 1))

    async def _finish_message(self) -> list:
        message, accepted = self.message, self.accepted
        count = len(accepted) if self.ctx.mode is Mode.LMTP else 1
        if message is None:
            return [R.NO_VALID_RCPTS] * count
        queue_id = message.queue_id
        try:
            message.finish()
            if self.scanner.received > self.ctx.max_received:
                log.info("{id}: refused, {n} Received headers (loop)", id=queue_id,
                         n=self.scanner.received)
                return [R.MAIL_LOOP] * count
            info = SessionInfo(
                peer_ip=self.client, helo=self.helo or self.client, hostname=self.ctx.hostname,
                protocol="LMTP" if self.ctx.mode is Mode.LMTP else "SMTP", esmtp=self.esmtp,
                smtputf8=self.smtputf8, **self._tls_details(),
            )
            only = accepted[0][0] if len(accepted) == 1 else None
            prefix = received_header(info, queue_id, only)
            log.info("{id}: client={client}, from=<{sender}>, size={size}, nrcpt={n}",
                     id=queue_id, client=self.client, sender=self.sender, size=message.size,
                     n=len(accepted))
            return await self._dispatch(queue_id, message, prefix, accepted)
        finally:
            self._reset_transaction()

    async def _dispatch(self, queue_id: str, message, prefix: bytes, accepted) -> list:
        """Deliver the local copies now; queue what must wait or leave.

        The queue carries relayed recipients, forwards and, for SMTP, local
        copies that failed now (so the client gets one 250 and nothing is
        delivered twice by its retry).  Replies are sent only when every
        local copy and the queued message are durable.
        """
        lmtp = self.ctx.mode is Mode.LMTP
        sender = self.sender or ""
        local = [(r, res) for r, res in accepted if res is not None and res.mailboxes]
        by_mailbox = {}
        if local:
            by_mailbox = await self.ctx.delivery.copies(queue_id, sender, message.path, prefix,
                                                        local)
        queued, forwarded = [], []  # (address, orcpt, notify)
        for rcpt, res in accepted:
            orcpt, notify = self._dsn_params(rcpt)
            if res is None:
                queued.append((rcpt, orcpt, notify))
            else:
                forwarded.extend((f, orcpt, notify) for f in res.forwards)
        srs_sender = self.ctx.srs.forward(sender) if self.ctx.srs and forwarded else None
        if srs_sender is None or srs_sender == sender:
            queued += forwarded  # one queued message, one sender
            forwarded = []
        retries = set()  # mailboxes whose copy failed: retried alone, forwards are queued
        if not lmtp:
            owner = {mb: rcpt for rcpt, res in local for mb in res.mailboxes}
            for mb, reply in by_mailbox.items():
                if not reply.is_positive:
                    orcpt, notify = self._dsn_params(owner[mb])
                    queued.append((mb.address, orcpt, notify))
                    retries.add(mb.address)
        queue_reply = None
        if queued:
            queue_reply = await self._enqueue(queue_id, message, prefix, queued, sender,
                                              mailbox_only=retries)
        if forwarded and queue_reply is None:  # forwarded copies leave with the SRS sender
            queue_reply = await self._enqueue(self.ctx.queue_id(), message, prefix, forwarded,
                                              srs_sender)
        if lmtp:
            replies = self.ctx.delivery.per_recipient(queue_id, local, by_mailbox)
            by_rcpt = dict(zip([r for r, _ in local], replies))
            out = []
            for rcpt, res in accepted:
                reply = by_rcpt.get(rcpt) or R.DELIVERED.with_text(
                    R.DELIVERED.text.format(rcpt=rcpt, id=queue_id))
                if reply.is_positive and res is not None and res.forwards and queue_reply:
                    reply = queue_reply
                out.append(reply)
            await self._report_delivered(queue_id, message, [
                (rcpt, res) for (rcpt, res), reply in zip(accepted, out)
                if reply.is_positive and res is not None], by_mailbox)
            return out
        if queue_reply is not None:
            return [queue_reply]
        await self._report_delivered(queue_id, message, local, by_mailbox)
        return [R.QUEUED.with_text(R.QUEUED.text.format(id=queue_id))]

    async def _report_delivered(self, queue_id: str, message, accepted, by_mailbox) -> None:
        """RFC 3461: queue a "delivered" DSN for the mailboxes of ``accepted``
        that got their copy now, when their recipient's NOTIFY has SUCCESS.

        Copies queued instead are reported by the queue manager once
        delivered.  This runs before the 250, while the content is still on
        disk; a failure is logged and the 250 stands.
        """
        from mailserver.queue import bounce
        from mailserver.queue.envelope import DELIVERED, ClientInfo, Envelope, Recipient

        if not self.sender or self.ctx.outbox is None:
            return  # never report on a bounce
        now = self.ctx.clock.seconds()
        recipients, seen = [], set()
        for rcpt, res in accepted:
            orcpt, notify = self._dsn_params(rcpt)
            for mb in res.mailboxes:
                reply = by_mailbox.get(mb)
                if reply is None or not reply.is_positive or (mb.address, orcpt) in seen:
                    continue
                seen.add((mb.address, orcpt))
                recipients.append(Recipient(address=mb.address, orcpt=orcpt, notify=notify,
                                            state=DELIVERED, attempts=1, last_reply=reply,
                                            remote="local", last_attempt=now))
        original = Envelope(
            id=queue_id, sender=self.sender, recipients=recipients, arrival=now,
            size=message.size, eight_bit=self.body_8bit, smtputf8=self.smtputf8,
            envid=self.mail_params.get("ENVID"),
            ret=(self.mail_params.get("RET") or "").upper() or None,
            client=ClientInfo(address=self.client, helo=self.helo, protocol=(
                "LMTP" if self.ctx.mode is Mode.LMTP else "ESMTP" if self.esmtp else "SMTP")),
        )
        wanted = [r for r in recipients if bounce.should_notify(original, r, "success")]
        if not wanted:
            return
        try:
            dsn_id = await self.ctx.outbox.enqueue_dsn(
                original=original, recipients=wanted, kind="success",
                reporting_mta=self.ctx.hostname, original_path=message.path, now=now)
        except Exception:
            log.failure("{id}: could not queue the delivery report to <{sender}>", id=queue_id,
                        sender=self.sender)
            return
        log.info("{id}: sender success notification: {dsn}", id=queue_id, dsn=dsn_id)

    def _dsn_params(self, rcpt: str) -> tuple:
        """(ORCPT, NOTIFY) for a recipient, from its RCPT parameters."""
        params = self.rcpt_params.get(rcpt, {})
        orcpt = params.get("ORCPT") or f"rfc822;{rcpt}"
        notify = tuple(n.strip().upper() for n in (params.get("NOTIFY") or "").split(",")
                       if n.strip())
        return orcpt, notify

    async def _enqueue(self, queue_id: str, message, prefix: bytes, queued,
                       sender: str, mailbox_only=frozenset()) -> Optional[R.Reply]:
        """Queue ``message`` from ``sender`` for ``queued``; None when durable,
        else the reply for the client."""
        if self.ctx.outbox is None:
            return R.INTERNAL_ERROR.with_text(f"{R.INTERNAL_ERROR.text} ({queue_id})")
        seen, recipients, notify = set(), [], {}
        for address, orcpt, n in queued:
            if address not in seen:
                seen.add(address)
                recipients.append((address, orcpt))
                notify[address] = n
        try:
            await self.ctx.outbox.enqueue(
                queue_id=queue_id, source_path=message.path, prefix=prefix,
                sender=sender, recipients=recipients, notify=notify,
                mailbox_only=mailbox_only,
                arrival=self.ctx.clock.seconds(), eight_bit=self.body_8bit,
                smtputf8=self.smtputf8, envid=self.mail_params.get("ENVID"),
                ret=(self.mail_params.get("RET") or "").upper() or None,
            )
        except Exception as e:
            if not is_known(e):
                log.failure("{id}: could not queue the message", id=queue_id)
            return to_reply(e, queue_id)
        log.info("{id}: queued from=<{sender}> for {n} recipient(s)", id=queue_id, sender=sender,
                 n=len(recipients))
        return None

    def _tls_details(self) -> dict:
        if not self.tls_active:
            return {}
        try:
            handle = self.transport.getHandle()
            return {"tls_version": handle.get_protocol_version_name(),
                    "tls_cipher": handle.get_cipher_name()}
        except Exception:
            return {"tls_version": "TLS", "tls_cipher": None}

    def on_etrn(self, event: ev.Etrn) -> None:
        self._decide(self._etrn(event.node))

    async def _etrn(self, node: str) -> list:
        """RFC 1985: run the deferred mail for ``node`` now (trusted clients only)."""
        def say(template):
            return template.with_text(template.text.format(node=node[:255]))

        if self.ctx.outbox is None or not self.ctx.policy.may_relay(self.client, False):
            return [say(R.ETRN_DENIED)]
        if node.startswith("#"):  # named queues: we have none
            return [say(R.ETRN_UNAVAILABLE)]
        try:
            moved = await self.ctx.outbox.flush(node.lstrip("@").lower())
        except Exception:
            log.failure("ETRN {node} failed", node=node)
            return [say(R.ETRN_UNAVAILABLE)]
        log.info("{listener}: ETRN {node} from {client}: {n} message(s)", listener=self.ctx.name,
                 node=node, client=self.client, n=len(moved))
        return [say(R.ETRN_STARTED if moved else R.ETRN_NOTHING)]

    def on_reset(self, event: ev.Reset) -> None:
        self._reset_transaction()

    def on_quit(self, event) -> None:
        self._close()

    def on_closed(self, event) -> None:
        self.closing = True
        self._cancel_timer()

    HANDLERS = {
        ev.Hello: on_hello,
        ev.StartTLS: on_starttls,
        ev.MailFrom: on_mail,
        ev.RcptTo: on_rcpt,
        ev.DataStart: on_data_start,
        ev.DataChunk: on_data_chunk,
        ev.DataAborted: on_data_aborted,
        ev.DataEnd: on_data_end,
        ev.Etrn: on_etrn,
        ev.Reset: on_reset,
        ev.Quit: on_quit,
        ev.Closing: on_quit,
        ev.ConnectionClosed: on_closed,
    }


class SMTPFactory(Factory):
    """Builds one :class:`SMTPServerProtocol` per connection of a listener."""

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx

    def buildProtocol(self, addr) -> SMTPServerProtocol:
        p = SMTPServerProtocol(self.ctx)
        p.factory = self
        return p
