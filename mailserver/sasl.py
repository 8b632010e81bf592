# -*- test-case-name: tests.unit.test_sasl -*-
"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954) and POP3 AUTH (RFC 5034).

This module does no I/O and imports nothing from Twisted.  The protocol
adapter reads a line, passes its text to an :class:`Exchange`, and writes
what comes back: a challenge as raw bytes (the adapter base64-encodes it
with :func:`encode_challenge` and sends ``334 <text>`` or ``+ <text>``), or
:class:`Credentials` once the client has said everything.  Checking the
password against the directory is the caller's job; this module only says
whether the client's data is well formed.

Decisions:

* Every failure is a :class:`SASLError` whose ``kind`` is one of a few
  constants, so the adapters map kinds to replies (501, 535, 504...) without
  parsing messages.  Messages are fixed texts written here: they never
  contain client data, and so never a password, a login name or a control
  character that could forge a log line.
* Base64 is decoded strictly: only the alphabet, correct padding, no
  whitespace, and the encoding must be canonical (the unused bits of the
  last character are zero; RFC 4648 §3.5 allows refusing the others), so
  each response has exactly one spelling.  ``""`` is the empty response;
  ``"="`` also means empty (RFC 4954 uses it for an empty initial response).
  Text longer than :data:`MAX_RESPONSE` is refused whatever the reader did.
* ``"*"`` cancels a pending challenge.  As an initial response it is not
  base64, so it is malformed rather than a cancel.
* Names, passwords and authzids must be UTF-8.  Nothing is normalised
  (no SASLprep): the login is handed over as sent, and the directory decides
  how to compare it.  A NUL inside a LOGIN username or password is refused,
  as PLAIN's grammar refuses it (no NUL may reach a directory or a log).
* PLAIN accepts an authzid only when it is empty or equal to the authcid:
  we do not let one user act as another.  It is kept as sent.
* Mechanism names are matched case-insensitively in ASCII only, so that
  ``"plaın"`` (dotless i) does not upper-case its way to ``"PLAIN"``.
* An :class:`Exchange` is single-use.  After success or any error it is
  ``done``, and further calls are programming errors (``RuntimeError``),
  not client errors.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field

MECHANISMS: tuple[str, ...] = ("PLAIN", "LOGIN")
MAX_RESPONSE: int = 12288

MALFORMED = "malformed"
CANCELLED = "cancelled"
AUTHZID = "authzid"
UNKNOWN_MECHANISM = "unknown-mechanism"

LOGIN_USERNAME = b"Username:"
LOGIN_PASSWORD = b"Password:"


class SASLError(Exception):
    """A failed exchange; ``kind`` says why, the message is a fixed text."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


@dataclass(frozen=True)
class Credentials:
    """What the client claimed; the password never appears in the repr."""

    mechanism: str
    login: str
    password: str = field(repr=False)
    authzid: str = ""


def encode_challenge(data: bytes) -> str:
    """Return the base64 text of a challenge (``""`` for no data)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def decode_response(text: str) -> bytes:
    """Decode one client response strictly, or raise SASLError(MALFORMED)."""
    if len(text) > MAX_RESPONSE:
        raise SASLError(MALFORMED, "response too long")
    if text == "=":
        return b""
    if not text.isascii():
        raise SASLError(MALFORMED, "not base64")
    raw = text.encode("ascii")
    try:
        data = binascii.a2b_base64(raw, strict_mode=True)
    except binascii.Error:
        raise SASLError(MALFORMED, "not base64") from None
    if binascii.b2a_base64(data, newline=False) != raw:
        raise SASLError(MALFORMED, "not canonical base64")
    return data


def _text(data: bytes, empty_ok: bool = False) -> str:
    """Decode one field as UTF-8, refusing NUL and (unless allowed) emptiness."""
    if not data and not empty_ok:
        raise SASLError(MALFORMED, "empty field")
    if b"\0" in data:
        raise SASLError(MALFORMED, "NUL in field")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError(MALFORMED, "not UTF-8") from None


def _parse_plain(message: bytes) -> Credentials:
    """Parse ``authzid NUL authcid NUL passwd`` (RFC 4616 §2)."""
    parts = message.split(b"\0")
    if len(parts) != 3:
        raise SASLError(MALFORMED, "PLAIN needs exactly two NULs")
    authzid = _text(parts[0], empty_ok=True)
    login = _text(parts[1])
    password = _text(parts[2])
    if authzid and authzid != login:
        raise SASLError(AUTHZID, "authorization identity differs")
    return Credentials("PLAIN", login, password, authzid)


class Exchange:
    """One authentication exchange with one mechanism, used once."""

    def __init__(self, mechanism: str) -> None:
        name = mechanism.upper() if mechanism.isascii() else ""
        if name not in MECHANISMS:
            raise SASLError(UNKNOWN_MECHANISM)
        self.mechanism = name
        self.done = False
        self._started = False
        self._login: str | None = None   # LOGIN: the username once received

    def __repr__(self) -> str:
        return f"<Exchange {self.mechanism} done={self.done}>"

    def start(self, initial: str | None) -> bytes | Credentials:
        """Begin, with the initial response text if the command carried one."""
        if self._started or self.done:
            raise RuntimeError("SASL exchange already started")
        self._started = True
        return self._advance(initial)

    def respond(self, line: str) -> bytes | Credentials:
        """Take the client's response line to the last challenge."""
        if not self._started or self.done:
            raise RuntimeError("SASL exchange not waiting for a response")
        if line == "*":
            self.done = True
            raise SASLError(CANCELLED)
        return self._advance(line)

    def _advance(self, text: str | None) -> bytes | Credentials:
        """Decode ``text`` and run one step, marking the exchange done at the end."""
        try:
            data = None if text is None else decode_response(text)
            result = _STEPS[self.mechanism](self, data)
        except SASLError:
            self.done = True
            raise
        if isinstance(result, Credentials):
            self.done = True
        return result

    def _plain(self, data: bytes | None) -> bytes | Credentials:
        if data is None:
            return b""
        return _parse_plain(data)

    def _login_step(self, data: bytes | None) -> bytes | Credentials:
        if self._login is None:
            if data is None:
                return LOGIN_USERNAME
            self._login = _text(data)
            return LOGIN_PASSWORD
        assert data is not None
        return Credentials("LOGIN", self._login, _text(data))


_STEPS = {"PLAIN": Exchange._plain, "LOGIN": Exchange._login_step}
