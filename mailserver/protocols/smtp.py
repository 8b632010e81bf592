# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""The Twisted edge of the SMTP, submission and LMTP listeners.

:class:`SMTPServerProtocol` keeps bytes, TLS, timers and back-pressure and
nothing else: it feeds what it reads to the sans-IO
:class:`~mailserver.sansio.smtp_server.SMTPServerConnection`, hands every
decision the core asks for (the greeting, HELO, AUTH, MAIL, RCPT, the end of
the data, ETRN) to the listener's acceptance pipeline
(:mod:`mailserver.pipeline.acceptance`), and writes the core's output.
While a decision is pending the transport is paused and pipelined commands
wait in the core's buffer, so replies always leave in command order.  Idle
timeouts run on an injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailserver import reply as R
from mailserver.errors import is_known, to_reply
from mailserver.pipeline.acceptance import Acceptance
from mailserver.pipeline.session import Session, Transaction
from mailserver.protocols.backpressure import WriteBackPressure
from mailserver.protocols.limits import (
    ConnectionLimiter,
    ConnectionRateLimiter,
    client_key,
    peer_ip,
)
from mailserver.protocols.sessions import Sessions
from mailserver.protocols.wire import write_now
from mailserver.sansio import smtp_events as ev
from mailserver.sansio.smtp_server import Limits, Mode, SMTPServerConnection

log = Logger(namespace="mailserver.smtpd")


@dataclass
class ListenerContext:
    """Everything the connections of one listener share."""

    mode: Mode
    hostname: str
    limits: Limits
    pipeline: Acceptance
    clock: IReactorTime
    limiter: ConnectionLimiter
    kind: str = "smtp"  # smtp, submission or lmtp: the pipeline's listener kind
    name: str = "smtp"
    tls: Any = None  # mailserver.tls.ReloadableTLS for STARTTLS, or None
    implicit_tls: bool = False  # the transport is TLS from the first byte (port 465)
    auth_mechanisms: tuple = ()  # SASL mechanisms offered; () = no AUTH
    auth_requires_tls: bool = True
    command_timeout: float = 300.0
    data_timeout: float = 180.0
    close_grace: float = 10.0  # seconds a closing connection may take to drain
    min_data_rate: float = 500.0  # octets/s a client must keep up during DATA/BDAT; 0: off
    rate_limiter: Optional[ConnectionRateLimiter] = None  # connections per client per minute
    dsn: bool = False  # DSN parameters accepted (there is a queue to honour them)
    requiretls: bool = False  # REQUIRETLS (RFC 8689) offered on TLS sessions
    metrics: Any = None  # mailserver.metrics.Metrics, or None when metrics are off
    sessions: Sessions = field(default_factory=Sessions)  # live sessions, for a graceful stop


@implementer(IPushProducer)
class SMTPServerProtocol(WriteBackPressure, Protocol):
    """One SMTP or LMTP session.

    Input is read only while no decision is pending and the transport's write
    buffer has room (the protocol is registered as the transport's producer),
    so a client that pipelines without reading its replies cannot grow our
    memory: its own socket fills up instead.
    """

    HOLD_INPUT = 65536  # unprocessed octets kept while the client reads no replies

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.core: Optional[SMTPServerConnection] = None
        self.session: Optional[Session] = None
        self.txn = Transaction()
        self.client = "unknown"
        self.busy = False
        self.write_paused = False
        self.reading_paused = False
        self.closing = False
        self.counted = False
        self.registered = False  # as the transport's producer
        self.timer = None  # the idle timeout's call (see _arm_timer)
        self.deadline: Optional[float] = None  # when the idle timeout is due; None: not now
        self.abort_timer = None
        self.due = 1  # replies owed for the pending decision
        self.deciding = False  # inside _decide: a synchronous answer must not re-enter _drive
        self.draining = False  # the server is stopping: close once between transactions
        self.data_started: Optional[float] = None  # when DATA/the first BDAT began
        self.data_octets = 0  # octets received since then

    def _reset_transaction(self) -> None:
        self.data_started = None
        self.txn.discard()
        self.txn = Transaction()

    # -- Twisted callbacks -------------------------------------------------
    def connectionMade(self) -> None:
        self.client = peer_ip(self.transport)
        self.key = client_key(self.client)
        self.ctx.sessions.add(self)
        rate = self.ctx.rate_limiter
        if rate is not None and not rate.allow(self.key, self.ctx.clock.seconds(),
                                                self.client):
            refusal = R.CONNECTION_RATE_LIMITED  # counted nowhere: nothing to release
        else:
            refusal = self.ctx.limiter.acquire(self.key)
        if refusal is None and self.ctx.sessions.draining:
            refusal = R.SHUTTING_DOWN  # accepted just before the listener stopped
            self.ctx.limiter.release(self.key)
        if refusal is not None:
            log.info("{listener}: refused connection from {client}: {reply}",
                     listener=self.ctx.name, client=self.client, reply=str(refusal))
            if self.ctx.metrics is not None:
                self.ctx.metrics.connection_refused(self.ctx.name)
            self.transport.write(refusal.to_bytes())
            self.closing = True
            self._hang_up()
            return
        self.counted = True
        if self.ctx.metrics is not None:
            self.ctx.metrics.connection_opened(self.ctx.name)
        log.info("{listener}: connect from {client}", listener=self.ctx.name, client=self.client)
        ctx = self.ctx
        self.session = Session(listener=ctx.name, kind=ctx.kind, hostname=ctx.hostname,
                               client_ip=self.client, client_key=self.key)
        self.core = SMTPServerConnection(
            mode=ctx.mode,
            hostname=ctx.hostname,
            limits=ctx.limits,
            tls_available=ctx.tls is not None or ctx.implicit_tls,
            tls_active=ctx.implicit_tls,
            etrn=ctx.pipeline.etrn_enabled,
            dsn=ctx.dsn,
            requiretls=ctx.requiretls,
            auth_mechanisms=ctx.auth_mechanisms,
            auth_requires_tls=ctx.auth_requires_tls,
        )
        self.transport.registerProducer(self, True)
        self.registered = True
        self._decide(self._greet(), greeting=True)
        if not self.busy:
            self._drive()

    async def _greet(self) -> list:
        return [await self.ctx.pipeline.connect(self.session)]

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.core is None:
            return
        if self.data_started is not None:
            self.data_octets += len(data)
        self.core.receive_data(data)
        if self.write_paused:
            self._update_reading()
        self._drive()

    def connectionLost(self, reason=None) -> None:
        self.ctx.sessions.discard(self)
        self._cancel_timer()
        if self.abort_timer is not None and self.abort_timer.active():
            self.abort_timer.cancel()
        self.abort_timer = None
        self.closing = True
        self._reset_transaction()
        if self.counted:
            self.counted = False
            self.ctx.limiter.release(self.key)
            if self.ctx.metrics is not None:
                self.ctx.metrics.connection_closed(self.ctx.name)
            log.info("{listener}: disconnect from {client}", listener=self.ctx.name,
                     client=self.client)

    # -- the event loop ----------------------------------------------------
    def _drive(self) -> None:
        progressed = False
        try:
            while not self.busy and not self.closing and not self.write_paused:
                if self.draining and self._between_transactions():
                    self._close(R.SHUTTING_DOWN)
                    return
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
        if self._flush() or progressed or self.deadline is None:
            # Only progress (a command, a reply, a block of data) restarts the
            # idle timer; a byte at a time of an unfinished line does not.
            # No deadline: a decision that waited has answered without a
            # reply (a HELO check), and the timer must run again all the same.
            self._arm_timer()

    # -- graceful stop (see protocols/sessions.py) ---------------------------
    def _between_transactions(self) -> bool:
        """No decision pending and no transaction open: safe to close."""
        return not self.busy and not self.core.closed and not self.core.in_transaction

    def drain(self) -> None:
        """The server is stopping: close now if idle, else after the
        transaction in flight, at the next command."""
        self.draining = True
        if not self.closing and self.core is not None and self._between_transactions():
            log.info("{listener}: shutting down, closing idle session with {client}",
                     listener=self.ctx.name, client=self.client)
            self._close(R.SHUTTING_DOWN)

    def shut_down(self) -> None:
        """The grace period is over: close whatever is going on (an open
        message's scratch file is removed in connectionLost)."""
        self.draining = True
        if not self.closing:
            log.info("{listener}: shutdown grace over, closing session with {client}",
                     listener=self.ctx.name, client=self.client)
            self._close(R.SHUTTING_DOWN)

    def _flush(self) -> bool:
        """Write what the core has queued; True when there was something."""
        if self.core is None:
            return False
        out = self.core.data_to_send()
        if out:
            write_now(self.transport, out)
        return bool(out)

    def _update_reading(self) -> None:
        """Read from the socket only when nothing holds us back."""
        if self.closing:
            return
        # A full write buffer stops command processing at once, but reading
        # only once the unprocessed input passes HOLD_INPUT: under TLS the
        # write buffer may be waiting for the handshake, which needs reading.
        hold = self.busy or (self.write_paused and self.core is not None
                             and self.core.buffered >= self.HOLD_INPUT)
        if hold and not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()
        elif not hold and self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

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

    def _decide(self, coro, due: int = 1, greeting: bool = False) -> None:
        """Run an async decision owing ``due`` replies; the core waits for
        them.  ``greeting``: the reply is the greeting (None: the usual 220).

        The coroutine is stepped here first: most decisions (a cached
        directory answer, no check with I/O) finish in that step and are
        answered at once, with no Deferred, no pause of the transport and the
        idle timer left alone.  One that waits for something (a lookup, the
        disk) is handed to Twisted, which resumes it (awaiting a Deferred that
        has not fired asks it again), and input stops until it answers.
        """
        self.busy = True
        self.due = due
        done = self._greeted if greeting else self._decided
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            self._answer(done, stop.value)
            return
        except Exception:
            self._answer(done, self._decision_failed(Failure()))
            return
        if not isinstance(waiting, defer.Deferred):  # only Deferreds are awaited here
            coro.close()
            self._answer(done, self._decision_failed(Failure(TypeError(
                f"a decision awaited {type(waiting).__name__}, not a Deferred"))))
            return
        self.deadline = None  # no timeout while we decide; the answer re-arms it
        self._update_reading()
        # A decision answered at once (no directory trip) returns here and
        # the caller's loop goes on: no recursion per pipelined command.
        self.deciding = True
        d = defer.ensureDeferred(coro)
        d.addErrback(self._decision_failed)
        d.addCallback(done)
        d.addErrback(self._broken)
        self.deciding = False

    def _answer(self, done, replies) -> None:
        """Give a decision's replies to ``done`` now, inside the caller's loop."""
        self.deciding = True
        try:
            done(replies)
        except Exception:
            self._broken(Failure())
        finally:
            self.deciding = False

    def _decision_failed(self, failure) -> list:
        if not is_known(failure.value):
            log.failure("{listener}: decision failed", failure, listener=self.ctx.name)
        return [to_reply(failure.value)] * self.due

    def _greeted(self, replies) -> None:
        self.busy = False
        if self.closing:
            return
        reply = replies[0]
        if reply is not None and reply.is_positive:
            reply = None  # a check without objection: the usual 220
        self.core.greeting(reply)
        self._update_reading()
        if not self.deciding:
            self._drive()

    def _decided(self, replies) -> None:
        self.busy = False
        if self.closing:
            return
        for reply in replies:
            if reply is R.AUTH_OK and self.session.authenticated:
                self.core.send(reply, identity=self.session.login)
            else:
                self.core.send(reply)
            if reply.code == 421:  # the core closed the session: no more replies
                break
        self._update_reading()
        if not self.deciding:
            self._drive()

    def _broken(self, failure) -> None:
        """Last resort: a bug while answering.  Say 421 and hang up, never hang."""
        log.failure("{listener}: internal error, closing session with {client}", failure,
                    listener=self.ctx.name, client=self.client)
        if not self.closing:
            self._close(R.SERVICE_UNAVAILABLE)

    # -- timeouts ----------------------------------------------------------
    def _arm_timer(self) -> None:
        """Restart the idle timeout after progress.

        One DelayedCall serves many commands: only :attr:`deadline` moves
        (later, as commands arrive), and a call that fires before the
        deadline waits for the rest of it.  The call is moved only when the
        deadline comes earlier (the data's shorter timeout, the minimum data
        rate).  Re-arming per command was a cancel and a new call each time.
        """
        if self.busy or self.closing:
            self.deadline = None
            return
        now = self.ctx.clock.seconds()
        seconds = (self.ctx.data_timeout if self.txn.message is not None
                   else self.ctx.command_timeout)
        if self.data_started is not None and self.ctx.min_data_rate:
            # Postfix's smtpd_min_data_rate: the data may take data_timeout
            # plus one second per min_data_rate octets received, in all; a
            # client trickling ten octets a second cannot hold the slot.
            deadline = (self.data_started + self.ctx.data_timeout
                        + self.data_octets / self.ctx.min_data_rate)
            seconds = max(0.0, min(seconds, deadline - now))
        self.deadline = now + seconds
        timer = self.timer
        if timer is None or not timer.active():
            self.timer = self.ctx.clock.callLater(seconds, self._timed_out)
        elif timer.getTime() > self.deadline:
            timer.reset(seconds)

    def _cancel_timer(self) -> None:
        self.deadline = None
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.deadline is None or self.closing:
            return  # a decision is pending: its answer arms the timer again
        left = self.deadline - self.ctx.clock.seconds()
        if left > 0.001:  # there was progress since the call was made
            self.timer = self.ctx.clock.callLater(left, self._timed_out)
            return
        log.info("{listener}: timeout from {client}", listener=self.ctx.name, client=self.client)
        self._close(R.TIMEOUT)

    # -- event handlers ----------------------------------------------------
    def on_hello(self, event: ev.Hello) -> None:
        self.session.helo = event.domain
        self.session.esmtp = event.verb.upper() != "HELO"
        self._reset_transaction()
        self._decide(self._no_reply(self.ctx.pipeline.helo(self.session)), due=0)

    async def _no_reply(self, coro) -> list:
        """A check after a reply the core already sent: a refusal closes."""
        reply = await coro
        if reply is not None and not reply.is_positive and not self.closing:
            self._close(reply if reply.code == 421 else R.SERVICE_UNAVAILABLE)
        return []

    def on_starttls(self, event: ev.StartTLS) -> None:
        if self.ctx.tls is None:
            self.core.send(R.TLS_UNAVAILABLE)
            return
        self.core.send(R.READY_TLS)
        self._flush()
        self.transport.startTLS(self.ctx.tls.options)
        self.session.forget_tls_state()
        self.session.tls_version = "TLS"
        self._reset_transaction()
        self.core.tls_started()

    def on_auth(self, event: ev.Authenticate) -> None:
        self._decide(self._one(self.ctx.pipeline.authenticate(self.session, event.credentials)))

    def on_auth_failed(self, event: ev.AuthFailed) -> None:
        log.info("{listener}: {client}: authentication failed: sasl_method={mech} ({reason})",
                 listener=self.ctx.name, client=self.client, mech=event.mechanism,
                 reason=event.reason)

    async def _one(self, coro) -> list:
        return [await coro]

    def on_mail(self, event: ev.MailFrom) -> None:
        self._reset_transaction()
        txn = self.txn
        txn.sender = event.sender
        txn.smtputf8 = event.smtputf8
        txn.body_8bit = (event.body or "").upper() == "8BITMIME"
        txn.params = dict(event.params)
        self._decide(self._one(self.ctx.pipeline.mail(self.session, txn)))

    def on_rcpt(self, event: ev.RcptTo) -> None:
        self._decide(self._one(self.ctx.pipeline.rcpt(self.session, self.txn, event.recipient,
                                                      dict(event.params))))

    def on_data_start(self, event: ev.DataStart) -> None:
        if self.data_started is None:  # a BDAT transaction is timed as a whole
            self.data_started = self.ctx.clock.seconds()
            self.data_octets = 0
        self.ctx.pipeline.begin_data(self.txn)

    def on_data_chunk(self, event: ev.DataChunk) -> None:
        self.ctx.pipeline.data(self.txn, event.data)

    def on_data_aborted(self, event: ev.DataAborted) -> None:
        log.info("{listener}: message from {client} refused: {reply}",
                 listener=self.ctx.name, client=self.client, reply=str(event.reply))
        self._reset_transaction()

    def on_data_end(self, event: ev.DataEnd) -> None:
        due = len(self.txn.targets) if self.ctx.mode is Mode.LMTP else 1
        if event.eight_bit:
            # 8-bit octets without BODY=8BITMIME: relay it as 8-bit all the
            # same, so a 7-bit peer gets the 5.6.3 handling, never raw octets.
            self.txn.body_8bit = True
        self._tls_details()
        txn, self.txn = self.txn, Transaction()  # the pipeline owns it now
        self.data_started = None
        self._decide(self.ctx.pipeline.end_data(self.session, txn), due=max(due, 1))

    def _tls_details(self) -> None:
        """The negotiated TLS version and cipher, for the Received header."""
        if self.session.tls_version is None and not self.ctx.implicit_tls:
            return
        try:
            handle = self.transport.getHandle()
            self.session.tls_version = handle.get_protocol_version_name()
            self.session.tls_cipher = handle.get_cipher_name()
        except Exception:
            self.session.tls_version = self.session.tls_version or "TLS"

    def on_etrn(self, event: ev.Etrn) -> None:
        self._decide(self._one(self.ctx.pipeline.etrn(self.session, event.node)))

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
        ev.Authenticate: on_auth,
        ev.AuthFailed: on_auth_failed,
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
