# -*- test-case-name: tests.unit.test_queue_spool -*-
"""The envelope of a queued message, and its file format.

An :class:`Envelope` is everything the queue knows about a message apart from
its content: the reverse-path, every recipient with its RFC 3461 parameters
and its own delivery state, the message-wide DSN parameters, the retry
bookkeeping and where the message came from.  The queue manager changes it
as deliveries happen; :mod:`mailserver.queue.spool` stores it as one small
JSON file.

File format (version 1), one JSON object, UTF-8, non-ASCII escaped::

    {"version": 1, "id": "AGFK...", "sender": "a@example.org",
     "recipients": [{"address": "b@example.net", "notify": ["FAILURE"],
                     "orcpt": "rfc822;b@example.net", "state": "pending",
                     "attempts": 1, "last_reply": [451, "4.3.0", "try later"],
                     "remote": "mx.example.net[192.0.2.1]", "last_attempt": 1.7e9,
                     "delay_notified": false}],
     "arrival": 1.7e9, "size": 1234, "eight_bit": false, "smtputf8": false,
     "envid": null, "ret": null, "attempts": 1, "next_attempt": 1.7e9,
     "last_error": "...", "client": {"address": "192.0.2.9", "helo": "c.example",
     "hostname": "", "protocol": "ESMTPS", "login": ""}}

Reading is strict: a missing or unknown key, a value of the wrong type, an
unknown state or version, or a reply whose codes disagree raises
:class:`EnvelopeError`; the spool quarantines such a file rather than guess.
Fields added later bump the version; older versions stay readable.

The queue's exceptions live here too, with the rule for what a queue id may
look like (:data:`ID_PATTERN`, :func:`check_id`): ids become file names, so
anything else is refused before it reaches a path.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.errors import MailError
from mailserver.reply import Reply

__all__ = [
    "AlreadyClaimed",
    "InvalidQueueId",
    "NotQueued",
    "QueueError",
    "check_id",
    "ENVELOPE_VERSION",
    "RECIPIENT_STATES",
    "ClientInfo",
    "Envelope",
    "EnvelopeError",
    "Recipient",
]

ENVELOPE_VERSION = 1

PENDING, DELIVERED, BOUNCED = "pending", "delivered", "bounced"
RECIPIENT_STATES = (PENDING, DELIVERED, BOUNCED)
NOTIFY_KEYWORDS = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")


#: What a queue id looks like (new_queue_id makes base32); anything else is
#: refused before it can become part of a path.
ID_PATTERN = re.compile(r"[A-Za-z0-9]{1,64}\Z")


class QueueError(MailError):
    """Base of the queue's own exceptions."""


class EnvelopeError(QueueError, ValueError):
    """An envelope file (or dict) is not a valid envelope."""


class InvalidQueueId(QueueError, ValueError):
    """A string that cannot be a queue id (and must never become a path)."""


class NotQueued(QueueError, LookupError):
    """No message with this id is in the queue."""

    def __init__(self, queue_id: str) -> None:
        super().__init__(f"{queue_id}: not in the queue")
        self.queue_id = queue_id


class AlreadyClaimed(QueueError):
    """A rename or unlink found the envelope gone from where it was expected.

    Another process got there first.  ``state`` is where the message is now,
    or ``None`` when it is no longer queued at all.
    """

    def __init__(self, queue_id: str, state: Optional[str]) -> None:
        where = f"now in {state}/" if state else "no longer queued"
        super().__init__(f"{queue_id}: {where}")
        self.queue_id = queue_id
        self.state = state


def check_id(queue_id: str) -> str:
    """Return ``queue_id`` if it is a well-formed id; raise InvalidQueueId if not."""
    if not isinstance(queue_id, str) or not ID_PATTERN.match(queue_id):
        raise InvalidQueueId(f"invalid queue id {queue_id!r}")
    return queue_id


@dataclass
class Recipient:
    """One envelope recipient and how far its delivery got.

    ``state`` is ``pending`` (not yet delivered; retried), ``delivered`` or
    ``bounced`` (permanently failed or expired; a DSN may be due).
    ``last_reply`` is the last answer about it (the remote's reply, or ours
    for a connection failure); ``remote`` is where that answer came from,
    ``"mx.example.net[192.0.2.1]"``.  ``mailbox_only``: a local mailbox
    whose copy failed when the message arrived; the retry delivers into that
    mailbox alone, since the address's forwards were already queued.
    """

    address: str
    notify: Tuple[str, ...] = ()
    orcpt: Optional[str] = None
    mailbox_only: bool = False
    state: str = PENDING
    attempts: int = 0
    last_reply: Optional[Reply] = None
    remote: str = ""
    last_attempt: Optional[float] = None
    delay_notified: bool = False

    @property
    def domain(self) -> str:
        """The domain part, lower-cased, without a trailing dot."""
        return self.address.rpartition("@")[2].lower().rstrip(".")

    def record(self, reply: Reply, remote: str, now: float) -> None:
        """Note the result of one attempt: 2xx delivered, 5xx bounced, 4xx pending."""
        self.attempts += 1
        self.last_reply = reply
        self.remote = remote
        self.last_attempt = now
        if reply.is_positive:
            self.state = DELIVERED
        elif reply.is_permanent:
            self.state = BOUNCED

    def expire(self) -> None:
        """Give up at the end of the queue lifetime.  The last (temporary)
        reply and where it came from stay as they were: the DSN reports
        4.4.7 and quotes them, and never blames a host for a reply it did
        not send."""
        self.state = BOUNCED

    def outbound(self) -> OutboundRecipient:
        return OutboundRecipient(address=self.address, notify=self.notify, orcpt=self.orcpt,
                                 mailbox_only=self.mailbox_only)


@dataclass
class ClientInfo:
    """Where the message came from, for logs and DSNs."""

    address: str = ""  # the client's IP address ("" for a local submission)
    helo: str = ""
    hostname: str = ""  # reverse DNS name, when known
    protocol: str = ""  # "ESMTP", "ESMTPSA", "LMTP", ...
    login: str = ""  # the authenticated login, if any


@dataclass
class Envelope:
    """A queued message's metadata.  ``sender`` is ``""`` for the null path."""

    id: str
    sender: str
    recipients: List[Recipient]
    arrival: float
    size: int = 0
    eight_bit: bool = False
    smtputf8: bool = False
    envid: Optional[str] = None
    ret: Optional[str] = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str = ""
    client: ClientInfo = field(default_factory=ClientInfo)
    requiretls: bool = False  # RFC 8689; written only when set

    # --- views ------------------------------------------------------------

    def pending(self) -> List[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]

    @property
    def done(self) -> bool:
        """True when no recipient is pending any more."""
        return not any(r.state == PENDING for r in self.recipients)

    def recipient(self, address: str) -> Recipient:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    def outbound(self, content_path: str, recipients=None) -> OutboundMessage:
        """The delivery request for ``recipients`` (default: every pending one)."""
        rcpts = self.pending() if recipients is None else list(recipients)
        return OutboundMessage(
            queue_id=self.id,
            sender=self.sender,
            recipients=tuple(r.outbound() for r in rcpts),
            content_path=content_path,
            size=self.size,
            eight_bit=self.eight_bit,
            smtputf8=self.smtputf8,
            envid=self.envid,
            ret=self.ret,
            arrival=self.arrival,
            requiretls=self.requiretls,
        )

    # --- serialisation ----------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        extra = {"requiretls": True} if self.requiretls else {}
        return {**extra,
            "version": ENVELOPE_VERSION,
            "id": self.id,
            "sender": self.sender,
            "recipients": [_recipient_to_dict(r) for r in self.recipients],
            "arrival": self.arrival,
            "size": self.size,
            "eight_bit": self.eight_bit,
            "smtputf8": self.smtputf8,
            "envid": self.envid,
            "ret": self.ret,
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_error": self.last_error,
            "client": {
                "address": self.client.address,
                "helo": self.client.helo,
                "hostname": self.client.hostname,
                "protocol": self.client.protocol,
                "login": self.client.login,
            },
        }

    def to_json(self) -> bytes:
        """The file content: compact JSON, ASCII only, newline-terminated."""
        self.validate()
        text = json.dumps(self.to_dict(), ensure_ascii=True, separators=(",", ":"),
                          allow_nan=False)
        return text.encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        """Parse a file's content; raise :class:`EnvelopeError` if it is not valid."""
        try:
            raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise EnvelopeError(f"not JSON: {e}") from None
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> "Envelope":
        r = _Reader(raw, "envelope")
        version = r.get("version", int)
        if not 1 <= version <= ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {version}")
        rcpt_list = r.get("recipients", list)
        if not rcpt_list:
            raise EnvelopeError("envelope has no recipients")
        client = _Reader(r.get("client", dict), "client")
        env = cls(
            id=r.get("id", str),
            sender=r.get("sender", str),
            recipients=[_recipient_from_dict(x, i) for i, x in enumerate(rcpt_list)],
            arrival=r.get("arrival", float),
            size=r.get("size", int),
            eight_bit=r.get("eight_bit", bool),
            smtputf8=r.get("smtputf8", bool),
            envid=r.get("envid", str, optional=True),
            ret=r.get("ret", str, optional=True),
            attempts=r.get("attempts", int),
            next_attempt=r.get("next_attempt", float),
            last_error=r.get("last_error", str),
            client=ClientInfo(**{k: client.get(k, str) for k in
                                 ("address", "helo", "hostname", "protocol", "login")}),
            requiretls="requiretls" in r.raw and r.get("requiretls", bool),
        )
        client.finish()
        r.finish()
        env.validate()
        return env

    def validate(self) -> None:
        """Check the values' meaning (types are checked when reading)."""
        if not isinstance(self.id, str) or not ID_PATTERN.match(self.id):
            raise EnvelopeError(f"invalid queue id {self.id!r}")
        if self.ret is not None and self.ret not in RET_VALUES:
            raise EnvelopeError(f"invalid RET {self.ret!r}")
        if not self.recipients:
            raise EnvelopeError("envelope has no recipients")
        for name in ("arrival", "next_attempt"):
            if not math.isfinite(getattr(self, name)):
                raise EnvelopeError(f"{name} is not a finite number")
        if self.size < 0 or self.attempts < 0:
            raise EnvelopeError("negative size or attempts")
        for rc in self.recipients:
            if not rc.address:
                raise EnvelopeError("empty recipient address")
            if rc.state not in RECIPIENT_STATES:
                raise EnvelopeError(f"invalid recipient state {rc.state!r}")
            bad = [k for k in rc.notify if k not in NOTIFY_KEYWORDS]
            if bad or ("NEVER" in rc.notify and len(rc.notify) > 1):
                raise EnvelopeError(f"invalid NOTIFY {','.join(rc.notify)!r}")
            if rc.attempts < 0:
                raise EnvelopeError("negative recipient attempts")


def _recipient_to_dict(r: Recipient) -> Dict[str, Any]:
    reply = None
    if r.last_reply is not None:
        enh = r.last_reply.enhanced
        reply = [r.last_reply.code, "%d.%d.%d" % enh if enh else None, r.last_reply.text]
    out = {
        "address": r.address,
        "notify": list(r.notify),
        "orcpt": r.orcpt,
        "state": r.state,
        "attempts": r.attempts,
        "last_reply": reply,
        "remote": r.remote,
        "last_attempt": r.last_attempt,
        "delay_notified": r.delay_notified,
    }
    if r.mailbox_only:  # only when set: envelopes stay readable by earlier versions
        out["mailbox_only"] = True
    return out


def _recipient_from_dict(raw: Any, index: int) -> Recipient:
    r = _Reader(raw, f"recipients[{index}]")
    notify = r.get("notify", list)
    if not all(isinstance(k, str) for k in notify):
        raise EnvelopeError(f"recipients[{index}].notify: not a list of strings")
    reply_raw = r.get("last_reply", list, optional=True)
    rcpt = Recipient(
        address=r.get("address", str),
        notify=tuple(notify),
        orcpt=r.get("orcpt", str, optional=True),
        # Absent from envelopes written before it existed.
        mailbox_only=r.get("mailbox_only", bool) if "mailbox_only" in raw else False,
        state=r.get("state", str),
        attempts=r.get("attempts", int),
        last_reply=None if reply_raw is None else _reply_from_list(reply_raw, index),
        remote=r.get("remote", str),
        last_attempt=r.get("last_attempt", float, optional=True),
        delay_notified=r.get("delay_notified", bool),
    )
    r.finish()
    return rcpt


def _reply_from_list(raw: list, index: int) -> Reply:
    where = f"recipients[{index}].last_reply"
    if len(raw) != 3:
        raise EnvelopeError(f"{where}: expected [code, enhanced, text]")
    code, enhanced, text = raw
    if type(code) is not int or not isinstance(text, str) or not (
            enhanced is None or isinstance(enhanced, str)):
        raise EnvelopeError(f"{where}: wrong types")
    try:
        enh = None
        if enhanced is not None:
            a, b, c = (int(p) for p in enhanced.split("."))
            enh = (a, b, c)
        return Reply(code, enh, text)
    except ValueError as e:
        raise EnvelopeError(f"{where}: {e}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


class _Reader:
    """Typed access to one JSON object; :meth:`finish` rejects unknown keys."""

    def __init__(self, raw: Any, where: str) -> None:
        if not isinstance(raw, dict):
            raise EnvelopeError(f"{where}: expected an object")
        self.raw = raw
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, kind: type, optional: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            raise EnvelopeError(f"{self.where}.{key}: missing")
        value = self.raw[key]
        if value is None and optional:
            return None
        if kind is float and type(value) in (int, float):
            return float(value)
        # bool is a subclass of int: compare types exactly.
        if type(value) is not kind:
            raise EnvelopeError(f"{self.where}.{key}: expected {kind.__name__}, "
                                f"got {type(value).__name__}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise EnvelopeError(f"{self.where}: unknown key(s) {', '.join(unknown)}")
