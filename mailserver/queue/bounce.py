# -*- test-case-name: tests.unit.test_bounce -*-
"""Delivery status notifications (RFC 3464), and when to send them (RFC 3461).

:func:`should_notify` decides, per recipient and event, whether the sender
asked for (or by default gets) a notification; :func:`make_dsn` writes one
``multipart/report; report-type=delivery-status`` message for several
recipients of one message and one kind of event:

1. ``text/plain``: what happened, in words, with each remote reply quoted;
2. ``message/delivery-status``: the machine-readable fields, one block for
   the message (Reporting-MTA, Original-Envelope-Id, Received-From-MTA,
   Arrival-Date) and one per recipient (Original-Recipient, Final-Recipient,
   Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date,
   Will-Retry-Until);
3. the original: ``message/rfc822`` (the whole message, byte for byte) for a
   failure when RET=FULL or no RET was given and the message is at most
   ``max_full_size`` (1 MiB by default); otherwise ``text/rfc822-headers``
   (only its header).  Delay and success reports always carry only the
   header: the sender still has the message, or it arrived.

Encoding choices, so that every DSN is valid whatever the original was:

* The delivery-status part is 7-bit ASCII.  A non-ASCII address is given as
  ``utf-8;`` with RFC 6533's ``\\x{HEX}`` escapes; non-ASCII in a remote reply
  is escaped the same way.
* ENVID and ORCPT are stored as received (xtext, RFC 3461 §4) and decoded
  here.
* An SMTPUTF8 original goes in as ``message/global`` (or
  ``message/global-headers``) in base64, which RFC 6532 §3.7 allows, keeping
  the DSN itself 7-bit.  Any other original with 8-bit bytes goes in as
  ``message/rfc822`` with ``8bit``: that DSN needs 8BITMIME (see
  :func:`is_8bit`), as the original did.

Status codes: a recipient that failed permanently keeps the remote's 5.x.x
code; one that failed because the queue lifetime ran out (its last reply was
temporary) gets ``4.4.7`` (RFC 3463: delivery time expired), with the last
reply in Diagnostic-Code.  The DSN comes from ``MAILER-DAEMON@<reporting
MTA>``, is marked ``Auto-Submitted: auto-replied`` (RFC 3834) and must be
sent with the null reverse-path, so that it is never bounced itself.
"""

from __future__ import annotations

import base64
import email.utils
import io
import re
import textwrap
from email import policy as email_policy
from email.generator import BytesGenerator
from email.message import Message, MIMEPart
from email.mime.multipart import MIMEMultipart
from email.parser import BytesParser
from typing import Optional, Sequence

from mailserver.queue.envelope import ClientInfo, Envelope, Recipient

__all__ = [
    "KINDS",
    "MAX_FULL_SIZE",
    "bounce_envelope",
    "is_8bit",
    "make_dsn",
    "make_postmaster_notice",
    "is_postmaster_notice",
    "notice_envelope",
    "should_notify",
]

#: Originals larger than this are returned as headers only.
MAX_FULL_SIZE = 1024 * 1024

#: kind -> (RFC 3461 NOTIFY keyword, RFC 3464 Action, Subject)
KINDS = {
    "failure": ("FAILURE", "failed", "Undelivered Mail Returned to Sender"),
    "delay": ("DELAY", "delayed", "Delayed Mail (still being retried)"),
    "success": ("SUCCESS", "delivered", "Successful Mail Delivery Report"),
    "relayed": ("SUCCESS", "relayed", "Successful Mail Delivery Report"),
}

_HEADER_LIMIT = 1024 * 1024  # never read more than this looking for the header end
_POLICY = email_policy.SMTP.clone(refold_source="none")
_POLICY_UTF8 = email_policy.SMTPUTF8.clone(refold_source="none")


def should_notify(envelope: Envelope, recipient: Recipient, kind: str, *,
                  delay_default: bool = True) -> bool:
    """Whether ``recipient``'s ``kind`` event produces a DSN.

    Never for the null sender (never bounce a bounce) nor for NOTIFY=NEVER.
    With an explicit NOTIFY, only the events it lists.  Without one,
    failures do, delays when ``delay_default`` (the "delay warning" setting),
    successes never.  A delay is reported once per recipient
    (``delay_notified``).
    """
    keyword = KINDS[kind][0]
    if envelope.sender == "" or "NEVER" in recipient.notify:
        return False
    if kind == "delay" and recipient.delay_notified:
        return False
    if recipient.notify:
        return keyword in recipient.notify
    if kind == "failure":
        return True
    if kind == "delay":
        return delay_default
    return False


def is_8bit(data: bytes) -> bool:
    """True when ``data`` (a DSN) must be sent with BODY=8BITMIME."""
    return not data.isascii()


def bounce_envelope(original: Envelope, queue_id: str, now: float, dsn: bytes, *,
                    reporting_mta: str = "") -> Envelope:
    """The envelope for queueing ``dsn``: from ``<>`` to the original sender,
    NOTIFY=NEVER, with the encoding flags the DSN needs."""
    if original.sender == "":
        raise ValueError("never bounce a bounce: the original sender is null")
    return Envelope(
        id=queue_id,
        sender="",
        recipients=[Recipient(address=original.sender, notify=("NEVER",))],
        arrival=now,
        next_attempt=now,
        size=len(dsn),
        eight_bit=is_8bit(dsn),
        smtputf8=not original.sender.isascii(),
        client=ClientInfo(helo=reporting_mta, protocol="local"),
    )


def make_dsn(envelope: Envelope, recipients: Sequence[Recipient], *, reporting_mta: str,
             original_path: Optional[str], now: float, kind: str = "failure",
             will_retry_until: Optional[float] = None,
             max_full_size: int = MAX_FULL_SIZE) -> bytes:
    """One DSN about ``recipients`` of ``envelope``, CRLF line ends.

    ``reporting_mta`` is our host name; ``original_path`` the queued content
    (None, or missing: the report goes without it); ``now`` the time of the
    report; ``will_retry_until`` the end of the queue lifetime, for delays.
    The caller decides who is reported with :func:`should_notify`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    if envelope.sender == "":
        raise ValueError("never bounce a bounce: the sender is null")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    _, action, subject = KINDS[kind]
    utf8 = not (envelope.sender.isascii() and reporting_mta.isascii())
    policy = _POLICY_UTF8 if utf8 else _POLICY

    report = MIMEMultipart("report", policy=policy, report_type="delivery-status")
    mime_headers = [(k, report[k]) for k in ("MIME-Version", "Content-Type")]
    for k, _ in mime_headers:
        del report[k]  # added again after ours, for a conventional header order
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = envelope.sender
    report["Subject"] = subject
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid(
        idstring=envelope.id or None, domain=reporting_mta)
    report["Auto-Submitted"] = "auto-replied"
    for k, v in mime_headers:
        report[k] = v
    report.preamble = "This is a MIME-encapsulated message.\r\n"

    original = _read_original(original_path, kind, envelope, max_full_size)
    human = MIMEPart(policy=policy)
    text = _human_text(envelope, recipients, reporting_mta, kind, will_retry_until, original)
    human.set_content(text, charset="utf-8",
                      cte="7bit" if text.isascii() else "quoted-printable")
    human["Content-Description"] = "Notification"
    report.attach(human)
    report.attach(_status_part(envelope, recipients, reporting_mta, action, kind, now,
                               will_retry_until))
    if original is not None:
        report.attach(_original_part(envelope, *original))

    buf = io.BytesIO()
    BytesGenerator(buf, policy=policy, mangle_from_=False).flatten(report)
    return buf.getvalue()


# --- the human-readable part ------------------------------------------------

_INTRO = {
    "failure": ("Your message could not be delivered to one or more recipients.\n"
                "The reasons are below; the message itself is attached."),
    "delay": ("Your message has not been delivered yet to the recipients below.\n"
              "This is only a warning: the mail system keeps trying{until}, and\n"
              "you need not send the message again."),
    "success": "Your message was delivered to the recipients below.",
    "relayed": ("Your message was passed on to the recipients' mail systems, which\n"
                "do not report delivery back; no further notice will follow."),
}


def _human_text(envelope, recipients, reporting_mta, kind, will_retry_until, original) -> str:
    until = ""
    if will_retry_until is not None:
        until = " until " + email.utils.formatdate(will_retry_until, localtime=True)
    lines = [f"This is the mail system at {reporting_mta}.", "",
             _INTRO[kind].format(until=until), ""]
    if kind == "failure" and original is not None and original[1] == "headers":
        lines += ["Only the header of your message is attached" +
                  (": it was too large to return whole." if envelope.ret != "HDRS" else "."), ""]
    if kind == "failure":
        lines += ["If you ask the postmaster for help, include this report.", ""]
    for rcpt in recipients:
        lines.append(textwrap.fill(f"<{rcpt.address}>: {_explain(rcpt, kind)}", width=76,
                                   subsequent_indent="    ", break_long_words=True,
                                   break_on_hyphens=False))
    lines += ["", f"Queue id: {envelope.id}", ""]
    return "\n".join(lines)


def _explain(rcpt: Recipient, kind: str) -> str:
    reply = rcpt.last_reply
    where = rcpt.remote
    if reply is None:
        return {"failure": "gave up: delivery time expired",
                "delay": "not yet delivered, will keep trying"}.get(kind, "delivered")
    said = _said(reply)
    quoted = f"host {where} said: {said}" if where and where != "local" else said
    if kind == "failure" and not reply.is_permanent:
        return f"gave up (delivery time expired); the last attempt got: {quoted}"
    return quoted


# --- the delivery-status part ----------------------------------------------

def _status_part(envelope, recipients, reporting_mta, action, kind, now, will_retry_until):
    blocks = []
    head = _block()
    head["Reporting-MTA"] = f"dns; {_ascii(reporting_mta)}"
    head["X-Mailserver-Queue-ID"] = _ascii(envelope.id)
    if envelope.envid:
        head["Original-Envelope-Id"] = _ascii(_xtext_decode(envelope.envid))
    client = envelope.client
    if client.helo or client.address:
        name = _ascii(client.helo or "unknown")
        head["Received-From-MTA"] = f"dns; {name}" + (
            f" ([{_ascii(client.address)}])" if client.address else "")
    head["Arrival-Date"] = email.utils.formatdate(envelope.arrival, localtime=True)
    blocks.append(head)
    for rcpt in recipients:
        b = _block()
        if rcpt.orcpt:
            b["Original-Recipient"] = _original_recipient(rcpt.orcpt)
        b["Final-Recipient"] = _address_field(rcpt.address)
        b["Action"] = action
        b["Status"] = _status(rcpt, kind)
        host = remote_mta(rcpt.remote)
        if host:
            b["Remote-MTA"] = f"dns; {_ascii(host)}"
        if rcpt.last_reply is not None:
            b["Diagnostic-Code"] = _fold(f"smtp; {_ascii(_said(rcpt.last_reply))}",
                                       "Diagnostic-Code")
        b["Last-Attempt-Date"] = email.utils.formatdate(
            rcpt.last_attempt if rcpt.last_attempt is not None else now, localtime=True)
        if kind == "delay" and will_retry_until is not None:
            b["Will-Retry-Until"] = email.utils.formatdate(will_retry_until, localtime=True)
        blocks.append(b)
    part = MIMEPart(policy=_POLICY)
    part["Content-Type"] = "message/delivery-status"
    part["Content-Description"] = "Delivery report"
    part.set_payload(blocks)
    return part


def _block() -> Message:
    # compat32 blocks keep our own folding; the generator runs with
    # refold_source="none", so field values are written exactly as given.
    return Message(policy=email_policy.compat32)


def _said(reply) -> str:
    """A reply on one line: ``550 5.1.1 text``, the lines of its text joined."""
    enhanced = "%d.%d.%d " % reply.enhanced if reply.enhanced else ""
    return f"{reply.code} {enhanced}{' '.join(reply.text.split())}"


def _status(rcpt: Recipient, kind: str) -> str:
    reply = rcpt.last_reply
    if kind == "failure":
        if reply is None or not reply.is_permanent:
            return "4.4.7"
        default = "5.0.0"
    elif kind == "delay":
        if reply is None or not reply.is_temporary:
            return "4.0.0"
        default = "4.0.0"
    else:
        if reply is None or not reply.is_positive:
            return "2.0.0"
        default = "2.0.0"
    return "%d.%d.%d" % reply.enhanced if reply.enhanced else default


def remote_mta(remote: str) -> str:
    """The Remote-MTA name from where an attempt went: the host name of
    ``host[ip]:port``, ``[ip]`` for an address literal ``[ip]:port``, the host
    of ``host:port``; nothing for local delivery or a UNIX socket."""
    if not remote or remote == "local" or remote.startswith("unix:"):
        return ""
    if remote.startswith("["):
        return remote[: remote.index("]") + 1] if "]" in remote else ""
    host = remote.split("[", 1)[0]
    if "[" not in remote and host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host


def _address_field(address: str) -> str:
    if address.isascii() and "\\" not in address:
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_xtext(address)}"


def _original_recipient(orcpt: str) -> str:
    addr_type, _, value = orcpt.partition(";")
    decoded = _xtext_decode(value.strip())
    if addr_type.strip().lower() == "rfc822" and not decoded.isascii():
        return f"utf-8; {_utf8_xtext(decoded)}"
    return f"{_ascii(addr_type.strip())}; {_ascii(decoded)}"


_XTEXT = re.compile(r"\+([0-9A-F]{2})")


def _xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``+2B`` -> ``+``); malformed text is kept as is."""
    if "+" not in text:
        return text
    try:
        raw = _XTEXT.sub(lambda m: chr(int(m.group(1), 16)), text)
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _utf8_xtext(text: str) -> str:
    """RFC 6533 utf-8-addr-xtext: ``\\x{HEX}`` for anything not a plain QCHAR."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                   for c in text)


def _ascii(text: str) -> str:
    """Printable ASCII only: other characters as ``\\x{HEX}``, controls as spaces."""
    out = []
    for c in text:
        if c in "\r\n\t":
            out.append(" ")
        elif 0x20 <= ord(c) <= 0x7E:
            out.append(c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(" ")
        else:
            out.append(f"\\x{{{ord(c):X}}}")
    return "".join(out)


def _fold(value: str, name: str, width: int = 78, limit: int = 4000) -> str:
    """Fold field ``name``'s long value at spaces (CRLF + space) so that lines
    stay within ``width`` where words allow; cut it at ``limit``."""
    if len(value) > limit:
        value = value[:limit] + "..."
    words = value.split(" ")
    lines, current = [], ""
    for word in words:
        room = width - (len(name) + 2 if not lines else 0)
        if current and len(current) + 1 + len(word) > room:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(line for line in lines if line) or value


# --- the original ---------------------------------------------------------

def _read_original(path, kind, envelope, max_full_size):
    """``(bytes, "full"|"headers")``, or None when the content is gone."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if kind == "failure" and envelope.ret != "HDRS" and size <= max_full_size:
                return f.read(), "full"
            return _read_header(f), "headers"
    except FileNotFoundError:
        return None


def _read_header(f) -> bytes:
    data = b""
    while len(data) < _HEADER_LIMIT:
        chunk = f.read(65536)
        if not chunk:
            break
        data += chunk
        end = _header_end(data)
        if end is not None:
            return data[:end]
    end = _header_end(data)
    return data[:end] if end is not None else data[:_HEADER_LIMIT]


def _header_end(data: bytes) -> Optional[int]:
    if data.startswith(b"\r\n") or data.startswith(b"\n"):
        return 0
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    ends = [i + 2 for i in (crlf,) if i >= 0] + [i + 1 for i in (lf,) if i >= 0]
    return min(ends) if ends else None


def _original_part(envelope: Envelope, data: bytes, what: str) -> MIMEPart:
    part = MIMEPart(policy=_POLICY)
    ascii_only = data.isascii()
    if envelope.smtputf8 and not ascii_only:
        # RFC 6532 3.7: message/global may be base64-encoded; the DSN stays 7-bit.
        part["Content-Type"] = "message/global" if what == "full" else "message/global-headers"
        part["Content-Transfer-Encoding"] = "base64"
        part.set_payload(_base64_lines(data))
    elif what == "full":
        part["Content-Type"] = "message/rfc822"
        part["Content-Transfer-Encoding"] = "7bit" if ascii_only else "8bit"
        part.set_payload([BytesParser(policy=_POLICY).parsebytes(data)])
    else:
        part["Content-Type"] = "text/rfc822-headers"
        if ascii_only:
            part["Content-Transfer-Encoding"] = "7bit"
            part.set_payload(data.decode("ascii").replace("\r\n", "\n"))
        else:
            part["Content-Transfer-Encoding"] = "base64"
            part.set_payload(_base64_lines(data))
    part["Content-Description"] = "Undelivered message" if what == "full" else "Message headers"
    return part


def _base64_lines(data: bytes) -> str:
    # CRLF: the generator writes a message/* payload given as text verbatim.
    return base64.encodebytes(data).decode("ascii").replace("\n", "\r\n")


# --- undeliverable bounces: a notice to the postmaster ------------------------------

#: Marks a postmaster notice: the envelope's client protocol and a header of
#: its own, so that neither it nor a forwarded copy of it ever brings another.
NOTICE_PROTOCOL = "postmaster-notice"
NOTICE_HEADER = "X-Mailserver-Notice"
NOTICE_VALUE = "undeliverable-bounce"


def is_postmaster_notice(envelope: Envelope, original_path: Optional[str]) -> bool:
    """Whether the queued message is a postmaster notice, or a copy of one."""
    if envelope.client.protocol == NOTICE_PROTOCOL:
        return True
    try:
        with open(original_path, "rb") as f:
            header = _read_header(f)
    except (OSError, TypeError):
        return False
    parsed = BytesParser(policy=email_policy.compat32).parsebytes(header, headersonly=True)
    return any(v.strip().lower() == NOTICE_VALUE for v in parsed.get_all(NOTICE_HEADER, []))


def make_postmaster_notice(envelope: Envelope, recipients: Sequence[Recipient], *,
                           reporting_mta: str, postmaster: str, original_path: Optional[str],
                           now: float) -> bytes:
    """A short notice to ``postmaster`` that a message from ``<>`` (a bounce)
    could not be delivered to ``recipients`` (Postfix's ``2bounce`` class):
    what happened in words, and the bounce's header as
    ``text/rfc822-headers``.  Marked with :data:`NOTICE_HEADER`."""
    report = MIMEMultipart("mixed", policy=_POLICY)
    mime_headers = [(k, report[k]) for k in ("MIME-Version", "Content-Type")]
    for k, _ in mime_headers:
        del report[k]
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = postmaster
    report["Subject"] = "Undeliverable bounce"
    report["Date"] = email.utils.formatdate(now, localtime=True)
    report["Message-ID"] = email.utils.make_msgid(idstring=envelope.id or None,
                                                  domain=reporting_mta)
    report["Auto-Submitted"] = "auto-generated"
    report[NOTICE_HEADER] = NOTICE_VALUE
    for k, v in mime_headers:
        report[k] = v
    report.preamble = "This is a MIME-encapsulated message.\r\n"
    lines = [f"This is the mail system at {reporting_mta}.", "",
             "A delivery status notification (a message from <>) could not be",
             "delivered and has been removed from the queue; its header is attached.", ""]
    for rcpt in recipients:
        lines.append(textwrap.fill(f"<{_ascii(rcpt.address)}>: {_ascii(_explain(rcpt, 'failure'))}",
                                   width=76, subsequent_indent="    ", break_long_words=True,
                                   break_on_hyphens=False))
    lines += ["", f"Queue id: {envelope.id}", ""]
    human = MIMEPart(policy=_POLICY)
    human.set_content("\n".join(lines), charset="utf-8", cte="7bit")
    human["Content-Description"] = "Notification"
    report.attach(human)
    original = _read_original(original_path, "delay", envelope, 0)  # the header only
    if original is not None:
        report.attach(_original_part(envelope, *original))
    buf = io.BytesIO()
    BytesGenerator(buf, policy=_POLICY, mangle_from_=False).flatten(report)
    return buf.getvalue()


def notice_envelope(queue_id: str, now: float, notice: bytes, *, postmaster: str,
                    reporting_mta: str = "") -> Envelope:
    """The envelope for queueing ``notice``: from ``<>`` to ``postmaster``,
    NOTIFY=NEVER, marked as a notice (:data:`NOTICE_PROTOCOL`)."""
    return Envelope(
        id=queue_id,
        sender="",
        recipients=[Recipient(address=postmaster, notify=("NEVER",))],
        arrival=now,
        next_attempt=now,
        size=len(notice),
        eight_bit=is_8bit(notice),
        client=ClientInfo(helo=reporting_mta, protocol=NOTICE_PROTOCOL),
    )
