# -*- test-case-name: tests.unit.test_reply -*-
"""The one reply type and the catalog of named replies.

Every reply the server sends is a :class:`Reply`: a basic code (RFC 5321), an
enhanced status code (RFC 3463, advertised through ENHANCEDSTATUSCODES,
RFC 2034) and text.  Code and tests share the catalog below, so a test asserts
``RCPT_UNKNOWN`` rather than a string it copied.

Invariant: the class of the basic code equals the class of the enhanced code
(2xx with 2.x.x, 4xx with 4.x.x, 5xx with 5.x.x).  Replies without an enhanced
code are only the greeting (220), the HELO/EHLO/LHLO replies (RFC 5321
4.1.1.1: their first word is the server's name) and the intermediate replies
354 and 334, which RFC 2034 leaves without one.  A 334 (an AUTH challenge,
RFC 4954 §4) is never in the catalog: its text is the base64 challenge, built
by the server core as ``Reply(334, None, text)``; empty text gives ``334 ``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

Enhanced = Tuple[int, int, int]


@dataclass(frozen=True)
class Reply:
    """An SMTP/LMTP reply: ``code``, optional ``enhanced`` code, ``text`` lines."""

    code: int
    enhanced: Optional[Enhanced]
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None:
            klass = self.enhanced[0]
            if klass != self.code // 100:
                raise ValueError(
                    f"reply {self.code} has enhanced code of class {klass}"
                )
        if "\r" in self.text or "\x00" in self.text:
            raise ValueError("reply text must not contain CR or NUL")

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The text split into lines, each prefixed by its enhanced code."""
        prefix = ""
        if self.enhanced is not None:
            prefix = "%d.%d.%d " % self.enhanced
        return [prefix + line for line in self.text.split("\n")]

    def to_bytes(self) -> bytes:
        """Serialise as a (possibly multi-line) reply, CRLF terminated."""
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8")

    def with_text(self, text: str) -> "Reply":
        """The same codes with other text."""
        return Reply(self.code, self.enhanced, text)

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8").rstrip("\r\n").replace("\r\n", " / ")


def R(code: int, enhanced: Optional[str], text: str) -> Reply:
    """Build a reply from ``"5.1.1"``-style enhanced code text."""
    enh = None
    if enhanced is not None:
        a, b, c = (int(p) for p in enhanced.split("."))
        enh = (a, b, c)
    return Reply(code, enh, text)


# --- positive -------------------------------------------------------------
OK = R(250, "2.0.0", "Ok")
QUEUED = R(250, "2.0.0", "Ok: queued as {id}")
DELIVERED = R(250, "2.0.0", "<{rcpt}> delivered ({id})")
SENDER_OK = R(250, "2.1.0", "Sender ok")
RCPT_OK = R(250, "2.1.5", "Recipient ok")
RESET_OK = R(250, "2.0.0", "Reset state")
NOOP_OK = R(250, "2.0.0", "Ok")
BYE = R(221, "2.0.0", "Bye")
VRFY_CANNOT = R(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = R(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = R(220, "2.0.0", "Ready to start TLS")
BDAT_OK = R(250, "2.0.0", "Octets received")  # sent as "<n> octets received"
ETRN_STARTED = R(250, "2.0.0", "Queuing for node {node} started")
ETRN_NOTHING = R(251, "2.0.0", "No messages waiting for node {node}")
HELP = R(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH")
AUTH_OK = R(235, "2.7.0", "Authentication successful")

# --- temporary ------------------------------------------------------------
SERVICE_UNAVAILABLE = R(421, "4.3.2", "Service not available, closing transmission channel")
SHUTTING_DOWN = R(421, "4.3.2", "Server shutting down, closing transmission channel")
TOO_MANY_CONNECTIONS = R(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_CLIENT = R(421, "4.7.0", "Too many connections from your address, try again later")
TIMEOUT = R(421, "4.4.2", "Timeout exceeded, closing connection")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
TOO_MANY_JUNK_COMMANDS = R(421, "4.7.0", "Too many commands that move no mail, closing connection")
CONNECTION_RATE_LIMITED = R(421, "4.7.0", "Too many connections from your address per minute, try again later")
DIRECTORY_UNAVAILABLE = R(451, "4.4.3", "Directory temporarily unavailable, try again later")
INTERNAL_ERROR = R(451, "4.3.0", "Internal error, try again later")
STORAGE_FULL = R(452, "4.3.1", "Insufficient system storage")
FORWARD_UNAVAILABLE = R(451, "4.3.0", "Forwarding to external addresses is not available yet, try again later")
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients")
PROTOCOL_DESYNC = R(421, "4.5.0", "Cannot find the next command, closing connection")
ETRN_UNAVAILABLE = R(458, "4.3.0", "Unable to queue messages for node {node}")
ETRN_DENIED = R(459, "4.7.1", "Node {node} not allowed: ETRN is for trusted networks only")
TLS_UNAVAILABLE = R(454, "4.7.0", "TLS not available due to temporary reason")
AUTH_TEMPORARY = R(454, "4.7.0", "Temporary authentication failure")
RATE_LIMITED = R(450, "4.7.1", "Message rate limit exceeded, try again later")
DMARC_TEMPORARY = R(451, "4.7.1", "The From: domain's DMARC policy cannot be checked now, try again later")
LOGIN_BLOCKED = R(421, "4.7.0", "Too many failed logins, closing connection")

# --- permanent ------------------------------------------------------------
SYNTAX_ERROR = R(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = R(500, "5.5.2", "Line too long")
NUL_IN_COMMAND = R(500, "5.5.2", "NUL character not allowed")
USE_LHLO = R(500, "5.5.1", "This is an LMTP server: send LHLO")
BAD_ARGUMENTS = R(501, "5.5.4", "Syntax error in parameters or arguments")
BDAT_SYNTAX = R(501, "5.5.4", "Syntax: BDAT <octets> [LAST]")
BAD_SENDER_SYNTAX = R(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = R(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = R(503, "5.5.1", "Send HELO/EHLO first")
NEED_LHLO = R(503, "5.5.1", "Send LHLO first")
NESTED_MAIL = R(503, "5.5.1", "Sender already specified")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command")
PARAM_NOT_RECOGNIZED = R(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
BODY_NOT_SUPPORTED = R(555, "5.5.4", "Unsupported BODY type")
ALREADY_TLS = R(503, "5.5.1", "TLS already active")
TLS_NOT_OFFERED = R(502, "5.5.1", "STARTTLS not available")
EIGHTBIT_ADDRESS = R(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
LOCAL_PART_TOO_LONG = R(553, "5.1.3", "Local part too long")
DOMAIN_TOO_LONG = R(553, "5.1.3", "Domain too long")
# The same for MAIL FROM: a sender's address error is 5.1.7, never the
# recipient's 5.1.3 (RFC 3463 3.2).
SENDER_LOCAL_PART_TOO_LONG = R(553, "5.1.7", "Sender local part too long")
SENDER_DOMAIN_TOO_LONG = R(553, "5.1.7", "Sender domain too long")
RCPT_UNKNOWN = R(550, "5.1.1", "User unknown")
MAILBOX_UNAVAILABLE = R(550, "5.2.0", "Mailbox unavailable")
MAILBOX_DISABLED = R(550, "5.2.1", "Mailbox disabled, not accepting messages")
SENDER_NOT_ALLOWED = R(550, "5.7.1", "Sender not allowed to send to this address")
RELAY_DENIED = R(554, "5.7.1", "Relay access denied")
MESSAGE_TOO_BIG = R(552, "5.3.4", "Message size exceeds fixed limit")
DATA_LINE_TOO_LONG = R(554, "5.6.0", "Message refused: line longer than 1000 octets")
BARE_NEWLINE = R(554, "5.6.0", "Message refused: bare CR or LF in message data (RFC 5321 2.3.8)")
NUL_IN_DATA = R(554, "5.6.0", "Message refused: NUL in message data")
MAIL_LOOP = R(554, "5.4.6", "Too many Received headers: mail loop detected")
BDAT_MIXED = R(503, "5.5.1", "BDAT and DATA cannot be mixed in one transaction")
NO_VALID_RCPTS = R(554, "5.5.1", "No valid recipients")
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required")
MUST_STARTTLS = R(530, "5.7.0", "Must issue a STARTTLS command first")
SENDER_NOT_OWNED = R(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = R(550, "5.7.1", "From: header address not owned by the authenticated user")  # after DATA: 550, not 553 (RFC 5321 4.3.2)
DMARC_REJECTED = R(550, "5.7.1", "Message refused by the DMARC policy of the From: domain")
SPF_FAILED = R(550, "5.7.23", "SPF: the sender's domain does not allow this host to send its mail")

# --- SMTP AUTH (RFC 4954) ----------------------------------------------------------
AUTH_FAILED = R(535, "5.7.8", "Authentication credentials invalid")
AUTH_NOT_ENABLED = R(503, "5.5.1", "Authentication not enabled")
AUTH_ALREADY = R(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = R(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_UNKNOWN_MECHANISM = R(504, "5.5.4", "Unrecognized authentication type")
AUTH_LINE_TOO_LONG = R(500, "5.5.6", "Authentication Exchange line is too long")
AUTH_CANCELLED = R(501, "5.7.0", "Authentication cancelled")
AUTH_MALFORMED = R(501, "5.5.2", "Invalid authentication data")


# --- outbound routing (delivery.mx, delivery.remote, delivery.routing) -----
# What the queue records for a recipient when the attempt never reached a
# remote reply.  ``{domain}``/``{remote}`` are filled in with ``with_text``.
DNS_UNAVAILABLE = R(451, "4.4.3", "Temporary DNS failure looking up {domain}")
NO_USABLE_MX = R(451, "4.4.4", "No usable mail exchanger for {domain}")
CONNECT_FAILED = R(451, "4.4.1", "Cannot connect to {remote}")
CONNECTION_LOST = R(451, "4.4.2", "Lost connection with {remote}")
TRANSPORT_DEFER = R(451, "4.3.0", "Delivery to this destination is deferred")
NULL_MX = R(556, "5.1.10", "Recipient address has null MX")
DOMAIN_NOT_FOUND = R(550, "5.1.2", "Domain {domain} does not exist")
NO_MAIL_ROUTE = R(550, "5.4.4", "No MX or address records for {domain}")
MAIL_LOOPS = R(554, "5.4.6", "Mail for {domain} loops back to myself")
TRANSPORT_ERROR = R(550, "5.0.0", "Mail for this destination is refused")


# --- outbound client: replies we make up about a remote server ---------------
# (The remote's own replies are passed on as they came; these describe what
# happened when there was no usable reply.  See mailserver.sansio.smtp_client.)
REMOTE_TIMEOUT = R(451, "4.4.2", "Timed out waiting for the remote server")
REMOTE_PROTOCOL_ERROR = R(451, "4.5.0", "Malformed or unexpected reply from the remote server")
REMOTE_TLS_NOT_OFFERED = R(451, "4.7.4", "TLS required but not offered by the remote server")
REMOTE_TLS_REFUSED = R(451, "4.7.4", "TLS required but the remote server refused STARTTLS")
REMOTE_TLS_FAILED = R(451, "4.7.5", "TLS handshake with the remote server failed")
REMOTE_NO_REQUIRETLS = R(550, "5.7.30", "REQUIRETLS support required but not offered by the remote server")
REQUIRETLS_UNVERIFIED = R(550, "5.7.30", "REQUIRETLS requires a verified TLS connection (DANE, MTA-STS or a verify policy) to the next hop")
REMOTE_DANE_MISMATCH = R(451, "4.7.5", "The remote server's certificate matches none of its DANE TLSA records")
DANE_LOOKUP_FAILED = R(451, "4.7.5", "DNSSEC lookup of TLSA records for {domain} failed")
MTA_STS_NO_MX = R(451, "4.7.5", "No mail exchanger of {domain} matches its MTA-STS policy")
REMOTE_AUTH_NEEDS_TLS = R(451, "4.7.11", "Authentication to the remote server needs TLS, which it does not offer")
REMOTE_AUTH_NOT_OFFERED = R(451, "4.7.0", "Authentication required but not offered by the remote server")
REMOTE_AUTH_FAILED = R(454, "4.7.8", "Authentication with the remote server failed")
CONTENT_UNREADABLE = R(451, "4.3.0", "Cannot read the queued message, try again later")
REMOTE_SIZE_EXCEEDED = R(552, "5.3.4", "Message size exceeds the remote server's limit")
REMOTE_NO_8BITMIME = R(554, "5.6.3", "Conversion required but not supported: the remote server does not accept 8-bit data")
REMOTE_NO_SMTPUTF8 = R(553, "5.6.7", "SMTPUTF8 required but not supported by the remote server")


def catalog() -> dict[str, Reply]:
    """Every named reply in this module, by name (for tests and docs)."""
    return {k: v for k, v in globals().items() if isinstance(v, Reply)}
