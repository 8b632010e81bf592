# -*- test-case-name: tests.unit.test_protocol_pop3 -*-
"""The Twisted edge of the POP3 and POP3S listeners.

:class:`POP3ServerProtocol` keeps bytes, TLS, timers and back-pressure: it
feeds what it reads to the sans-IO
:class:`~mailserver.sansio.pop3.POP3ServerConnection` and answers its
decisions:

* ``Authenticate``: the shared :class:`~mailserver.pipeline.auth.Authenticator`
  (the directory's twisted.cred checker and the failed-login throttle that
  submission uses), then the user's maildrop is opened and locked
  (:class:`~mailserver.store.maildrop.Maildrop`) in a worker thread;
* ``Retrieve``: a message whose snapshot size fits one read (64 KiB) is
  read whole on the reactor thread (:meth:`~mailserver.store.maildrop.Maildrop.read_small`:
  an ``openat``, an ``fstat`` that bounds the read, one ``read`` and a
  ``close``, microseconds from the page cache) and answered at once in one
  write, with no thread, Deferred or coroutine.  While a client retrieves
  in order, the next small message is read and stuffed right after each
  such answer, as it travels (one prepared response per session at most),
  so that the next RETR costs one write.  Any other message (larger,
  moved by another reader, unreadable) is opened and its first 64 KiB read
  in a worker thread; one longer than that is streamed through a pull
  producer, each chunk byte-stuffed by the core, never the whole message in
  memory;
* ``Update``: deletions, moves to cur/ and seen flags are applied in a
  worker thread, then the lock is released; when there is nothing to change
  on disk (:meth:`~mailserver.store.maildrop.Maildrop.needs_io`) the answer
  comes at once, without the thread.  A dropped connection applies nothing.

Responses go out with :func:`~mailserver.protocols.wire.write_now`: to a
plain TCP client, straight to the socket as soon as a batch of input has
been handled, not after another trip round the reactor; TLS connections
write the usual way.

The idle timer (10 minutes by default, RFC 1939's minimum) counts from the
last command or answer: one DelayedCall per session, which on expiry looks
at the time of the last activity and waits again if there was some (cheaper
than re-arming a timer per command).  It does not expire while a decision
or a message is under way; a client that stops reading a RETR stops the
file being read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailserver import reply as R
from mailserver.directory.interfaces import Mailbox
from mailserver.pipeline.session import Session
from mailserver.protocols.backpressure import WriteBackPressure
from mailserver.protocols.limits import ConnectionLimiter, client_key, peer_ip
from mailserver.protocols.sessions import Sessions
from mailserver.protocols.wire import write_now
from mailserver.sansio import pop3_events as ev
from mailserver.sansio.pop3 import POP3ServerConnection, State
from mailserver.sansio.pop3_stuffer import whole

log = Logger(namespace="mailserver.pop3d")

CHUNK = 65536
SHUTTING_DOWN = b"-ERR [SYS/TEMP] server shutting down\r\n"


@dataclass
class POP3Context:
    """Everything the connections of one POP3 listener share."""

    name: str
    hostname: str
    clock: Any
    limiter: ConnectionLimiter
    authenticator: Any  # mailserver.pipeline.auth.Authenticator
    store: Any  # mailserver.store.maildir.MaildirStore (maildir_for)
    io: Any  # io(f, *args) -> Deferred: run blocking file work in the I/O pool
    open_maildrop: Any  # maildir path -> Maildrop (blocking)
    tls: Any = None  # mailserver.tls.ReloadableTLS for STLS, or None
    implicit_tls: bool = False
    plaintext_auth: bool = False
    mechanisms: tuple = ("PLAIN",)
    idle_timeout: float = 600.0
    junk_limit: int = 100  # NOOP, RSET and CAPA per session; 0 = no limit
    close_grace: float = 10.0
    metrics: Any = None  # mailserver.metrics.Metrics, or None when metrics are off
    sessions: Sessions = field(default_factory=Sessions)  # live sessions, for a graceful stop
    rate_limiter: Any = None  # limits.ConnectionRateLimiter: connections per client per minute


def _open_and_read(maildrop, index: int) -> tuple:
    """In a worker thread: the message's file and its first chunk."""
    f = maildrop.open_message(index)
    try:
        return f, f.read(CHUNK)
    except BaseException:
        f.close()
        raise


@implementer(IPullProducer)
class _MessageSender:
    """Streams one message file through the core's stuffer, a chunk per pull."""

    def __init__(self, proto: "POP3ServerProtocol", f) -> None:
        self.proto = proto
        self.file = f

    def resumeProducing(self) -> None:
        core = self.proto.core
        chunk = self.file.read(CHUNK)
        if chunk:
            out = core.stuff(chunk)
            if out:
                self.proto.transport.write(out)
        # A short read of a regular file is its end: the terminator goes out
        # with the last chunk, not one pull later.
        if len(chunk) < CHUNK or core.retrieve_done:
            self.proto._retrieved(self)

    def stopProducing(self) -> None:
        self.file.close()


@implementer(IPushProducer)
class POP3ServerProtocol(WriteBackPressure, Protocol):
    """One POP3 session.

    It is the transport's streaming producer (except while a long message is
    pulled by a :class:`_MessageSender`): when the client stops reading and
    the write buffer fills, commands wait in the core, and reading stops
    once ``HOLD_INPUT`` octets of them are waiting.
    """

    def __init__(self, ctx: POP3Context) -> None:
        self.ctx = ctx
        self.core: Optional[POP3ServerConnection] = None
        self.session: Optional[Session] = None
        self.maildrop = None
        self.client = "unknown"
        self.busy = False
        self.reading_paused = False
        self.write_paused = False  # the transport's write buffer is full
        self.registered = False  # we are the transport's streaming producer
        self.closing = False
        self.counted = False
        self.timer = None
        self.last_active = 0.0  # clock time of the last command or answer
        self.abort_timer = None
        self.deciding = False
        self.sender: Optional[_MessageSender] = None
        self.retrieval: Optional[defer.Deferred] = None  # fires when a RETR/TOP is sent
        self.ahead: Optional[tuple] = None  # (index, wire form) of the next message
        self.last_retr: Optional[int] = None  # index of the last RETR
        self.draining = False  # the server is stopping: close at the next command

    # -- Twisted callbacks -------------------------------------------------
    def connectionMade(self) -> None:
        self.client = peer_ip(self.transport)
        self.key = client_key(self.client)
        self.ctx.sessions.add(self)
        if self.ctx.sessions.draining:  # accepted just before the listener stopped
            self.transport.write(SHUTTING_DOWN)
            self.closing = True
            self._hang_up()
            return
        rate = self.ctx.rate_limiter
        if rate is not None and not rate.allow(self.key, self.ctx.clock.seconds(), self.client):
            log.info("{listener}: refused connection from {client}: connection rate limit",
                     listener=self.ctx.name, client=self.client)
            if self.ctx.metrics is not None:
                self.ctx.metrics.connection_refused(self.ctx.name)
            self.transport.write(b"-ERR [SYS/TEMP] Too many connections from your address "
                                 b"per minute, try again later\r\n")
            self.closing = True
            self._hang_up()
            return
        refusal = self.ctx.limiter.acquire(self.key)
        if refusal is not None:
            log.info("{listener}: refused connection from {client}: too many connections",
                     listener=self.ctx.name, client=self.client)
            if self.ctx.metrics is not None:
                self.ctx.metrics.connection_refused(self.ctx.name)
            self.transport.write(b"-ERR [SYS/TEMP] Too many connections, try again later\r\n")
            self.closing = True
            self._hang_up()
            return
        self.counted = True
        if self.ctx.metrics is not None:
            self.ctx.metrics.connection_opened(self.ctx.name)
        if hasattr(self.transport, "setTcpNoDelay"):
            try:
                self.transport.setTcpNoDelay(True)  # no 40 ms stall after each response
            except Exception:  # a UNIX socket, or a TLS wrapper without it
                pass
        log.info("{listener}: connect from {client}", listener=self.ctx.name, client=self.client)
        ctx = self.ctx
        self.session = Session(listener=ctx.name, kind="pop3", hostname=ctx.hostname,
                               client_ip=self.client, client_key=self.key)
        self.core = POP3ServerConnection(
            hostname=ctx.hostname, tls_available=ctx.tls is not None or ctx.implicit_tls,
            tls_active=ctx.implicit_tls, plaintext_auth=ctx.plaintext_auth,
            auth_mechanisms=ctx.mechanisms, junk_limit=ctx.junk_limit)
        self.transport.registerProducer(self, True)
        self.registered = True
        self.core.greeting()
        self._drive()

    def dataReceived(self, data: bytes) -> None:
        if self.closing or self.core is None:
            return
        self.core.receive_data(data)
        if self.busy or self.write_paused:
            self._update_reading()
        self._drive()

    def connectionLost(self, reason=None) -> None:
        self.ctx.sessions.discard(self)
        self._cancel_timer()
        if self.abort_timer is not None and self.abort_timer.active():
            self.abort_timer.cancel()
        self.abort_timer = None
        self.closing = True
        if self.sender is not None:
            self.sender.stopProducing()
            self.sender = None
        if self.retrieval is not None:  # let the pending decision end
            d, self.retrieval = self.retrieval, None
            d.callback(None)
        self._release()
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
                if self.draining and self._idle():
                    self._close(SHUTTING_DOWN)
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
            self._close(b"-ERR [SYS/TEMP] Internal error\r\n")
            return
        if self._flush() or progressed:
            self._arm_timer()

    # -- graceful stop (see protocols/sessions.py) ---------------------------
    def _idle(self) -> bool:
        """Waiting for a command (not in RETR, UPDATE or a login): safe to
        close, and RFC 1939 says a close outside QUIT applies no deletion."""
        return (not self.busy and self.core is not None
                and self.core.state in (State.AUTHORIZATION, State.TRANSACTION))

    def drain(self) -> None:
        """The server is stopping: close now if idle, else at the next command."""
        self.draining = True
        if not self.closing and self._idle():
            log.info("{listener}: shutting down, closing idle session with {client}",
                     listener=self.ctx.name, client=self.client)
            self._close(SHUTTING_DOWN)

    def shut_down(self) -> None:
        """The grace period is over: close now, a message being sent included."""
        self.draining = True
        if self.closing:
            return
        log.info("{listener}: shutdown grace over, closing session with {client}",
                 listener=self.ctx.name, client=self.client)
        if self.sender is not None:
            sender, self.sender = self.sender, None
            self.transport.unregisterProducer()
            sender.stopProducing()
            self._close()  # mid-message: another line would corrupt it
            return
        self._close(SHUTTING_DOWN)

    def _unregister(self) -> None:
        if self.registered:
            self.registered = False
            self.write_paused = False
            self.transport.unregisterProducer()

    def _flush(self) -> bool:
        if self.core is None or self.closing:
            return False
        out = self.core.data_to_send()
        if out:
            write_now(self.transport, out)
        return bool(out)

    HOLD_INPUT = 65536  # unprocessed octets kept while a decision runs

    def _update_reading(self) -> None:
        """Stop reading only when pipelined input piles up behind a pending
        decision: pausing and resuming the socket for every RETR costs two
        system calls each, and the core holds the commands in order anyway."""
        if self.closing:
            return
        hold = ((self.busy or self.write_paused) and self.core is not None
                and self.core.buffered >= self.HOLD_INPUT)
        if hold and not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()
        elif not hold and self.reading_paused:
            self.reading_paused = False
            self.transport.resumeProducing()

    def _decide(self, coro) -> None:
        """Run an async decision; the core holds later commands meanwhile."""
        self.busy = True
        self._update_reading()
        self.deciding = True
        d = defer.ensureDeferred(coro)
        d.addCallback(self._decided)
        d.addErrback(self._broken)
        self.deciding = False

    def _decided(self, _ignored=None) -> None:
        self.busy = False
        if self.closing:
            return
        self._arm_timer()
        self._update_reading()
        if not self.deciding:
            self._drive()

    def _broken(self, failure) -> None:
        log.failure("{listener}: internal error, closing session with {client}", failure,
                    listener=self.ctx.name, client=self.client)
        if not self.closing:
            self._close(b"-ERR [SYS/TEMP] Internal error\r\n")

    def _close(self, last: bytes = b"") -> None:
        try:
            self._flush()
        except Exception:
            log.failure("{listener}: could not flush responses to {client}",
                        listener=self.ctx.name, client=self.client)
        if last:
            self.transport.write(last)
        self.closing = True
        self._cancel_timer()
        self._hang_up()

    def _hang_up(self) -> None:
        # A paused streaming producer would be resumed when the buffer
        # drains, instead of the connection being closed.
        self._unregister()
        self.transport.loseConnection()
        if self.abort_timer is None:
            self.abort_timer = self.ctx.clock.callLater(self.ctx.close_grace,
                                                        self.transport.abortConnection)

    # -- timeouts ----------------------------------------------------------
    def _arm_timer(self) -> None:
        """Note activity.  One DelayedCall per session, armed when none is:
        re-arming a timer for every command costs more than the command
        (cancel, a new DelayedCall, the reactor's heap); on expiry
        :meth:`_timed_out` checks how long the session has really been idle."""
        if self.closing:
            return
        self.last_active = self.ctx.clock.seconds()
        if self.timer is None:
            self.timer = self.ctx.clock.callLater(self.ctx.idle_timeout, self._timed_out)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.closing:
            return
        timeout = self.ctx.idle_timeout
        if self.busy:  # a decision or a message being sent: not idle
            self.timer = self.ctx.clock.callLater(timeout, self._timed_out)
            return
        idle = self.ctx.clock.seconds() - self.last_active
        if idle < timeout:
            self.timer = self.ctx.clock.callLater(timeout - idle, self._timed_out)
            return
        log.info("{listener}: timeout from {client}", listener=self.ctx.name, client=self.client)
        # RFC 1939 3: an autologout closes without entering UPDATE.
        self._close(b"-ERR [SYS/TEMP] Idle too long, closing connection\r\n")

    # -- handlers ------------------------------------------------------------
    def on_starttls(self, event: ev.StartTLS) -> None:
        if self.ctx.tls is None:
            self.core.send_err("TLS not available", code="SYS/TEMP")
            return
        self.core.send_ok("Begin TLS negotiation")
        self._flush()
        self.transport.startTLS(self.ctx.tls.options)
        self.session.forget_tls_state()
        self.core.tls_started()

    def on_authenticate(self, event: ev.Authenticate) -> None:
        self._decide(self._login(event.credentials))

    async def _login(self, credentials) -> None:
        reply = await self.ctx.authenticator.authenticate(self.session, credentials,
                                                          senders=False)
        if reply is R.LOGIN_BLOCKED:
            self.core.send_err("Too many failed logins, try again later", code="SYS/TEMP",
                               close=True)
            return
        if reply is R.AUTH_TEMPORARY:
            self.core.send_err("Temporary authentication failure, try again later",
                               code="SYS/TEMP")
            return
        if reply is not R.AUTH_OK:
            self.core.send_err("Authentication failed", code="AUTH")
            return
        session = self.session
        mailbox = Mailbox(address=(session.address or "").lower(), login=session.login)
        try:
            path = self.ctx.store.maildir_for(mailbox)
            self.maildrop = await self.ctx.io(self.ctx.open_maildrop, path)
        except Exception as e:
            self._refuse_maildrop(e)
            session.forget_tls_state()  # not logged in after all
            return
        infos = [ev.MessageInfo(size=m.size, uid=m.uid) for m in self.maildrop.messages]
        if getattr(self.maildrop, "uidlist_problem", None):
            log.warn("{listener}: {login}: dovecot-uidlist ignored: {why}",
                     listener=self.ctx.name, login=session.login,
                     why=self.maildrop.uidlist_problem)
        log.info("{listener}: {client}: login: user={login}, {n} message(s)",
                 listener=self.ctx.name, client=self.client, login=session.login, n=len(infos))
        self.core.logged_in(infos, identity=session.login)

    def _refuse_maildrop(self, e: Exception) -> None:
        from mailserver.store.maildrop import MaildropInUse

        if isinstance(e, MaildropInUse):
            log.info("{listener}: {client}: {login}: maildrop in use", listener=self.ctx.name,
                     client=self.client, login=self.session.login)
            self.core.send_err("Mailbox is locked by another session", code="IN-USE")
        elif isinstance(e, PermissionError) or getattr(e, "reply", None) is not None:
            log.warn("{listener}: {login}: cannot open the maildrop: {e}",
                     listener=self.ctx.name, login=self.session.login, e=str(e))
            self.core.send_err("Cannot open the mailbox", code="SYS/PERM")
        else:
            log.failure("{listener}: {login}: cannot open the maildrop",
                        listener=self.ctx.name, login=self.session.login)
            self.core.send_err("Cannot open the mailbox now, try again later",
                               code="SYS/TEMP")

    def on_login_failed(self, event: ev.LoginFailed) -> None:
        log.info("{listener}: {client}: authentication failed: sasl_method={mech} ({reason})",
                 listener=self.ctx.name, client=self.client, mech=event.mechanism,
                 reason=event.reason)

    def on_retrieve(self, event: ev.Retrieve) -> None:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == event.index and event.lines is None:
            self._send_wire(event, ahead[1])
            return
        if event.info.size <= CHUNK:  # most messages: answered here, at once
            content = self.maildrop.read_small(event.index, CHUNK)
            if content is not None:
                self._send_whole(event, content)
                return
        self._decide(self._retrieve(event))

    def _send_whole(self, event: ev.Retrieve, content: bytes) -> None:
        """Answer ``event`` with a message read whole, in one write."""
        self._send_wire(event, whole(content, event.lines))

    def _send_wire(self, event: ev.Retrieve, wire: bytes) -> None:
        self.core.send_whole(wire, f"{event.info.size} octets" if event.lines is None else "")
        write_now(self.transport, self.core.data_to_send())
        if event.lines is None:
            in_order = self.last_retr is None or event.index == self.last_retr + 1
            self.last_retr = event.index
            if in_order:
                self._read_ahead(event.index + 1)

    def _read_ahead(self, index: int) -> None:
        """Clients retrieve in order (fetchmail, getmail): while they do,
        prepare the next message's response as this one travels and the
        client reads it, so that its RETR is answered with one write.  Only
        a small message still in the snapshot, neither deleted nor retrieved
        yet, read as :meth:`on_retrieve` would; one at most per session.
        Maildir files never change, so reading a little earlier sends the
        same octets."""
        core = self.core
        if (self.closing or index >= len(core.messages) or index in core.deleted
                or index in core.retrieved or core.messages[index].size > CHUNK):
            return
        content = self.maildrop.read_small(index, CHUNK)
        if content is not None:
            self.ahead = (index, whole(content))

    async def _retrieve(self, event: ev.Retrieve) -> None:
        """The message opened (and found again if it moved) and its first
        chunk read in a worker thread, then sent."""
        try:
            f, first = await self.ctx.io(_open_and_read, self.maildrop, event.index)
        except FileNotFoundError:
            self.core.send_err(f"message {event.number} was removed by another client")
            return
        except OSError:
            log.failure("{listener}: {login}: cannot read message {n}",
                        listener=self.ctx.name, login=self.session.login, n=event.number)
            self.core.send_err("Cannot read the message now", code="SYS/TEMP")
            return
        if self.closing:
            f.close()
            return
        if len(first) < CHUNK:
            f.close()
            self._send_whole(event, first)
            return
        self.core.send_ok(f"{event.info.size} octets" if event.lines is None else "")
        out = self.core.stuff(first)  # the +OK line first
        if self.core.retrieve_done:  # TOP had all it wanted
            f.close()
            self.core.finish_retrieve()
            self.transport.write(out + self.core.data_to_send())
            return
        self.transport.write(out)
        # Made before registering: the transport may pull the rest at once,
        # inside registerProducer.
        done = self.retrieval = defer.Deferred()
        self.sender = _MessageSender(self, f)
        self._unregister()  # the sender's pulls pace the writes now
        self.transport.registerProducer(self.sender, False)
        await done

    def _retrieved(self, sender: _MessageSender) -> None:
        if self.sender is not sender:
            return
        self.sender = None
        self.transport.unregisterProducer()
        sender.stopProducing()
        if not self.closing:
            self.transport.registerProducer(self, True)
            self.registered = True
        self.core.finish_retrieve()
        self._flush()
        d, self.retrieval = self.retrieval, None
        d.callback(None)

    def on_update(self, event: ev.Update) -> None:
        drop = self.maildrop
        if drop.needs_io(event.deleted, event.retrieved):
            self._decide(self._update(event))
            return
        try:  # nothing to delete, move or flag: no file system call, no thread
            drop.update(event.deleted, event.retrieved)
        except Exception:
            self._updated(event, ok=False)
        else:
            self._updated(event, ok=True)

    async def _update(self, event: ev.Update) -> None:
        try:
            await self.ctx.io(self.maildrop.update, event.deleted, event.retrieved)
        except Exception:
            self._updated(event, ok=False)
        else:
            self._updated(event, ok=True)

    def _updated(self, event: ev.Update, ok: bool) -> None:
        """Answer the UPDATE (called in the handler of its failure, if any)
        and release the lock."""
        if ok:
            log.info("{listener}: {client}: logout: user={login}, {n} deleted",
                     listener=self.ctx.name, client=self.client, login=self.session.login,
                     n=len(event.deleted))
            self.core.send_ok("Bye")
        else:
            log.failure("{listener}: {login}: UPDATE failed", listener=self.ctx.name,
                        login=self.session.login)
            self.core.send_err("Some deleted messages could not be removed", code="SYS/TEMP")
        self._release()

    def _release(self) -> None:
        """Give up the maildrop's lock (no changes applied)."""
        self.ahead = None
        if self.maildrop is not None:
            drop, self.maildrop = self.maildrop, None
            drop.close()

    def on_quit(self, event) -> None:
        self._close()

    def on_closed(self, event) -> None:
        self.closing = True
        self._cancel_timer()

    HANDLERS = {
        ev.StartTLS: on_starttls,
        ev.Authenticate: on_authenticate,
        ev.LoginFailed: on_login_failed,
        ev.Retrieve: on_retrieve,
        ev.Update: on_update,
        ev.Quit: on_quit,
        ev.Closing: on_quit,
        ev.ConnectionClosed: on_closed,
    }


class POP3Factory(Factory):
    def __init__(self, ctx: POP3Context) -> None:
        self.ctx = ctx

    def buildProtocol(self, addr) -> POP3ServerProtocol:
        p = POP3ServerProtocol(self.ctx)
        p.factory = self
        return p
