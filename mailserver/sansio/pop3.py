# -*- test-case-name: tests.unit.test_pop3 -*-
"""The sans-IO POP3 server core: bytes in, events and response bytes out.

No networking and no Twisted here (the h11 rule).  The adapter feeds what it
reads to :meth:`POP3ServerConnection.receive_data`, loops on
:meth:`~POP3ServerConnection.next_event`, answers decisions and writes
:meth:`~POP3ServerConnection.data_to_send`.  Events and :class:`MessageInfo`
are in :mod:`mailserver.sansio.pop3_events`.  Protocols: RFC 1939, RFC 2449
(CAPA, response codes), RFC 2595 (STLS), RFC 5034 (AUTH), RFC 3206 (SYS and
AUTH codes).

Policy decisions:

* **Ordering.**  Commands run one at a time in arrival order.  While a
  decision (``StartTLS``, ``Authenticate``, ``Retrieve``, ``Update``) waits,
  ``next_event()`` returns ``PAUSED`` and pipelined commands stay buffered,
  so responses keep their order.  A ``Retrieve`` answered with ``send_ok``
  stays pending until :meth:`~POP3ServerConnection.finish_retrieve`.
* **Lines.**  A command ends at LF (one CR before it is removed, so a bare
  LF works) and may be 255 octets with its CRLF (RFC 2449 §4); AUTH may be
  longer by ``sasl.MAX_RESPONSE`` so a client that sends a long initial
  response anyway is served.  An overlong line is discarded up to its LF and
  answered ``-ERR line too long``.  A SASL response line may hold
  ``sasl.MAX_RESPONSE`` octets.  NUL in a command, an unknown verb, a verb
  of the other state, or bad arguments each get one ``-ERR``.  Verbs are
  case-insensitive; runs of spaces between arguments are accepted.
* **Errors.**  Every ``-ERR`` counts, the application's too, except the
  answer to ``Update`` and closing answers.  The one that would go past
  ``max_errors`` is replaced by ``-ERR too many errors`` and the session
  ends with ``Closing(TOO_MANY_ERRORS)``.
* **Authentication** needs TLS unless ``plaintext_auth``: before it, USER,
  PASS and AUTH answer ``-ERR [AUTH] Plaintext authentication disallowed on
  non-secure connections`` and USER and SASL are not advertised.  USER is
  only remembered (``+OK``: nothing says whether the user exists); PASS
  without it is ``-ERR``.  PASS takes everything after ``"PASS "`` as the
  password, spaces included (RFC 1939 §7 allows this); an empty or non-UTF-8
  one is refused by the core (``LoginFailed``).  Any PASS forgets the USER.
  AUTH runs the :mod:`mailserver.sasl` exchange with ``+ <base64>``
  challenges; ``*`` cancels (``-ERR Authentication cancelled``, RFC 5034
  §4); malformed data and an over-long response get ``-ERR``; a PLAIN
  authzid other than the login gets ``-ERR [AUTH]``; each emits
  ``LoginFailed``.  A bare ``AUTH`` lists the mechanisms (the pre-RFC 5034
  convention some clients probe with).  APOP is not supported and the
  greeting carries no timestamp.
* **Identity.**  The application answers ``Authenticate`` with
  ``logged_in(messages, identity=...)`` (the keyword is required): the core
  keeps it in ``user`` and enters TRANSACTION with that snapshot, numbered
  1..n.  ``send_err`` leaves the session in AUTHORIZATION.
* **Closing on purpose.**  ``send_err(..., code="LOGIN-DELAY")`` or
  ``send_err(..., close=True)`` answers any decision and ends the session
  with ``Closing(CLOSED_BY_APPLICATION)`` (too many failed logins, say).
* **STLS** discards every byte buffered after the command and ignores input
  until the answer; after ``send_ok`` input stays ignored until
  :meth:`~POP3ServerConnection.tls_started`, which forgets USER.  After
  ``send_err`` plaintext goes on.  STLS is advertised in AUTHORIZATION only
  (after login it cannot be used).  USER and SASL are advertised in both
  states when allowed (RFC 2449 §5).
* **Transaction.**  STAT, LIST, UIDL, DELE, RSET and NOOP are answered here
  from the snapshot: deleted messages are left out of counts and listings,
  and referring to one is ``-ERR message N already deleted``.  A message
  number is ASCII digits naming a message of the snapshot, else ``-ERR no
  such message``.  RETR and TOP become ``Retrieve`` for valid, undeleted
  messages only; TOP's line count must be ASCII digits.
* **Content.**  :meth:`~POP3ServerConnection.stuff` turns LF or CRLF line
  ends into CRLF and doubles a leading dot, keeping its place across chunks
  (a CR at a chunk's end waits for the next octet; a final lone CR ends a
  line); a bare CR inside a line is passed as it is.  For TOP it passes the
  headers, the blank line and ``lines`` body lines, drops the rest and sets
  ``retrieve_done``.  It first hands out any queued response bytes, so the
  ``+OK`` line can never be overtaken by content.
* **Ending.**  QUIT in AUTHORIZATION answers ``+OK bye`` and emits ``Quit``.
  QUIT in TRANSACTION enters UPDATE with an ``Update`` decision; after its
  answer (either kind) ``Quit`` follows.  EOF gives ``ConnectionClosed``
  and never ``Update``: nothing is deleted.  After ``Quit``, ``Closing`` or
  ``ConnectionClosed`` input is ignored.
"""

from __future__ import annotations

import collections
import enum
import re
from typing import Callable, Optional, Sequence, Union

from mailserver import sasl
from mailserver.sansio.lines import TOO_LONG as LINE_TOO_LONG
from mailserver.sansio.lines import CommandFramer
from mailserver.sansio.pop3_commands import Refusal as _Refusal
from mailserver.sansio.pop3_commands import TransactionCommands
from mailserver.sansio.pop3_commands import no_args as _no_args
from mailserver.sansio.pop3_commands import split_words as _words
from mailserver.sansio.pop3_events import (
    CLOSED_BY_APPLICATION,
    NEED_DATA,
    PAUSED,
    TOO_LONG,
    TOO_MANY_ERRORS,
    TOO_MANY_JUNK_COMMANDS,
    Authenticate,
    Closing,
    ConnectionClosed,
    Event,
    LoginFailed,
    MessageInfo,
    Quit,
    Retrieve,
    Sentinel,
    StartTLS,
    Update,
)
from mailserver.sansio.pop3_stuffer import Stuffer

MAX_COMMAND = 255
"""Octets in a command line, CRLF included (RFC 2449 §4)."""

CRLF = b"\r\n"
_CODE = re.compile(r"[A-Z][A-Z0-9-]*(?:/[A-Z][A-Z0-9-]*)*")
_BAD_NAME = re.compile("[\x00-\x20\x7f\udc80-\udcff]")
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_TLS_WAIT = Sentinel("TLS_WAIT")
NO_PLAINTEXT = "Plaintext authentication disallowed on non-secure connections"

_LOGIN_FAILURES: dict[str, tuple[str, Optional[str]]] = {
    sasl.CANCELLED: ("Authentication cancelled", None),
    sasl.MALFORMED: ("Malformed authentication data", None),
    sasl.AUTHZID: ("Authentication failed", "AUTH"),
    TOO_LONG: ("Authentication line too long", None),
}
"""The core's ``-ERR`` text and code by ``LoginFailed.reason``."""


class State(enum.Enum):
    """Session state (RFC 1939 §3).  Every change goes through :data:`TRANSITIONS`."""

    AUTHORIZATION = "authorization"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"


S = State
TRANSITIONS: dict[State, dict[str, State]] = {
    S.AUTHORIZATION: {"LOGIN": S.TRANSACTION, "TLS": S.AUTHORIZATION, "CLOSE": S.CLOSED},
    S.TRANSACTION: {"QUIT": S.UPDATE, "CLOSE": S.CLOSED},
    S.UPDATE: {"CLOSE": S.CLOSED},
    S.CLOSED: {"CLOSE": S.CLOSED},
}
"""``TRANSITIONS[state][trigger] -> new state``; a missing key is a bug (KeyError)."""


class UsageError(RuntimeError):
    """The application called the core at the wrong time (a bug in the caller)."""


class _SaslReader:
    """Reads the response lines of one AUTH exchange."""

    def __init__(self, exchange: sasl.Exchange) -> None:
        self.exchange = exchange
        self.framer = CommandFramer(sasl.MAX_RESPONSE + 2)


class POP3ServerConnection(TransactionCommands):
    """One POP3 session, without I/O.

    ``hostname`` is named in the greeting.  ``tls_available`` offers STLS;
    ``tls_active`` is true for implicit TLS (port 995).  ``plaintext_auth``
    allows USER/PASS and AUTH without TLS.  ``auth_mechanisms`` is a subset of
    ``sasl.MECHANISMS`` for AUTH (empty: no AUTH).  ``max_errors`` bounds the
    ``-ERR`` responses.  ``expire`` (``"NEVER"`` or digits) and
    ``login_delay`` (seconds) are advertised in CAPA when set, as is
    ``implementation``.  ``user`` is the identity given to :meth:`logged_in`.
    """

    def __init__(
        self,
        *,
        hostname: str,
        tls_available: bool = False,
        tls_active: bool = False,
        plaintext_auth: bool = False,
        auth_mechanisms: tuple[str, ...] = ("PLAIN",),
        max_errors: int = 10,
        junk_limit: int = 100,
        expire: Optional[str] = None,
        login_delay: Optional[int] = None,
        implementation: str = "mailserver",
    ) -> None:
        mechanisms = tuple(m.upper() if m.isascii() else m for m in auth_mechanisms)
        unknown = [m for m in mechanisms if m not in sasl.MECHANISMS]
        if unknown:
            raise ValueError(f"unknown SASL mechanisms: {', '.join(unknown)}")
        if expire is not None and not re.fullmatch("NEVER|[0-9]+", expire):
            raise ValueError("expire must be 'NEVER' or a number of days")
        if login_delay is not None and (not isinstance(login_delay, int) or login_delay < 0):
            raise ValueError("login_delay must be a non-negative int")
        for name, text in (("hostname", hostname), ("implementation", implementation)):
            if not text or not text.isprintable():
                raise ValueError(f"{name} must be printable text")
        self.hostname = hostname
        self.tls_available = tls_available
        self.tls_active = tls_active
        self.plaintext_auth = plaintext_auth
        self.auth_mechanisms = tuple(dict.fromkeys(mechanisms))
        self.max_errors = max_errors
        self.junk_limit = junk_limit  # NOOP, RSET, CAPA per session; 0 = no limit
        self.junk = 0
        self.expire = expire
        self.login_delay = login_delay
        self.implementation = implementation
        self.state = State.AUTHORIZATION
        self.user: Optional[str] = None
        self.messages: tuple[MessageInfo, ...] = ()
        self.deleted: set[int] = set()  # 0-based indexes marked by DELE
        self.retrieved: set[int] = set()  # 0-based indexes sent whole by RETR
        self.errors = 0
        self.pending: Optional[Event] = None
        self._user_name: Optional[str] = None  # from USER, waiting for PASS
        self._buf = bytearray()
        self._out = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._eof = False
        self._framer = CommandFramer(MAX_COMMAND, {b"AUTH": MAX_COMMAND + sasl.MAX_RESPONSE})
        self._reader: Union[None, _SaslReader, Sentinel] = None
        self._stuffer: Optional[Stuffer] = None

    # --- public API ------------------------------------------------------
    @property
    def closed(self) -> bool:
        """True after QUIT, a closing answer, too many errors or EOF."""
        return self.state is State.CLOSED

    @property
    def auth_allowed(self) -> bool:
        """USER/PASS and AUTH are accepted (and advertised) now."""
        return self.tls_active or self.plaintext_auth

    @property
    def buffered(self) -> int:
        """Octets received and not handled yet (input arriving while a
        decision waits is kept whole: pause the transport on ``PAUSED``)."""
        return len(self._buf)

    @property
    def retrieve_done(self) -> bool:
        """During a TOP: :meth:`stuff` has passed all it will; stop reading."""
        return self._stuffer is not None and self._stuffer.done

    def greeting(self) -> None:
        """Queue the ``+OK`` greeting (no APOP timestamp)."""
        self._ok(f"{self.hostname} POP3 ready")

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

    def data_to_send(self) -> bytes:
        """Take the queued response bytes."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send_ok(self, text: str = "") -> None:
        """Answer ``StartTLS``, ``Retrieve`` or ``Update`` positively.

        For ``Retrieve`` this queues the ``+OK`` line and opens the content:
        call :meth:`stuff` with the stored message, then :meth:`finish_retrieve`.
        """
        event = self._answering()
        if isinstance(event, Authenticate):
            raise UsageError("answer Authenticate with logged_in() or send_err()")
        if isinstance(event, Retrieve):
            top = event.lines is not None
            self._ok(text or ("top of message follows" if top else f"{event.info.size} octets"))
            self._stuffer = Stuffer(event.lines)
            return
        self.pending = None
        if isinstance(event, StartTLS):
            self._ok(text or "Begin TLS negotiation now")
        else:
            self._ok(text or "bye")
            self._quit()

    def send_err(self, text: str, code: Optional[str] = None, *, close: bool = False) -> None:
        """Answer the pending decision with ``-ERR [code] text``.

        ``close=True``, or the code ``LOGIN-DELAY``, ends the session
        (``Closing(CLOSED_BY_APPLICATION)``).  After ``Update`` the session
        ends anyway, with ``Quit``.
        """
        event = self._answering()
        line = _err_line(text, code)
        self.pending = None
        if isinstance(event, Update):
            self._out += line
            self._quit()
        elif close or code == "LOGIN-DELAY":
            self._out += line
            self._close(CLOSED_BY_APPLICATION)
        else:
            if isinstance(event, StartTLS):
                self._reader = None
            self._err(text, code)

    def logged_in(
        self, messages: Sequence[MessageInfo], text: str = "", *, identity: str
    ) -> None:
        """Answer ``Authenticate`` positively: the session is ``identity``'s
        (kept in :attr:`user`) and enters TRANSACTION with ``messages`` as
        the snapshot, numbered from 1."""
        event = self._answering()
        if not isinstance(event, Authenticate):
            raise UsageError("logged_in() answers Authenticate only")
        if not isinstance(identity, str) or not identity:
            raise UsageError("logged_in() needs a non-empty identity=")
        snapshot = tuple(messages)
        if not all(isinstance(m, MessageInfo) for m in snapshot):
            raise TypeError("messages must be MessageInfo values")
        self.pending = None
        self.user = identity
        self.messages = snapshot
        self._goto("LOGIN")
        count, size = self._totals()
        self._ok(text or f"{count} messages ({size} octets)")

    def tls_started(self) -> None:
        """The TLS handshake after STLS is done: start afresh (RFC 2595 §4)."""
        if self._reader is not _TLS_WAIT or self.pending is not None:
            raise UsageError("tls_started() without an accepted STLS")
        self.tls_active = True
        self._user_name = None
        self._goto("TLS")
        self._reader = None
        self._buf.clear()
        self._framer.reset()

    def stuff(self, chunk: bytes) -> bytes:
        """Wire form of the next chunk of the stored message being retrieved,
        preceded by any queued response bytes (the ``+OK`` line)."""
        if self._stuffer is None:
            raise UsageError("stuff() needs a Retrieve answered with send_ok()")
        head = self.data_to_send()
        return head + self._stuffer.feed(chunk)

    def finish_retrieve(self) -> None:
        """Queue the end of the content (a CRLF if it lacked one, then
        ``.`` CRLF) and release the ``Retrieve`` decision."""
        stuffer, event = self._stuffer, self.pending
        if stuffer is None or not isinstance(event, Retrieve):
            raise UsageError("finish_retrieve() needs a Retrieve answered with send_ok()")
        self._out += stuffer.finish()
        self._retrieve_done(event)

    def send_whole(self, wire: bytes, text: str = "") -> None:
        """Answer ``Retrieve`` with the whole response content at once:
        ``wire`` is :func:`~mailserver.sansio.pop3_stuffer.whole` of the
        stored message (for TOP, with the event's line count), made now or
        earlier; the ``+OK`` line goes before it."""
        self.send_ok(text)
        self._out += wire
        self._retrieve_done(self.pending)

    def _retrieve_done(self, event: Retrieve) -> None:
        if event.lines is None:
            self.retrieved.add(event.index)
        self._stuffer = None
        self.pending = None

    # --- plumbing --------------------------------------------------------
    def _answering(self) -> Event:
        if self.pending is None or self._stuffer is not None:
            raise UsageError("no decision is waiting for an answer")
        return self.pending

    def _goto(self, trigger: str) -> None:
        self.state = TRANSITIONS[self.state][trigger]

    def _ok(self, text: str = "") -> None:
        self._out += _line("+OK", text)

    def _err(self, text: str, code: Optional[str] = None) -> None:
        """Queue a counted ``-ERR``, or end the session past ``max_errors``."""
        if self.closed:
            return
        self.errors += 1
        if self.errors > self.max_errors:
            self._out += _err_line("too many errors")
            self._close(TOO_MANY_ERRORS)
        else:
            self._out += _err_line(text, code)

    def _multiline(self, text: str, lines: Sequence[str]) -> None:
        self._ok(text)
        for item in lines:
            self._out += _line("." + item if item.startswith(".") else item)
        self._out += b".\r\n"

    def _close(self, reason: str) -> None:
        self._shut()
        self._events.append(Closing(reason))

    def _quit(self) -> None:
        self._shut()
        self._events.append(Quit())

    def _shut(self) -> None:
        self._goto("CLOSE")
        self._reader = None
        self._buf.clear()

    def _decide(self, event: Event) -> None:
        self.pending = event
        self._events.append(event)

    def _step(self) -> bool:
        """Handle one unit of buffered input; False when nothing could be done."""
        reader = self._reader
        if reader is None:
            return self._read_command()
        if isinstance(reader, _SaslReader):
            return self._read_sasl(reader)
        return False  # waiting for the TLS handshake

    def _read_command(self) -> bool:
        line = self._framer.next_line(self._buf)
        if line is None:
            return False
        if line is LINE_TOO_LONG:
            self._err("line too long")
        else:
            assert isinstance(line, bytes)
            self._dispatch(line)
        return True

    def _dispatch(self, line: bytes) -> None:
        """Run one command line through :data:`COMMANDS`."""
        if b"\x00" in line:
            self._err("NUL in command")
            return
        verb, _, arg = line.decode("utf-8", "surrogateescape").partition(" ")
        verb = verb.upper() if verb.isascii() and verb.isalpha() else ""
        entry = COMMANDS.get(verb)
        if entry is None:
            self._err("unknown command")
            return
        handler, states = entry
        try:
            if self.state not in states:
                raise _Refusal("command not valid in this state")
            handler(self, arg)
        except _Refusal as exc:
            self._err(exc.text, exc.code)

    # --- any state -------------------------------------------------------
    def _do_capa(self, arg: str) -> None:
        _no_args(arg)
        if self._junk():
            return
        self._multiline("Capability list follows", self._capabilities())

    def _capabilities(self) -> list[str]:
        caps = ["TOP", "UIDL"]
        if self.auth_allowed:
            caps.append("USER")
            if self.auth_mechanisms:
                caps.append(" ".join(["SASL", *self.auth_mechanisms]))
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION and self.tls_available and not self.tls_active:
            caps.append("STLS")
        if self.expire is not None:
            caps.append(f"EXPIRE {self.expire}")
        if self.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self.login_delay}")
        caps.append(f"IMPLEMENTATION {self.implementation}")
        return caps

    def _do_quit(self, arg: str) -> None:
        if self.state is State.TRANSACTION:
            self._goto("QUIT")
            self._decide(Update(tuple(sorted(self.deleted)), tuple(sorted(self.retrieved))))
        else:
            self._ok("bye")
            self._quit()

    # --- AUTHORIZATION ---------------------------------------------------
    def _do_stls(self, arg: str) -> None:
        if self.tls_active:
            raise _Refusal("already using TLS")
        if not self.tls_available:
            raise _Refusal("STLS not available")
        _no_args(arg)
        # RFC 2595 §4: nothing the client pipelined after STLS may run.
        self._buf.clear()
        self._framer.reset()
        self._reader = _TLS_WAIT
        self._decide(StartTLS())

    def _require_auth_allowed(self) -> None:
        if not self.auth_allowed:
            raise _Refusal(NO_PLAINTEXT, "AUTH")

    def _do_user(self, arg: str) -> None:
        self._require_auth_allowed()
        words = _words(arg)
        if len(words) != 1 or _BAD_NAME.search(words[0]):
            raise _Refusal("invalid user name")
        self._user_name = words[0]
        self._ok("send PASS")

    def _do_pass(self, arg: str) -> None:
        self._require_auth_allowed()
        login, self._user_name = self._user_name, None
        if login is None:
            raise _Refusal("USER first")
        if not arg or _UNDECODABLE.search(arg):
            self._login_failed("USER", sasl.MALFORMED)
            return
        self._decide(Authenticate(sasl.Credentials("USER", login, arg)))

    def _do_apop(self, arg: str) -> None:
        raise _Refusal("APOP not supported")

    def _do_auth(self, arg: str) -> None:
        """AUTH mechanism [initial-response] (RFC 5034 §4)."""
        self._require_auth_allowed()
        words = _words(arg)
        if not words:
            self._multiline("SASL mechanisms follow", self.auth_mechanisms)
            return
        if len(words) > 2:
            raise _Refusal("syntax error")
        name = words[0].upper() if words[0].isascii() else ""
        if name not in self.auth_mechanisms:
            raise _Refusal("Unsupported authentication mechanism")
        self._user_name = None
        reader = _SaslReader(sasl.Exchange(name))
        self._reader = reader
        self._sasl_step(reader.exchange, words[1] if len(words) == 2 else None, first=True)

    def _read_sasl(self, reader: _SaslReader) -> bool:
        """Take one response line of the exchange, if a whole one is buffered."""
        line = reader.framer.next_line(self._buf)
        if line is None:
            return False
        if not isinstance(line, bytes) or len(line) > sasl.MAX_RESPONSE:
            self._login_failed(reader.exchange.mechanism, TOO_LONG)
        else:
            text = line.decode("utf-8", "surrogateescape")
            self._sasl_step(reader.exchange, text, first=False)
        return True

    def _sasl_step(self, exchange: sasl.Exchange, text: Optional[str], *, first: bool) -> None:
        """Give the exchange the client's next text: answer with a ``+``
        challenge, or end in an ``Authenticate`` decision or a failure."""
        try:
            if first:
                result = exchange.start(text)
            else:
                assert text is not None
                result = exchange.respond(text)
        except sasl.SASLError as exc:
            self._login_failed(exchange.mechanism, exc.kind)
            return
        if isinstance(result, sasl.Credentials):
            self._reader = None
            self._decide(Authenticate(result))
        else:
            self._out += b"+ " + sasl.encode_challenge(result).encode("ascii") + CRLF

    def _login_failed(self, mechanism: str, reason: str) -> None:
        self._reader = None
        self._events.append(LoginFailed(mechanism, reason))
        text, code = _LOGIN_FAILURES.get(reason, _LOGIN_FAILURES[sasl.MALFORMED])
        self._err(text, code)

    def _junk(self) -> bool:
        """Count a command that does no work; past ``junk_limit`` the session
        ends (Postfix's smtpd_junk_command_limit, for POP3)."""
        self.junk += 1
        if self.junk_limit and self.junk > self.junk_limit:
            self._out += _err_line("too many commands without work", "SYS/TEMP")
            self._close(TOO_MANY_JUNK_COMMANDS)
            return True
        return False


Handler = Callable[[POP3ServerConnection, str], None]
_AUTHORIZATION = frozenset({State.AUTHORIZATION})
_TRANSACTION = frozenset({State.TRANSACTION})
_BOTH = _AUTHORIZATION | _TRANSACTION
P = POP3ServerConnection
COMMANDS: dict[str, tuple[Handler, frozenset[State]]] = {
    "CAPA": (P._do_capa, _BOTH),
    "QUIT": (P._do_quit, _BOTH),
    "STLS": (P._do_stls, _AUTHORIZATION),
    "USER": (P._do_user, _AUTHORIZATION),
    "PASS": (P._do_pass, _AUTHORIZATION),
    "APOP": (P._do_apop, _AUTHORIZATION),
    "AUTH": (P._do_auth, _AUTHORIZATION),
    "STAT": (P._do_stat, _TRANSACTION),
    "LIST": (P._do_list, _TRANSACTION),
    "UIDL": (P._do_uidl, _TRANSACTION),
    "RETR": (P._do_retr, _TRANSACTION),
    "TOP": (P._do_top, _TRANSACTION),
    "DELE": (P._do_dele, _TRANSACTION),
    "RSET": (P._do_rset, _TRANSACTION),
    "NOOP": (P._do_noop, _TRANSACTION),
}
"""The verb table: handler and the states the verb is valid in."""
del P


def _line(prefix: str, text: str = "") -> bytes:
    """One response line; CR or LF in ``text`` is a caller bug."""
    if "\r" in text or "\n" in text:
        raise UsageError("response text must be a single line")
    return (f"{prefix} {text}" if text else prefix).encode("utf-8", "surrogateescape") + CRLF


def _err_line(text: str, code: Optional[str] = None) -> bytes:
    if code is not None and not _CODE.fullmatch(code):
        raise UsageError(f"bad response code {code!r}")
    return _line("-ERR", f"[{code}] {text}" if code else text)
