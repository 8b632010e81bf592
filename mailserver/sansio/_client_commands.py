# -*- test-case-name: tests.unit.test_smtp_client -*-
"""What the outbound client sends: MAIL and RCPT lines, and the content.

* :func:`unsendable` picks out addresses that no MAIL or RCPT command can
  carry (they get a permanent refusal instead of being sent).
* :func:`refusal` decides whether a message may go to a server at all, from
  the extensions it announced (SIZE, 8BITMIME, SMTPUTF8).
* :func:`mail_command` and :func:`rcpt_command` build the commands with the
  ESMTP parameters the server understands.
* :func:`xtext` and :func:`orcpt` encode ENVID and ORCPT values (RFC 3461 §4).
* :class:`DotStuffer` prepares message content for DATA: a dot at the start
  of a line is doubled and every line ends in CR LF.

No I/O and no Twisted here.
"""

from __future__ import annotations

import re
from typing import Optional

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.sansio._client_replies import size_limit
from mailserver.reply import Reply

_XTEXT = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")

# What may go between the angle brackets of MAIL FROM and RCPT TO.  A quoted
# local part holds RFC 5321 qtextSMTP and quoted-pairs (space included), as
# our listener accepts it; everything else is one word without spaces,
# quotes, backslashes or angle brackets.  Controls (CR, LF, NUL, TAB, DEL...)
# are refused everywhere, and so are the surrogates that stand for bytes
# that were not UTF-8.
_NOT_UTF8 = r"\ud800-\udfff"
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\\x00-\x1f\x7f' + _NOT_UTF8 + r']|\\[\x20-\x7e])*"')
_WORD = re.compile(r'[^\x00-\x20\x7f"\\<>' + _NOT_UTF8 + r']+')

UNSENDABLE_RECIPIENT = Reply(553, (5, 1, 3), "Recipient address cannot be sent over SMTP")
UNSENDABLE_SENDER = Reply(553, (5, 1, 7), "Sender address cannot be sent over SMTP")


def sendable(address: str) -> bool:
    """True when ``<address>`` is a well-formed path for MAIL or RCPT.

    ``local@domain``, where ``local`` is a quoted string or a word and the
    domain a word; or one word without ``@`` (``postmaster``).  This is no
    full syntax check (the receiver does that), only the guarantee that the
    address cannot end the command early or smuggle another one in.
    """
    local, at, domain = address.rpartition("@")
    if not at:
        return bool(_WORD.fullmatch(address))
    return bool((_QUOTED_LOCAL.fullmatch(local) or _WORD.fullmatch(local))
                and _WORD.fullmatch(domain))


def unsendable(message: OutboundMessage) -> dict[str, Reply]:
    """Our permanent refusal for each recipient that cannot be sent.

    A recipient whose address is no SMTP path gets ``553 5.1.3``; when the
    sender is not (the null sender ``""`` is), every recipient gets
    ``553 5.1.7``.  Empty when all is well.
    """
    if message.sender and not sendable(message.sender):
        return {r.address: UNSENDABLE_SENDER for r in message.recipients}
    return {r.address: UNSENDABLE_RECIPIENT for r in message.recipients
            if not sendable(r.address)}


def check_message(message: OutboundMessage) -> None:
    """Raise ValueError for a message no transaction is meant for (a bug
    of the caller, unlike :func:`unsendable` addresses)."""
    if not message.recipients:
        raise ValueError("a message without recipients")


def needs_smtputf8(message: OutboundMessage) -> bool:
    """True when the message is flagged SMTPUTF8 or has a non-ASCII address."""
    addresses = [message.sender] + [r.address for r in message.recipients]
    return message.smtputf8 or not all(a.isascii() for a in addresses)


def refusal(message: OutboundMessage, extensions: dict[str, str]) -> Optional[Reply]:
    """Our own refusal to send ``message`` to this server, or ``None``."""
    limit = size_limit(extensions)
    if limit and message.size > limit:
        return R.REMOTE_SIZE_EXCEEDED
    if message.eight_bit and "8BITMIME" not in extensions:
        return R.REMOTE_NO_8BITMIME
    if needs_smtputf8(message) and "SMTPUTF8" not in extensions:
        return R.REMOTE_NO_SMTPUTF8
    if message.requiretls and "REQUIRETLS" not in extensions:
        return R.REMOTE_NO_REQUIRETLS
    return None


def mail_command(message: OutboundMessage, extensions: dict[str, str]) -> str:
    """``MAIL FROM:<...>`` with SIZE, BODY, SMTPUTF8, RET and ENVID as fit.

    Call only when :func:`refusal` found nothing wrong.
    """
    words = [f"MAIL FROM:<{message.sender}>"]
    if "SIZE" in extensions:
        words.append(f"SIZE={message.size}")
    if message.eight_bit:
        words.append("BODY=8BITMIME")
    if needs_smtputf8(message):
        words.append("SMTPUTF8")
    if message.requiretls:
        words.append("REQUIRETLS")
    if "DSN" in extensions:
        if message.ret:
            words.append(f"RET={message.ret.upper()}")
        if message.envid:
            words.append(f"ENVID={xtext(message.envid)}")
    return " ".join(words)


def rcpt_command(rcpt: OutboundRecipient, extensions: dict[str, str]) -> str:
    """``RCPT TO:<...>`` with NOTIFY and ORCPT when the server has DSN."""
    words = [f"RCPT TO:<{rcpt.address}>"]
    if "DSN" in extensions:
        if rcpt.notify:
            words.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
        if rcpt.orcpt:
            words.append("ORCPT=" + orcpt(rcpt.orcpt))
    return " ".join(words)


def xtext(value: str) -> str:
    """``value`` as RFC 3461 xtext.

    A value that already is valid xtext (as received in a MAIL or RCPT
    parameter and stored unchanged) is sent as it is; anything else is
    encoded: ``+``, ``=``, spaces, controls and non-ASCII become ``+XX``.
    """
    if value and _XTEXT.fullmatch(value):
        return value
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append("+%02X" % byte)
    return "".join(out)


def orcpt(value: str) -> str:
    """An ORCPT parameter value: ``addr-type;xtext``, type ``rfc822`` if none."""
    addr_type, sep, address = value.partition(";")
    if not sep:
        addr_type, address = "rfc822", value
    return f"{addr_type.strip() or 'rfc822'};{xtext(address)}"


class DotStuffer:
    """Turns message content into DATA text, chunk by chunk.

    A "." at the start of a line gets another one in front (RFC 5321
    §4.5.2), and every line ends in CR LF: a bare LF or a bare CR is sent as
    CR LF, so the receiver never sees a lone line-ending character (which it
    may refuse, or read differently from us: SMTP smuggling).  A CR at the
    end of a chunk is held back until the next chunk shows whether an LF
    follows.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._cr = False  # a CR was held back at the end of the last chunk

    def feed(self, chunk: bytes) -> bytes:
        """The DATA text for the next piece of content."""
        if not chunk:
            return b""
        data = (b"\r" + chunk) if self._cr else chunk
        self._cr = data.endswith(b"\r")
        if self._cr:
            data = data[:-1]
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            return b""
        lines = data.split(b"\n")
        out = []
        for i, line in enumerate(lines):
            at_start = self._line_start if i == 0 else True
            if at_start and line.startswith(b"."):
                line = b"." + line
            out.append(line)
        self._line_start = data.endswith(b"\n")
        return b"\r\n".join(out)

    def finish(self) -> bytes:
        """The end of the content: a held-back CR, a final CR LF if the
        content did not end with one, then the terminating "." line."""
        out = b""
        if self._cr:
            out, self._cr, self._line_start = b"\r\n", False, True
        if not self._line_start:
            out += b"\r\n"
        self._line_start = True
        return out + b".\r\n"
