# -*- test-case-name: tests.unit.test_smtp_client -*-
"""The sans-IO outbound SMTP / LMTP client: replies in, commands out.

No networking and no Twisted here.  The adapter
(:mod:`mailserver.protocols.outbound`) feeds what it reads to
:meth:`SMTPClientConnection.receive_data`, loops on
:meth:`~SMTPClientConnection.next_event` and writes
:meth:`~SMTPClientConnection.data_to_send`.  The events are:

* :class:`NeedTLS`: the server said 220 to STARTTLS.  Start the handshake,
  then call :meth:`~SMTPClientConnection.tls_started`.
* :class:`SendContent`: the server said 354.  Feed the message content
  through :meth:`~SMTPClientConnection.send_content` (as it is in the queue:
  CR LF line ends, not dot-stuffed) and finish with
  :meth:`~SMTPClientConnection.end_content`.
* :class:`MessageDone`: the transaction is over; its :class:`ClientResult`
  has one reply per recipient.  Then call :meth:`~SMTPClientConnection.quit`
  or :meth:`~SMTPClientConnection.next_message` (RSET, then the next
  transaction on the same connection), unless :class:`Closed` follows.
* :class:`Closed`: the session is over; write what is queued and close.

How replies are matched: every command sent puts a (phase, handler) pair on
a queue, and each reply goes to the pair at its head.  That queue is the
client's state table: with PIPELINING it holds MAIL, every RCPT and DATA at
once, without it one command at a time.  :attr:`~SMTPClientConnection.phase`
names what the client waits for, which the adapter uses to pick its timeout.

Policy choices:

* **Greeting, EHLO/HELO/LHLO, STARTTLS, AUTH and MAIL failures** answer every
  recipient with one reply (:attr:`ClientResult.connection_error`).  A failure
  before MAIL, a 4xx to MAIL, a 421 anywhere, a malformed reply, a timeout or
  a lost connection before the final dot sets
  :attr:`ClientResult.retry_elsewhere`: another MX may do better.  RCPT
  replies are per recipient and never send us to the next host.
* **EHLO refused with 5xx** falls back to HELO (no extensions).  LMTP has
  no fallback.
* **STARTTLS** is used whenever offered and ``tls_available``.  Once its 220
  has been read, nothing more is parsed: bytes buffered before the handshake
  are thrown away by :meth:`~SMTPClientConnection.tls_started`, so replies a
  man in the middle appends to the 220 are never believed.  Then EHLO again.
  With ``require_tls`` a server without STARTTLS gets no mail:
  ``REMOTE_TLS_NOT_OFFERED`` (451 4.7.4, like Postfix); a refused STARTTLS
  gives ``REMOTE_TLS_REFUSED``.  Without ``require_tls`` a refused STARTTLS
  continues in plaintext.
* **AUTH** PLAIN (preferred) or LOGIN, only over TLS unless
  ``allow_plaintext_auth``.  A failed login defers the mail
  (``REMOTE_AUTH_FAILED``, 454 4.7.8, the remote reply kept in the details)
  rather than bouncing it, like Postfix's ``smtp_sasl_auth_soft_bounce``: a
  wrong password is the sender's administrator's problem, not the message's.
* **Refusals made here, before MAIL** (the connection stays usable): a
  message over the server's SIZE gets ``REMOTE_SIZE_EXCEEDED`` (552 5.3.4);
  8-bit content for a server without 8BITMIME gets ``REMOTE_NO_8BITMIME``
  (554 5.6.3, "conversion required but not supported": we never send 8-bit
  data to a 7-bit server and we do not convert); a message that needs
  SMTPUTF8 (flagged, or a non-ASCII address) for a server without it gets
  ``REMOTE_NO_SMTPUTF8`` (553 5.6.7, as RFC 6531 §3.6.1 and Postfix use for
  non-ASCII addresses).  The 8-bit decision trusts
  :attr:`OutboundMessage.eight_bit`; the content is not scanned.
* **Addresses no command can carry** (a control character, a space outside
  a quoted local part, an angle bracket: see
  :func:`~mailserver.sansio._client_commands.sendable`) are never sent: such
  a recipient gets ``553 5.1.3`` at once, and an unsendable sender gives
  every recipient ``553 5.1.7`` without a MAIL command.
* **MAIL/RCPT parameters**: SIZE= when the server has SIZE, BODY=8BITMIME
  for 8-bit content, SMTPUTF8 when needed; RET/ENVID and NOTIFY/ORCPT only
  when the server has DSN (ENVID and ORCPT as xtext).
* **Recipients** are sent once each (duplicates are dropped) and answered
  by address.  DATA is sent only with an accepted recipient; with PIPELINING
  it is already on its way, and a 354 for a transaction without recipients
  (RFC 2920 §3.1) gets an empty message whose reply is ignored (SMTP) or ends
  the session (LMTP, where no reply count would be right).
* **Replies**: the enhanced code is read only when the server announced
  ENHANCEDSTATUSCODES; a reply without one gets ``X.0.0`` of its class, so
  every recipient's reply can go into a DSN.  The remote's text is kept (and
  also put in :attr:`ClientResult.details`).  A reply line over
  ``max_reply_line`` octets, a reply over ``max_reply_lines`` lines, or
  anything that is not a reply ends the session with
  ``REMOTE_PROTOCOL_ERROR`` (451 4.5.0); nothing the server sends can raise
  out of :meth:`~SMTPClientConnection.next_event`.
* **Content**: dot-stuffed, every line ending in CR LF (see
  :class:`~mailserver.sansio._client_commands.DotStuffer`).
"""

from __future__ import annotations

import base64
import collections
from functools import partial
from typing import Callable, Optional, Union

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.sansio._client_commands import (
    DotStuffer,
    check_message,
    mail_command,
    rcpt_command,
    refusal,
    unsendable,
)
from mailserver.sansio._client_events import (
    ClientEvent,
    ClientResult,
    Closed,
    MessageDone,
    NeedTLS,
    Phase,
    SendContent,
    UsageError,
)
from mailserver.sansio._client_replies import (
    MalformedReply,
    RawReply,
    ReplyReader,
    make_reply,
    parse_extensions,
    with_enhanced,
)
from mailserver.sansio.smtp_events import NEED_DATA, Sentinel
from mailserver.reply import Reply

__all__ = [
    "SMTPClientConnection", "ClientResult", "ClientEvent", "NeedTLS", "SendContent",
    "MessageDone", "Closed", "Phase", "UsageError", "NEED_DATA",
]

Handler = Callable[[RawReply], None]


class SMTPClientConnection:
    """One outbound SMTP or LMTP session, without I/O.

    ``helo_name`` is our name in EHLO/HELO/LHLO.  ``tls_available`` says the
    adapter can start TLS; ``require_tls`` refuses to deliver without it.
    ``auth`` is ``(user, password)`` or ``None``.  ``message`` is the first
    message to send; more follow with :meth:`next_message`.  ``remote`` names
    the server in the replies made up here ("mx.example.org[192.0.2.1]").
    """

    def __init__(
        self,
        helo_name: str,
        *,
        lmtp: bool = False,
        tls_available: bool,
        require_tls: bool,
        auth: Optional[tuple[str, str]],
        message: OutboundMessage,
        allow_plaintext_auth: bool = False,
        max_reply_line: int = 2048,
        max_reply_lines: int = 100,
        remote: str = "the remote server",
    ) -> None:
        self.helo_name = helo_name
        self.lmtp = lmtp
        self.tls_available = tls_available
        self.require_tls = require_tls
        self.auth = auth
        self.allow_plaintext_auth = allow_plaintext_auth
        self.remote = remote
        self.tls_active = False
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self._reader = ReplyReader(max_reply_line, max_reply_lines)
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._events: collections.deque[ClientEvent] = collections.deque()
        self._expect: collections.deque[tuple[Phase, Handler]] = collections.deque()
        self._rest = Phase.GREETING  # the phase while nothing is expected
        self._begin(message)
        self._await(Phase.GREETING, self._on_greeting)

    # --- public API ------------------------------------------------------
    @property
    def phase(self) -> Phase:
        """What the client waits for (the adapter's timeout depends on it)."""
        return self._expect[0][0] if self._expect else self._rest

    @property
    def closed(self) -> bool:
        return self._rest is Phase.CLOSED

    @property
    def message(self) -> OutboundMessage:
        """The message of the current (or last) transaction."""
        return self._message

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data`` from the server; ``b""`` means it closed."""
        if self.closed:
            return
        if not data:
            self._eof = True
        elif self._rest is not Phase.TLS:  # never believe pre-handshake bytes
            self._buf += data

    def connection_lost(self) -> None:
        """The connection is gone (same as ``receive_data(b"")``)."""
        self.receive_data(b"")

    def next_event(self) -> Union[ClientEvent, Sentinel]:
        """The next event, or ``NEED_DATA``."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.closed:
                return NEED_DATA
            if self._rest is Phase.TLS and not self._eof:
                return NEED_DATA
            try:
                raw = None if self._rest is Phase.TLS else self._reader.next_reply(self._buf)
            except MalformedReply:
                self._fail(R.REMOTE_PROTOCOL_ERROR, retry=not self._dot_sent)
                continue
            if raw is not None:
                self._handle(raw)
            elif self._eof:
                self._lost()
            else:
                return NEED_DATA

    def data_to_send(self) -> bytes:
        """Take the queued command bytes."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The handshake is done: forget everything from before it, EHLO again."""
        if self._rest is not Phase.TLS:
            raise UsageError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.extensions = {}
        self._buf.clear()
        self._reader.reset()
        self._rest = Phase.HELLO
        self._hello()

    def send_content(self, chunk: bytes) -> None:
        """Queue the next piece of the message content, dot-stuffed."""
        if self.phase is not Phase.CONTENT:
            raise UsageError("send_content() outside the content phase")
        self._out += self._stuffer.feed(chunk)

    def end_content(self) -> None:
        """The content is complete: send the final "." and await the reply."""
        if self.phase is not Phase.CONTENT:
            raise UsageError("end_content() outside the content phase")
        self._out += self._stuffer.finish()
        self._dot_sent = True
        if self.lmtp:
            for rcpt in self._accepted:
                self._await(Phase.DOT, partial(self._on_final_lmtp, rcpt))
        else:
            self._await(Phase.DOT, self._on_final)

    def next_message(self, message: OutboundMessage) -> None:
        """Reuse the connection: RSET, then the transaction for ``message``."""
        if self.phase is not Phase.IDLE:
            raise UsageError("next_message() while not idle")
        self._begin(message)
        self._resetting = True
        self._command("RSET", Phase.RSET, self._on_rset)

    def quit(self) -> None:
        """End the session politely (``Closed`` follows the server's reply)."""
        if self.phase is not Phase.IDLE:
            raise UsageError("quit() while not idle")
        self._command("QUIT", Phase.QUIT, self._on_quit)

    def abort(self, reply: Reply, *, retry_elsewhere: Optional[bool] = None) -> None:
        """Give up now (timeout, failed handshake, unreadable content).

        Recipients without a final answer get ``reply``; ``retry_elsewhere``
        defaults to "the final dot was not sent yet".  ``Closed`` follows.
        """
        if self.closed:
            return
        retry = (not self._dot_sent) if retry_elsewhere is None else retry_elsewhere
        self._fail(reply, retry=retry)

    # --- plumbing --------------------------------------------------------
    def _begin(self, message: OutboundMessage) -> None:
        """Set up the state of one transaction."""
        check_message(message)
        self._message = message
        seen: dict[str, OutboundRecipient] = {}
        for rcpt in message.recipients:
            seen.setdefault(rcpt.address, rcpt)
        self._rcpts = list(seen.values())
        self._results: dict[str, Reply] = {}
        self._details: dict[str, str] = {}
        self._accepted: list[str] = []
        self._error: Optional[Reply] = None
        self._retry = False
        self._dot_sent = False
        self._done_sent = False
        self._resetting = False
        self._pipelined = False
        self._later: collections.deque[tuple[str, Phase, Handler]] = collections.deque()
        self._stuffer = DotStuffer()
        for address, reply in unsendable(message).items():
            self._final(address, reply, from_remote=False)

    def _await(self, phase: Phase, handler: Handler) -> None:
        self._expect.append((phase, handler))

    def _command(self, line: str, phase: Phase, handler: Handler) -> None:
        self._out += line.encode("utf-8") + b"\r\n"
        self._await(phase, handler)

    def _remote(self, raw: RawReply) -> Reply:
        """The remote's reply, with an enhanced code (its own or X.0.0)."""
        return with_enhanced(make_reply(raw, "ENHANCEDSTATUSCODES" in self.extensions))

    def _handle(self, raw: RawReply) -> None:
        if not self._expect:
            self._unexpected(raw)
            return
        phase, handler = self._expect.popleft()
        if raw.code == 421 and phase is not Phase.QUIT:
            # The server is closing the channel: no reply after this one.
            self._fail(self._remote(raw), retry=not self._dot_sent, from_remote=True)
            return
        handler(raw)

    def _unexpected(self, raw: RawReply) -> None:
        """A reply nobody asked for: an early refusal during the content,
        or a server closing an idle connection."""
        if self._rest is Phase.CONTENT:
            reply = self._remote(raw)
            if reply.is_positive:
                self._fail(R.REMOTE_PROTOCOL_ERROR, retry=False)
            else:
                self._fail(reply, retry=False, from_remote=True)
            return
        self._shut()

    def _lost(self) -> None:
        if self.phase in (Phase.IDLE, Phase.QUIT):
            self._shut()
            return
        lost = R.CONNECTION_LOST.with_text(R.CONNECTION_LOST.text.format(remote=self.remote))
        self._fail(lost, retry=not self._dot_sent)

    def _final(self, rcpt: str, reply: Reply, *, from_remote: bool = True) -> None:
        self._results[rcpt] = reply
        if from_remote:
            self._details[rcpt] = str(reply)

    def _done(self) -> None:
        """Report the transaction and rest (IDLE) until told what next."""
        if self._done_sent:
            return
        self._done_sent = True
        result = ClientResult(
            replies={r.address: self._results[r.address] for r in self._rcpts},
            details=dict(self._details),
            connection_error=self._error,
            retry_elsewhere=self._retry,
            reset_failed=self._resetting,
        )
        self._events.append(MessageDone(result))
        self._rest = Phase.IDLE

    def _all(self, reply: Reply, *, retry: bool, from_remote: bool = False,
             diagnostic: str = "") -> None:
        """Answer every recipient still without an answer with ``reply``."""
        self._error = reply
        self._retry = retry
        for rcpt in self._rcpts:
            if rcpt.address not in self._results:
                self._final(rcpt.address, reply, from_remote=from_remote)
                if diagnostic:
                    self._details[rcpt.address] = diagnostic
        self._accepted = []

    def _fail(self, reply: Reply, *, retry: bool, quit: bool = False,
              from_remote: bool = False, diagnostic: str = "") -> None:
        """End the session; a transaction in progress gets ``reply``."""
        if not self._done_sent:
            self._all(reply, retry=retry, from_remote=from_remote, diagnostic=diagnostic)
            self._done()
        if quit:
            self._out += b"QUIT\r\n"
        self._shut()

    def _shut(self) -> None:
        if self.closed:
            return
        self._rest = Phase.CLOSED
        self._expect.clear()
        self._buf.clear()
        self._events.append(Closed())

    # --- greeting, hello, TLS, AUTH ----------------------------------------
    def _session_error(self, raw: RawReply) -> None:
        """A refusal before the transaction: every recipient, next host, QUIT."""
        self._fail(self._remote(raw), retry=True, quit=True, from_remote=True)

    def _on_greeting(self, raw: RawReply) -> None:
        if raw.code // 100 == 2:
            self._hello()
        else:
            self._session_error(raw)

    def _hello(self) -> None:
        verb = "LHLO" if self.lmtp else "EHLO"
        self._command(f"{verb} {self.helo_name}", Phase.HELLO, self._on_ehlo)

    def _on_ehlo(self, raw: RawReply) -> None:
        if raw.code // 100 == 2:
            self.extensions = parse_extensions(raw)
            self.esmtp = True
            self._after_hello()
        elif raw.code // 100 == 5 and not self.lmtp:
            self._command(f"HELO {self.helo_name}", Phase.HELLO, self._on_helo)
        else:
            self._session_error(raw)

    def _on_helo(self, raw: RawReply) -> None:
        if raw.code // 100 == 2:
            self.extensions = {}
            self.esmtp = False
            self._after_hello()
        else:
            self._session_error(raw)

    def _after_hello(self) -> None:
        if not self.tls_active:
            if self.tls_available and "STARTTLS" in self.extensions:
                self._command("STARTTLS", Phase.STARTTLS, self._on_starttls)
                return
            if self.require_tls:
                self._fail(R.REMOTE_TLS_NOT_OFFERED, retry=True, quit=True)
                return
        self._authenticate()

    def _on_starttls(self, raw: RawReply) -> None:
        if raw.code == 220:
            # Whatever came with the 220 was sent before the handshake.
            self._buf.clear()
            self._reader.reset()
            self._rest = Phase.TLS
            self._events.append(NeedTLS())
        elif self.require_tls:
            remote = self._remote(raw)
            self._fail(R.REMOTE_TLS_REFUSED, retry=True, quit=True, diagnostic=str(remote))
        else:
            self._authenticate()

    def _authenticate(self) -> None:
        if self.auth is None:
            self._start_transaction()
            return
        if not self.tls_active and not self.allow_plaintext_auth:
            self._fail(R.REMOTE_AUTH_NEEDS_TLS, retry=True, quit=True)
            return
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        user, password = (s.encode("utf-8") for s in self.auth)
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode("ascii")
            self._command(f"AUTH PLAIN {token}", Phase.AUTH, self._on_auth)
        elif "LOGIN" in mechanisms:
            self._command("AUTH LOGIN", Phase.AUTH, partial(self._on_login, [user, password]))
        else:
            self._fail(R.REMOTE_AUTH_NOT_OFFERED, retry=True, quit=True)

    def _on_login(self, secrets: list[bytes], raw: RawReply) -> None:
        if raw.code != 334:
            self._on_auth(raw)
            return
        token = base64.b64encode(secrets[0]).decode("ascii")
        rest = secrets[1:]
        handler = partial(self._on_login, rest) if rest else self._on_auth
        self._command(token, Phase.AUTH, handler)

    def _on_auth(self, raw: RawReply) -> None:
        if raw.code // 100 == 2:
            self._start_transaction()
        elif raw.code == 334:  # a challenge we have no answer for: cancel
            self._command("*", Phase.AUTH, self._auth_failed)
        else:
            self._auth_failed(raw)

    def _auth_failed(self, raw: RawReply) -> None:
        remote = self._remote(raw)
        text = f"{R.REMOTE_AUTH_FAILED.text} ({str(remote)})"
        self._fail(R.REMOTE_AUTH_FAILED.with_text(text), retry=True, quit=True,
                   diagnostic=str(remote))

    # --- the transaction -------------------------------------------------
    def _on_rset(self, raw: RawReply) -> None:
        if raw.code // 100 == 2:
            self._resetting = False
            self._start_transaction()
        else:
            self._fail(self._remote(raw), retry=True, quit=True, from_remote=True)

    def _start_transaction(self) -> None:
        pending = [r for r in self._rcpts if r.address not in self._results]
        if not pending:  # every address was unsendable: nothing to say
            self._done()
            return
        refused = refusal(self._message, self.extensions)
        if refused is not None:  # another MX may offer REQUIRETLS
            self._all(refused, retry=refused is R.REMOTE_NO_REQUIRETLS)
            self._done()
            return
        commands: list[tuple[str, Phase, Handler]] = [
            (mail_command(self._message, self.extensions), Phase.MAIL, self._on_mail)]
        for rcpt in pending:
            commands.append((rcpt_command(rcpt, self.extensions), Phase.RCPT,
                             partial(self._on_rcpt, rcpt.address)))
        commands.append(("DATA", Phase.DATA, self._on_data))
        self._pipelined = "PIPELINING" in self.extensions
        if self._pipelined:
            for command in commands:
                self._command(*command)
        else:
            self._later.extend(commands)
            self._send_next()

    def _send_next(self) -> None:
        line, phase, handler = self._later.popleft()
        self._command(line, phase, handler)

    def _on_mail(self, raw: RawReply) -> None:
        reply = self._remote(raw)
        if reply.is_positive:
            if not self._pipelined:
                self._send_next()
            return
        self._all(reply, retry=reply.is_temporary, from_remote=True)
        if not self._pipelined:  # with PIPELINING the RCPT and DATA replies follow
            self._later.clear()
            self._done()

    def _on_rcpt(self, rcpt: str, raw: RawReply) -> None:
        if self._error is not None:  # MAIL failed: the RCPT replies mean nothing
            return
        reply = self._remote(raw)
        if reply.is_positive:
            self._accepted.append(rcpt)
        else:
            self._final(rcpt, reply)
        if self._pipelined:
            return
        if len(self._later) == 1 and not self._accepted:  # only DATA left
            self._later.clear()
            self._done()
        else:
            self._send_next()

    def _on_data(self, raw: RawReply) -> None:
        if self._error is not None or not self._accepted:
            if raw.code != 354:
                self._done()
            elif self.lmtp:
                self._fail(R.REMOTE_PROTOCOL_ERROR, retry=False)
            else:  # RFC 2920 §3.1: an empty message, its reply ignored
                self._out += b".\r\n"
                self._await(Phase.DOT, lambda raw: self._done())
            return
        if raw.code == 354:
            self._rest = Phase.CONTENT
            self._events.append(SendContent())
            return
        reply = self._remote(raw)
        if reply.is_positive:
            self._fail(R.REMOTE_PROTOCOL_ERROR, retry=True)
            return
        self._all(reply, retry=False, from_remote=True)
        self._done()

    def _on_final(self, raw: RawReply) -> None:
        reply = self._remote(raw)
        for rcpt in self._accepted:
            self._final(rcpt, reply)
        self._accepted = []
        self._done()

    def _on_final_lmtp(self, rcpt: str, raw: RawReply) -> None:
        self._final(rcpt, self._remote(raw))
        self._accepted.remove(rcpt)
        if not self._accepted:
            self._done()

    def _on_quit(self, raw: RawReply) -> None:
        self._shut()
