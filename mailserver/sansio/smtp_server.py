# -*- test-case-name: tests.unit.test_smtp_server -*-
"""The sans-IO SMTP / LMTP server core: bytes in, events and reply bytes out.

No networking and no Twisted here (the h11 rule).  The adapter feeds what it
reads to :meth:`SMTPServerConnection.receive_data`, loops on
:meth:`~SMTPServerConnection.next_event`, answers decisions with
:meth:`~SMTPServerConnection.send` and writes
:meth:`~SMTPServerConnection.data_to_send`.  The events are in
:mod:`mailserver.sansio.smtp_events`.

Ordering (PIPELINING, RFC 2920): commands are handled one at a time, in the
order received.  While a decision (``StartTLS``, ``Authenticate``,
``MailFrom``, ``RcptTo``, ``DataEnd``, ``Etrn``) waits for its reply,
``next_event()`` returns ``PAUSED`` and no later command is looked at, so
replies always come out in command order.  In LMTP mode ``DataEnd`` waits for
one reply per accepted recipient, in RCPT order.

Policy choices:

* **Command lines** may end in CR LF or a bare LF (one CR before the LF is
  removed).  A line over its limit is discarded up to its LF and answered
  with ``LINE_TOO_LONG``; the session goes on.  The limit is
  ``max_command_line`` octets, plus, for MAIL and RCPT, what the extensions
  in the EHLO reply let them grow by (:data:`LINE_ALLOWANCES`): 564 and 512
  by default, 664 and 1012 with DSN, MAIL 500 more with AUTH.  While AUTH
  is advertised the AUTH command itself may carry an initial response as
  long as a continuation line (512 + ``sasl.MAX_RESPONSE``): RFC 4954 §4
  asks clients to keep to 512 octets, but some send PLAIN credentials in
  the command whatever their length.  NUL in a command gives
  ``NUL_IN_COMMAND``.
* **HELO/EHLO/LHLO is required** before MAIL and STARTTLS (``NEED_HELO`` /
  ``NEED_LHLO``), like Postfix's ``smtpd_helo_required``.  LMTP takes only
  LHLO (HELO/EHLO get ``USE_LHLO``); SMTP does not know LHLO.
* **DATA without recipients**: ``NO_VALID_RCPTS`` (554) when RCPT commands
  were sent but none was accepted, ``NEED_RCPT`` (503) when none was sent
  (RFC 5321 §3.3 allows either; RFC 2920 §3.1).  LMTP always answers 503
  (RFC 2033 §4.2).
* **End of data is exactly CR LF "." CR LF.**  Bare CR or LF never ends the data
  or starts a command (see :mod:`mailserver.sansio.lines`).  Content with a bare
  CR or LF, a NUL, a line over ``max_text_line`` or more than
  ``max_message_size`` octets is read to its real end and then refused
  (``BARE_NEWLINE``, ``NUL_IN_DATA``, ``DATA_LINE_TOO_LONG``,
  ``MESSAGE_TOO_BIG``) with a ``DataAborted`` event instead of ``DataEnd``.
  No ``DataChunk`` is emitted once the content is known to be refused.
  The session then continues.
* **BDAT** (RFC 3030): the announced octets are always consumed, even when the
  command is refused (no transaction, no recipient); the refusal comes after
  them.  A chunk whose content is refused fails the transaction at once
  (``DataAborted``), and later pipelined chunks are consumed and refused with
  ``NEED_MAIL``.  A BDAT whose size cannot be read leaves no way to find the
  next command: the core answers ``BDAT_SYNTAX`` then closes with
  ``PROTOCOL_DESYNC`` (421) and a ``Closing`` event.
* **STARTTLS** discards every byte buffered after the command and ignores
  input until the application answers; after a positive answer, input stays
  ignored until :meth:`~SMTPServerConnection.tls_started`, which forgets HELO,
  authentication and the transaction (RFC 3207 §4.2).  A negative answer
  continues in plaintext.
* **AUTH** (RFC 4954) exists only when ``auth_mechanisms`` are configured
  (else ``AUTH_NOT_ENABLED``, the port 25 default).  With
  ``auth_requires_tls`` (the default) it is neither advertised nor accepted
  before TLS (``MUST_STARTTLS``), so a password never crosses in clear.  It
  needs a greeting first, is refused inside a transaction
  (``AUTH_IN_TRANSACTION``) and once authenticated (``AUTH_ALREADY``), and
  STARTTLS is refused after a successful AUTH (``BAD_SEQUENCE``: the client
  should have secured the channel first).  The SASL exchange
  (:mod:`mailserver.sasl`) runs in the core: each challenge is a ``334``
  reply, each response line is read whole up to ``sasl.MAX_RESPONSE`` octets
  plus CR LF (a longer one is discarded up to its LF and answered
  ``AUTH_LINE_TOO_LONG``).  The core itself answers a cancel ``*``
  (``AUTH_CANCELLED``), malformed data (``AUTH_MALFORMED``) and a PLAIN
  authzid other than the login (``AUTH_FAILED``), and emits ``AuthFailed``
  for the record.  Well-formed credentials become an ``Authenticate``
  decision; only the application checks passwords.  A positive answer must
  name the identity (``send(AUTH_OK, identity=login)``), which the core
  keeps in ``auth_identity`` until
  :meth:`~SMTPServerConnection.tls_started`; any other answer leaves the
  session unauthenticated.  Authentication survives RSET and EHLO (RFC 5321
  resets only the transaction).  While AUTH is advertised, MAIL takes
  ``AUTH=`` (RFC 4954 §5): xtext decoding to ``<>`` or an addr-spec, passed
  on decoded in ``MailFrom.params["AUTH"]`` (anything else:
  ``BAD_ARGUMENTS``); whether to trust it is the application's call.
* **Errors**: every negative reply counts, except ``TOO_MANY_RECIPIENTS`` and
  the replies to ``DataEnd`` (those are the server's trouble, not the
  client's).  When the count exceeds ``max_errors`` the core sends
  ``TOO_MANY_ERRORS`` (421) and emits ``Closing``.
* **Junk commands** (NOOP, RSET, VRFY, HELP, ETRN, as Postfix's
  ``smtpd_junk_command_limit``; also a repeated HELO/EHLO/LHLO and a RCPT
  past ``max_recipients``) are counted too: past
  ``max_junk_commands`` the core sends ``TOO_MANY_JUNK_COMMANDS`` (421) and
  emits ``Closing``, so a client cannot hold a session open with a NOOP
  every few seconds.  An accepted message starts the count again (an LMTP
  feed sends RSET between messages).
* **Enhanced codes** are on every reply except the greeting, 354 and the
  HELO/EHLO/LHLO replies, whose first word must be the server's domain
  (RFC 5321 §4.1.1.1; RFC 2034 leaves the EHLO keyword lines alone).
* ``Reset`` is emitted whenever a transaction ends or is discarded: RSET,
  HELO/EHLO during a transaction, and after the reply(ies) to ``DataEnd`` or a
  ``DataAborted``.  The adapter drops any open content on ``Reset``.
* A 421 passed to :meth:`~SMTPServerConnection.send` (``SHUTTING_DOWN``...)
  ends the session like the core's own 421: ``Closing`` follows.
* After ``Quit``, ``Closing`` or ``ConnectionClosed`` input is ignored and
  ``next_event()`` returns ``NEED_DATA``.
"""

from __future__ import annotations

import collections
import enum
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

from mailserver import reply as R
from mailserver import sasl
from mailserver.address import (
    Address,
    check_dsn_mail_params,
    check_dsn_rcpt_params,
    check_known_params,
    check_mail_params,
    parse_params,
    parse_path,
    split_argument,
)
from mailserver.errors import ProtocolError
from mailserver.sansio.lines import (
    TOO_LONG,
    BdatReader,
    CommandFramer,
    ContentChecker,
    DotReader,
)
from mailserver.sansio.smtp_events import (
    AUTH_TOO_LONG,
    NEED_DATA,
    PAUSED,
    AuthFailed,
    Authenticate,
    Closing,
    ConnectionClosed,
    DataAborted,
    DataChunk,
    DataEnd,
    DataStart,
    Etrn,
    Event,
    Hello,
    MailFrom,
    Quit,
    RcptTo,
    Reset,
    Sentinel,
    StartTLS,
)
from mailserver.reply import Reply

DEFAULT_MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8"})
"""MAIL parameters accepted by default; others get ``PARAM_NOT_RECOGNIZED``."""

DEFAULT_RCPT_PARAMS: frozenset[str] = frozenset()
"""RCPT parameters accepted by default (DSN's NOTIFY/ORCPT come later)."""

LINE_ALLOWANCES: dict[str, dict[str, int]] = {
    "SIZE": {"MAIL": 26},  # RFC 1870: SIZE=
    "8BITMIME": {"MAIL": 16},  # RFC 6152: BODY=
    "SMTPUTF8": {"MAIL": 10},  # RFC 6531 3.1
    "REQUIRETLS": {"MAIL": 11},  # RFC 8689 4.1: " REQUIRETLS"
    "DSN": {"MAIL": 100, "RCPT": 500},  # RFC 3461: RET, ENVID; NOTIFY, ORCPT
    "AUTH": {"MAIL": 500, "AUTH": sasl.MAX_RESPONSE},  # RFC 4954: AUTH=; initial response
}
"""Octets an advertised extension adds to a verb's command line limit."""


_JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP", "ETRN"})

# Per-connection work done once per kind of connection: the verb tables
# (by class, LMTP, ETRN) and the command line limits (by what the
# extensions offered change).
_COMMAND_TABLES: dict = {}
_VERB_LIMITS: dict = {}
"""Commands that move no mail (Postfix's junk commands, HELP added)."""


class Mode(enum.Enum):
    """Which service the connection speaks for."""

    MX = "mx"
    SUBMISSION = "submission"
    LMTP = "lmtp"


@dataclass(frozen=True)
class Limits:
    """Per-connection limits; octet counts include the CR LF."""

    max_command_line: int = 512
    max_text_line: int = 1000
    max_message_size: int = 26214400  # 0: no limit
    max_recipients: int = 100
    max_errors: int = 10
    max_junk_commands: int = 100  # NOOP/RSET/VRFY/HELP/ETRN per session; 0: no limit


class State(enum.Enum):
    """Session state.  Every change goes through :data:`TRANSITIONS`."""

    INITIAL = "initial"  # connected (or TLS just started): no HELO yet
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # sender accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # DATA content arriving
    BDAT = "bdat"  # BDAT chunks arriving, LAST not seen yet
    AUTH = "auth"  # a SASL exchange in progress, or its credentials being checked
    CLOSED = "closed"


S = State
TRANSITIONS: dict[State, dict[str, State]] = {
    S.INITIAL: {"HELLO": S.READY, "RSET": S.INITIAL},
    S.READY: {
        "HELLO": S.READY, "RSET": S.READY, "MAIL": S.MAIL, "TLS": S.INITIAL, "AUTH": S.AUTH,
    },
    S.MAIL: {"HELLO": S.READY, "RSET": S.READY, "RCPT": S.RCPT},
    S.RCPT: {"HELLO": S.READY, "RSET": S.READY, "RCPT": S.RCPT, "DATA": S.DATA, "BDAT": S.BDAT},
    S.DATA: {"END": S.READY},
    S.BDAT: {"HELLO": S.READY, "RSET": S.READY, "BDAT": S.BDAT, "END": S.READY},
    S.AUTH: {"END": S.READY},
    S.CLOSED: {},
}
"""``TRANSITIONS[state][trigger] -> new state``.  A command whose trigger is
missing for the current state is out of sequence (see :data:`SEQUENCE_ERRORS`)."""

TRIGGERS = {
    "HELO": "HELLO",
    "EHLO": "HELLO",
    "LHLO": "HELLO",
    "MAIL": "MAIL",
    "RCPT": "RCPT",
    "DATA": "DATA",
    "BDAT": "BDAT",
    "STARTTLS": "TLS",
    "AUTH": "AUTH",
}
"""The transition a command leads to; commands not listed fit every state."""

SEQUENCE_ERRORS: dict[tuple[State, str], Reply] = {
    (S.READY, "RCPT"): R.NEED_MAIL,
    (S.READY, "DATA"): R.NEED_MAIL,
    (S.READY, "BDAT"): R.NEED_MAIL,
    (S.MAIL, "MAIL"): R.NESTED_MAIL,
    (S.RCPT, "MAIL"): R.NESTED_MAIL,
    (S.BDAT, "MAIL"): R.NESTED_MAIL,
    (S.MAIL, "DATA"): R.NEED_RCPT,
    (S.MAIL, "BDAT"): R.NEED_RCPT,
    (S.BDAT, "DATA"): R.BDAT_MIXED,
    (S.MAIL, "AUTH"): R.AUTH_IN_TRANSACTION,
    (S.RCPT, "AUTH"): R.AUTH_IN_TRANSACTION,
    (S.BDAT, "AUTH"): R.AUTH_IN_TRANSACTION,
}
"""The 503 for an out-of-sequence command; ``BAD_SEQUENCE`` when not listed."""

_TLS_WAIT = Sentinel("TLS_WAIT")
_BAD_TEXT = re.compile("[\x00-\x1f\x7f\udc80-\udcff]")
_DIGITS = re.compile("[0-9]+")
_TRANSACTION_STATES = frozenset({S.MAIL, S.RCPT, S.BDAT})
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+")
_HEXCHAR = re.compile(rb"\+([0-9A-F]{2})")

AUTH_FAILURES: dict[str, Reply] = {
    sasl.CANCELLED: R.AUTH_CANCELLED,
    sasl.MALFORMED: R.AUTH_MALFORMED,
    sasl.AUTHZID: R.AUTH_FAILED,
    sasl.UNKNOWN_MECHANISM: R.AUTH_UNKNOWN_MECHANISM,
    AUTH_TOO_LONG: R.AUTH_LINE_TOO_LONG,
}
"""The core's reply to an AUTH exchange that failed, by ``AuthFailed.reason``."""


class UsageError(RuntimeError):
    """The application called the core at the wrong time (a bug in the caller)."""


class _AuthReader:
    """Reads the client's response lines during one AUTH exchange: at most
    ``sasl.MAX_RESPONSE`` octets plus CR LF each (a bare LF also ends one)."""

    def __init__(self, exchange: sasl.Exchange) -> None:
        self.exchange = exchange
        self.framer = CommandFramer(sasl.MAX_RESPONSE + 2)


@dataclass
class Transaction:
    """The mail transaction in progress.

    ``mail`` is the accepted ``MailFrom`` (``None`` before MAIL),
    ``recipients`` the accepted ``RcptTo`` events in RCPT order,
    ``rcpt_attempts`` counts RCPT commands seen, ``kind`` is ``"DATA"`` or
    ``"BDAT"`` once content started.
    """

    mail: Optional[MailFrom] = None
    recipients: list[RcptTo] = field(default_factory=list)
    rcpt_attempts: int = 0
    kind: Optional[str] = None

    @property
    def sender(self) -> Optional[Address]:
        """The reverse-path; ``None`` for ``<>`` or before MAIL."""
        return self.mail.address if self.mail is not None else None

    @property
    def addresses(self) -> list[Address]:
        """The accepted recipients' addresses, in RCPT order."""
        return [r.address for r in self.recipients if r.address is not None]


class SMTPServerConnection:
    """One SMTP, submission or LMTP session, without I/O.

    ``hostname`` is announced in the greeting and EHLO reply; ``software``
    follows it in the greeting.  ``tls_available`` says STARTTLS may be
    offered; ``tls_active`` is true for implicit TLS (port 465).
    ``auth_mechanisms`` (a subset of ``sasl.MECHANISMS``, in the order
    advertised) turns AUTH on; empty, the default, means no AUTH (port 25).
    ``auth_requires_tls`` (default True) keeps AUTH hidden and refused until
    TLS is active.  ``auth_required`` (default: submission mode) refuses MAIL
    until the session is ``authenticated``: by a successful AUTH, or set by
    the adapter for other means (a client certificate).
    ``auth_identity`` is who the application said the client is, after a
    successful AUTH, else ``None``.  ``mail_params``/``rcpt_params`` are the
    ESMTP parameter names accepted; SIZE, BODY and SMTPUTF8 are checked here,
    others are passed through in the events.
    """

    def __init__(
        self,
        *,
        hostname: str,
        mode: Mode = Mode.MX,
        limits: Limits = Limits(),
        tls_available: bool = False,
        tls_active: bool = False,
        software: str = "mailserver",
        auth_required: Optional[bool] = None,
        auth_mechanisms: tuple[str, ...] = (),
        auth_requires_tls: bool = True,
        mail_params: frozenset[str] = DEFAULT_MAIL_PARAMS,
        rcpt_params: frozenset[str] = DEFAULT_RCPT_PARAMS,
        etrn: bool = False,
        dsn: bool = False,
        requiretls: bool = False,
    ) -> None:
        self.hostname = hostname
        self.mode = mode
        self.limits = limits
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.software = software
        self.auth_required = mode is Mode.SUBMISSION if auth_required is None else auth_required
        self.authenticated = False
        self.auth_identity: Optional[str] = None
        mechanisms = tuple(m.upper() if m.isascii() else m for m in auth_mechanisms)
        unknown = [m for m in mechanisms if m not in sasl.MECHANISMS]
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(unknown)}")
        self.auth_mechanisms = tuple(dict.fromkeys(mechanisms))
        self.auth_requires_tls = auth_requires_tls
        self.mail_params = frozenset(p.upper() for p in mail_params)
        self.rcpt_params = frozenset(p.upper() for p in rcpt_params)
        self.etrn = etrn and mode is Mode.MX
        self.dsn = dsn
        self.requiretls = requiretls and mode is not Mode.LMTP  # RFC 8689, offered over TLS
        if dsn:  # RFC 3461 parameters
            self.mail_params |= {"RET", "ENVID"}
            self.rcpt_params |= {"NOTIFY", "ORCPT"}
        self.state = State.INITIAL
        self.transaction = Transaction()
        self.helo: Optional[str] = None
        self.errors = 0
        self.junk = 0  # junk commands since the session began or the last accepted message
        self.pending: Optional[Event] = None
        self._replies_due = 0
        self._buf = bytearray()
        self._out = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._eof = False
        self._framer = CommandFramer(limits.max_command_line, self._verb_limits())
        self._reader: Union[None, DotReader, BdatReader, _AuthReader, Sentinel] = None
        self._checker: Optional[ContentChecker] = None
        self._bdat_last = False
        self._bdat_error: Optional[Reply] = None
        self._handlers = self._command_table()

    def _command_table(self) -> dict[str, Callable[..., None]]:
        """The verb table of this mode: shared by every connection of the
        class (plain functions, called with the connection)."""
        key = (type(self), self.mode is Mode.LMTP, self.etrn)
        table = _COMMAND_TABLES.get(key)
        if table is None:
            cls = type(self)
            table = {
                "MAIL": cls._do_mail,
                "RCPT": cls._do_rcpt,
                "DATA": cls._do_data,
                "BDAT": cls._do_bdat,
                "RSET": cls._do_rset,
                "NOOP": cls._do_noop,
                "QUIT": cls._do_quit,
                "HELP": cls._do_help,
                "VRFY": cls._do_vrfy,
                "EXPN": cls._do_expn,
                "STARTTLS": cls._do_starttls,
                "AUTH": cls._do_auth,
            }
            if self.etrn:
                table["ETRN"] = cls._do_etrn
            if self.mode is Mode.LMTP:
                table.update(LHLO=cls._do_lhlo, HELO=cls._do_use_lhlo, EHLO=cls._do_use_lhlo)
            else:
                table.update(HELO=cls._do_helo, EHLO=cls._do_ehlo)
            table = _COMMAND_TABLES[key] = table
        return table

    # --- public API ------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after QUIT, a 421, a refused greeting or EOF."""
        return self.state is State.CLOSED

    @property
    def in_transaction(self) -> bool:
        """True from an accepted MAIL until the transaction ends (its data
        included): what a draining server lets finish."""
        return self.state in _TRANSACTION_STATES or self.state is State.DATA

    @property
    def buffered(self) -> int:
        """Octets received and not yet handled.

        An unfinished command line never holds more than the highest command
        line limit (AUTH's while AUTH is offered, else RCPT's with DSN), nor
        an AUTH response line more than ``sasl.MAX_RESPONSE`` + 2, but input
        that arrives while a decision is pending is kept whole: the adapter
        should pause the transport on ``PAUSED``.
        """
        return len(self._buf)

    def greeting(self, reply: Optional[Reply] = None) -> None:
        """Queue the 220 greeting, or ``reply`` instead (a 4xx/5xx closes)."""
        if reply is None:
            kind = "LMTP" if self.mode is Mode.LMTP else "ESMTP"
            reply = Reply(220, None, f"{self.hostname} {kind} {self.software}")
        self._out += reply.to_bytes()
        if not reply.is_positive:
            self._shut()
            self._events.append(Closing(reply))

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data`` from the peer; ``b""`` means the peer closed."""
        if self.closed:
            return
        if not data:
            self._eof = True
        elif self._reader is not _TLS_WAIT:
            self._buf += data

    def next_event(self) -> Union[Event, Sentinel]:
        """The next event, ``NEED_DATA``, or ``PAUSED`` while a decision waits."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.pending is not None:
                return PAUSED
            if self.closed:
                return NEED_DATA
            if not self._step():
                if self._eof:
                    self._shut()
                    return ConnectionClosed()
                return NEED_DATA

    def send(self, reply: Reply, *, identity: Optional[str] = None) -> None:
        """Answer the pending decision with ``reply`` (queued for sending).

        ``identity`` goes with a 235 answer to ``Authenticate``, and only
        there: the name the session is authenticated as from now on
        (``auth_identity``), which the application chooses (the directory's
        canonical login, say).
        """
        event = self.pending
        if event is None:
            raise UsageError("no decision is pending")
        if not isinstance(reply, Reply):
            raise TypeError(f"send() takes a Reply, not {type(reply).__name__}")
        if isinstance(event, Authenticate):
            _check_auth_answer(reply, identity)
        elif identity is not None:
            raise UsageError("identity= only goes with a positive answer to Authenticate")
        self._replies_due -= 1
        if self._replies_due == 0 or reply.code == 421:
            self.pending = None
        if reply.code == 421:  # the application is closing the session
            self._close(reply)
            return
        if isinstance(event, DataEnd):
            if reply.is_positive:
                self.junk = 0
            self._reply(reply, counted=False)
            if self.pending is None:
                self._reset("END")
            return
        if isinstance(event, StartTLS):
            if not reply.is_positive:
                self._reader = None
        elif isinstance(event, Authenticate):
            self._goto("END")
            if reply.is_positive:
                self.authenticated = True
                self.auth_identity = identity
        elif reply.is_positive and isinstance(event, MailFrom):
            self.transaction.mail = event
            self._goto("MAIL")
        elif reply.is_positive and isinstance(event, RcptTo):
            self.transaction.recipients.append(event)
            self._goto("RCPT")
        self._reply(reply, counted=reply.enhanced != R.TOO_MANY_RECIPIENTS.enhanced)

    def data_to_send(self) -> bytes:
        """Take the queued reply bytes."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def tls_started(self) -> None:
        """The TLS handshake is done: start afresh (RFC 3207 §4.2).

        HELO, authentication and the transaction are forgotten.  The
        extensions may change (AUTH appears when it needs TLS), and the
        command line limits with them.
        """
        if self._reader is not _TLS_WAIT or self.pending is not None:
            raise UsageError("tls_started() without an accepted STARTTLS")
        self.tls_active = True
        self.authenticated = False
        self.auth_identity = None
        self.helo = None
        self.transaction = Transaction()
        self._goto("TLS")
        self._reader = None
        self._buf.clear()
        self._framer = CommandFramer(self.limits.max_command_line, self._verb_limits())

    # --- plumbing --------------------------------------------------------
    def _goto(self, trigger: str) -> None:
        self.state = TRANSITIONS[self.state][trigger]

    def _sequence_error(self, verb: str) -> Optional[Reply]:
        """The 503-class reply if ``verb`` does not fit the state, else None."""
        trigger = TRIGGERS.get(verb)
        if trigger is None or trigger in TRANSITIONS[self.state]:
            return None
        if self.state is State.INITIAL:
            return R.NEED_LHLO if self.mode is Mode.LMTP else R.NEED_HELO
        if self.state is State.MAIL and verb in ("DATA", "BDAT"):
            # RFC 2033 4.2: LMTP answers 503 whenever no RCPT succeeded.
            if self.transaction.rcpt_attempts and self.mode is not Mode.LMTP:
                return R.NO_VALID_RCPTS
        return SEQUENCE_ERRORS.get((self.state, trigger), R.BAD_SEQUENCE)

    def _reply(self, reply: Reply, *, counted: bool = True) -> None:
        """Queue ``reply``; count it if negative, closing past the limit."""
        if self.closed:
            return
        self._out += reply.to_bytes()
        if counted and not reply.is_positive:
            self.errors += 1
            if self.errors > self.limits.max_errors:
                self._close(R.TOO_MANY_ERRORS)

    def _close(self, reply: Reply) -> None:
        """Send a 421 and end the session."""
        if self.closed:
            return
        self._out += reply.to_bytes()
        self._shut()
        self._events.append(Closing(reply))

    def _shut(self) -> None:
        self.state = State.CLOSED
        self._reader = None
        self._buf.clear()

    def _decide(self, event: Event, replies: int = 1) -> None:
        self.pending = event
        self._replies_due = replies
        self._events.append(event)

    def _reset(self, trigger: str) -> None:
        """End the transaction (if any) through ``trigger`` and say so."""
        self.transaction = Transaction()
        self._checker = None
        self._goto(trigger)
        self._events.append(Reset())

    def _step(self) -> bool:
        """Handle one unit of buffered input; False when nothing could be done."""
        reader = self._reader
        if reader is None:
            return self._read_command()
        if isinstance(reader, DotReader):
            return self._read_data(reader)
        if isinstance(reader, BdatReader):
            return self._read_bdat(reader)
        if isinstance(reader, _AuthReader):
            return self._read_auth(reader)
        return False  # waiting for the TLS handshake

    # --- commands --------------------------------------------------------
    def _read_command(self) -> bool:
        line = self._framer.next_line(self._buf)
        if line is None:
            return False
        if line is TOO_LONG:
            self._reply(R.LINE_TOO_LONG)
        else:
            assert isinstance(line, bytes)
            self._dispatch(line)
        return True

    def _dispatch(self, line: bytes) -> None:
        """Run one command line through the verb table."""
        if b"\x00" in line:
            self._reply(R.NUL_IN_COMMAND)
            return
        verb, _, arg = line.decode("utf-8", "surrogateescape").partition(" ")
        verb = verb.upper() if verb.isascii() and verb.isalpha() else ""
        handler = self._handlers.get(verb)
        if handler is None:
            self._reply(R.SYNTAX_ERROR)
            return
        if verb in _JUNK_VERBS and self._junk():
            return
        try:
            error = self._sequence_error(verb)
            if error is not None and verb not in ("BDAT", "STARTTLS", "AUTH"):
                raise ProtocolError(error)
            handler(self, arg.strip(" "))
        except ProtocolError as exc:
            self._reply(exc.reply)

    def _junk(self) -> bool:
        """Count a junk command; True (after the 421) when past the limit."""
        if not self.limits.max_junk_commands:
            return False
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self._close(R.TOO_MANY_JUNK_COMMANDS)
            return True
        return False

    def _hello(self, verb: str, domain: str, reply: Reply) -> None:
        if not domain or _BAD_TEXT.search(domain):
            raise ProtocolError(R.BAD_ARGUMENTS)
        if self.helo and self._junk():  # a repeated hello moves no mail
            return
        if self.state in _TRANSACTION_STATES:
            self._reset("HELLO")
        else:
            self._goto("HELLO")
        self.helo = domain
        self._events.append(Hello(verb, domain))
        self._reply(reply)

    def _extensions(self) -> list[str]:
        """The EHLO/LHLO keyword lines."""
        size = self.limits.max_message_size
        lines = ["PIPELINING", f"SIZE {size}" if size else "SIZE"]
        lines += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING"]
        if self.dsn:
            lines.append("DSN")
        if self.etrn:
            lines.append("ETRN")
        if self._auth_offered():
            lines.append(" ".join(["AUTH", *self.auth_mechanisms]))
        if self.tls_available and not self.tls_active:
            lines.append("STARTTLS")
        if self.requiretls and self.tls_active:
            lines.append("REQUIRETLS")
        return lines

    def _capabilities(self) -> Reply:
        return Reply(250, None, "\n".join([self.hostname, *self._extensions()]))

    def _auth_offered(self) -> bool:
        """AUTH is advertised and accepted now."""
        return bool(self.auth_mechanisms) and (self.tls_active or not self.auth_requires_tls)

    def _verb_limits(self) -> dict[bytes, int]:
        """The command line limits of MAIL, RCPT and (with AUTH) AUTH, raised by
        what the advertised extensions add.  Only STARTTLS and AUTH come and
        go, both with TLS, so :meth:`tls_started` computes them again."""
        base = self.limits.max_command_line
        # What _extensions() depends on, but the SIZE figure (no allowance).
        key = (base, self.dsn, self.etrn, self._auth_offered(), self.auth_mechanisms,
               self.tls_available and not self.tls_active)
        limits = _VERB_LIMITS.get(key)
        if limits is None:
            limits = {b"MAIL": base, b"RCPT": base}
            for line in self._extensions():
                for verb, octets in LINE_ALLOWANCES.get(line.split()[0], {}).items():
                    verb_key = verb.encode("ascii")
                    limits[verb_key] = limits.get(verb_key, base) + octets
            if len(_VERB_LIMITS) < 64:
                _VERB_LIMITS[key] = limits
        return dict(limits)

    def _do_helo(self, arg: str) -> None:
        self._hello("HELO", arg, Reply(250, None, self.hostname))

    def _do_ehlo(self, arg: str) -> None:
        self._hello("EHLO", arg, self._capabilities())

    def _do_lhlo(self, arg: str) -> None:
        self._hello("LHLO", arg, self._capabilities())

    def _do_use_lhlo(self, arg: str) -> None:
        raise ProtocolError(R.USE_LHLO)

    def _do_mail(self, arg: str) -> None:
        if self.auth_required and not self.authenticated:
            raise ProtocolError(R.AUTH_REQUIRED)
        path, rest = split_argument(arg, "FROM:", R.BAD_SENDER_SYNTAX)
        params = parse_params(rest)
        smtputf8 = "SMTPUTF8" in params and "SMTPUTF8" in self.mail_params
        address = parse_path(path, smtputf8=smtputf8)
        allowed = self.mail_params | {"AUTH"} if self._auth_offered() else self.mail_params
        if self.requiretls and self.tls_active:
            allowed |= {"REQUIRETLS"}
            if params.get("REQUIRETLS") is not None:
                raise ProtocolError(R.BAD_ARGUMENTS)
        size, body = check_mail_params(params, allowed, self.limits.max_message_size)
        check_dsn_mail_params(params)
        if "AUTH" in params:
            params["AUTH"] = _auth_param(params["AUTH"], smtputf8)
        event = MailFrom(
            sender=str(address) if address else "",
            params=params,
            size=size,
            body=body,
            smtputf8=smtputf8,
            address=address,
        )
        self._decide(event)

    def _do_rcpt(self, arg: str) -> None:
        txn = self.transaction
        txn.rcpt_attempts += 1
        if len(txn.recipients) >= self.limits.max_recipients:
            if not self._junk():  # not an error, but no way to hold a session either
                self._reply(R.TOO_MANY_RECIPIENTS, counted=False)
            return
        path, rest = split_argument(arg, "TO:", R.BAD_RCPT_SYNTAX)
        params = parse_params(rest)
        smtputf8 = txn.mail is not None and txn.mail.smtputf8
        address = parse_path(path, smtputf8=smtputf8, for_rcpt=True)
        check_known_params(params, self.rcpt_params)
        check_dsn_rcpt_params(params)
        assert address is not None
        self._decide(RcptTo(recipient=str(address), params=params, address=address))

    def _do_data(self, arg: str) -> None:
        if arg:
            raise ProtocolError(R.BAD_ARGUMENTS)
        self._goto("DATA")
        self._start_content("DATA")
        self._reader = DotReader()
        self._reply(R.START_DATA)

    def _do_bdat(self, arg: str) -> None:
        words = arg.split()
        if not words or not _DIGITS.fullmatch(words[0]):
            self._reply(R.BDAT_SYNTAX)
            self._close(R.PROTOCOL_DESYNC)
            return
        error = self._sequence_error("BDAT")
        last = [w.upper() for w in words[1:]] == ["LAST"]
        if error is None and len(words) > 1 and not last:
            error = R.BDAT_SYNTAX
        self._reader = BdatReader(int(words[0]))
        self._bdat_last = last
        self._bdat_error = error
        if error is None and self.state is State.RCPT:
            self._goto("BDAT")
            self._start_content("BDAT")

    def _do_rset(self, arg: str) -> None:
        if arg:
            raise ProtocolError(R.BAD_ARGUMENTS)
        self._reset("RSET")
        self._reply(R.RESET_OK)

    def _do_noop(self, arg: str) -> None:
        self._reply(R.NOOP_OK)

    def _do_quit(self, arg: str) -> None:
        self._reply(R.BYE)
        self._shut()
        self._events.append(Quit())

    def _do_help(self, arg: str) -> None:
        self._reply(R.HELP)

    def _do_vrfy(self, arg: str) -> None:
        if not arg:
            raise ProtocolError(R.BAD_ARGUMENTS)
        self._reply(R.VRFY_CANNOT)

    def _do_etrn(self, arg: str) -> None:
        """ETRN (RFC 1985): ask for a domain's queue to be run; outside a
        transaction only.  The argument is a domain, ``@domain`` (with its
        subdomains) or ``#queue``; the application decides the reply."""
        if self.state is State.INITIAL:
            raise ProtocolError(R.NEED_HELO)
        if self.state is not State.READY:
            raise ProtocolError(R.BAD_SEQUENCE)
        node = arg.strip()
        if not node or " " in node or not node.isascii() or not node.isprintable():
            raise ProtocolError(R.BAD_ARGUMENTS)
        self._decide(Etrn(node=node))

    def _do_expn(self, arg: str) -> None:
        raise ProtocolError(R.NOT_IMPLEMENTED)

    def _do_starttls(self, arg: str) -> None:
        if self.tls_active:
            raise ProtocolError(R.ALREADY_TLS)
        if not self.tls_available:
            raise ProtocolError(R.TLS_NOT_OFFERED)
        error = self._sequence_error("STARTTLS")
        if error is not None:
            raise ProtocolError(error)
        if arg:
            raise ProtocolError(R.BAD_ARGUMENTS)
        if self.auth_identity is not None:  # after AUTH: TLS should have come first
            raise ProtocolError(R.BAD_SEQUENCE)
        # RFC 3207 §4.2: nothing the client pipelined after STARTTLS may run.
        self._buf.clear()
        self._framer.reset()
        self._reader = _TLS_WAIT
        self._decide(StartTLS())

    # --- AUTH --------------------------------------------------------------
    def _do_auth(self, arg: str) -> None:
        """AUTH <mechanism> [initial-response] (RFC 4954 §4)."""
        if not self.auth_mechanisms or (
            self.auth_requires_tls and not (self.tls_active or self.tls_available)
        ):
            raise ProtocolError(R.AUTH_NOT_ENABLED)  # and never will be here
        if not self._auth_offered():
            raise ProtocolError(R.MUST_STARTTLS)
        if self.authenticated:
            raise ProtocolError(R.AUTH_ALREADY)
        error = self._sequence_error("AUTH")
        if error is not None:
            raise ProtocolError(error)
        words = [w for w in arg.split(" ") if w]
        if len(words) not in (1, 2):
            raise ProtocolError(R.BAD_ARGUMENTS)
        name = words[0].upper() if words[0].isascii() else ""
        if name not in self.auth_mechanisms:
            raise ProtocolError(R.AUTH_UNKNOWN_MECHANISM)
        reader = _AuthReader(sasl.Exchange(name))
        self._goto("AUTH")
        self._reader = reader
        self._auth_step(reader.exchange, words[1] if len(words) == 2 else None, first=True)

    def _read_auth(self, reader: _AuthReader) -> bool:
        """Take one response line of the exchange, if a whole one is buffered."""
        line = reader.framer.next_line(self._buf)
        if line is None:
            return False
        # The text limit is the same whether the line ended in CR LF or a bare LF.
        if not isinstance(line, bytes) or len(line) > sasl.MAX_RESPONSE:
            self._auth_failed(reader.exchange.mechanism, AUTH_TOO_LONG)
        else:
            text = line.decode("utf-8", "surrogateescape")
            self._auth_step(reader.exchange, text, first=False)
        return True

    def _auth_step(self, exchange: sasl.Exchange, text: Optional[str], *, first: bool) -> None:
        """Give the exchange the client's next text (``None``: no initial
        response); answer with a 334 challenge, or end in a decision or a failure."""
        try:
            if first:
                result = exchange.start(text)
            else:
                assert text is not None
                result = exchange.respond(text)
        except sasl.SASLError as exc:
            self._auth_failed(exchange.mechanism, exc.kind)
            return
        if isinstance(result, sasl.Credentials):
            self._reader = None
            self._decide(Authenticate(result))
        else:
            self._reply(Reply(334, None, sasl.encode_challenge(result)))

    def _auth_failed(self, mechanism: str, reason: str) -> None:
        self._reader = None
        self._goto("END")
        self._events.append(AuthFailed(mechanism, reason))
        self._reply(AUTH_FAILURES.get(reason, R.AUTH_MALFORMED))

    # --- content ---------------------------------------------------------
    def _start_content(self, kind: str) -> None:
        self.transaction.kind = kind
        self._checker = ContentChecker(self.limits.max_text_line, self.limits.max_message_size)
        self._events.append(DataStart(kind))

    def _take_content(self, data: bytes) -> None:
        """Check ``data`` and pass it on while the content is acceptable."""
        checker = self._checker
        assert checker is not None
        checker.feed(data)
        if data and checker.refusal is None:
            self._events.append(DataChunk(data))

    def _read_data(self, reader: DotReader) -> bool:
        before = len(self._buf)
        data = reader.read(self._buf)
        if len(self._buf) == before:
            return False
        self._take_content(data)
        if reader.ended:
            self._reader = None
            self._end_content(last=True)
        return True

    def _read_bdat(self, reader: BdatReader) -> bool:
        data = reader.read(self._buf)
        if not data and not reader.ended:
            return False
        if self._bdat_error is None:
            self._take_content(data)
        if reader.ended:
            self._reader = None
            if self._bdat_error is not None:
                self._refuse_bdat(self._bdat_error)
            else:
                self._end_content(last=self._bdat_last, octets=reader.size)
        return True

    def _refuse_bdat(self, error: Reply) -> None:
        if self.state is State.BDAT:  # a chunk of an open transaction failed
            self._abort_content(error)
        else:
            self._reply(error)

    def _end_content(self, *, last: bool, octets: int = 0) -> None:
        """The DATA content or a BDAT chunk is complete: refuse or go on."""
        checker = self._checker
        assert checker is not None
        if last:
            checker.finish()
        refusal = checker.refusal
        if refusal is not None:
            self._abort_content(refusal)
        elif not last:
            self._reply(R.BDAT_OK.with_text(f"{octets} octets received"))
        else:
            replies = len(self.transaction.recipients) if self.mode is Mode.LMTP else 1
            self._decide(DataEnd(checker.size, eight_bit=checker.eight_bit), replies)

    def _abort_content(self, reply: Reply) -> None:
        self._events.append(DataAborted(reply))
        self._reset("END")
        self._reply(reply)


def _check_auth_answer(reply: Reply, identity: Optional[str]) -> None:
    """An answer to ``Authenticate`` is a 235 with an identity, or negative without."""
    if not reply.is_positive:
        if identity is not None:
            raise UsageError("identity= only goes with a positive answer to Authenticate")
        return
    if reply.code != 235:
        raise UsageError(f"a positive answer to Authenticate is a 235, not {reply.code}")
    if not isinstance(identity, str) or not identity:
        raise UsageError("a positive answer to Authenticate needs identity=")


def _auth_param(value: Optional[str], smtputf8: bool) -> str:
    """Decode MAIL's ``AUTH=`` xtext (RFC 4954 §5, RFC 3461 §4) and check that
    it is ``<>`` or an addr-spec; anything else is ``BAD_ARGUMENTS``."""
    if value is None or not _XTEXT.fullmatch(value):
        raise ProtocolError(R.BAD_ARGUMENTS)
    raw = _HEXCHAR.sub(lambda m: bytes([int(m[1], 16)]), value.encode("ascii"))
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(R.BAD_ARGUMENTS) from None
    if decoded == "<>":
        return decoded
    if decoded.startswith("@"):  # a source route is a path, not an addr-spec
        raise ProtocolError(R.BAD_ARGUMENTS)
    try:
        parse_path(f"<{decoded}>", smtputf8=smtputf8)
    except ProtocolError:
        raise ProtocolError(R.BAD_ARGUMENTS) from None
    return decoded
