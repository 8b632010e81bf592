# -*- test-case-name: tests.unit.test_address -*-
"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 6531).

Pure functions, no I/O.  :func:`split_argument` cuts ``FROM:<...>`` /
``TO:<...>`` into the path and the parameter text (:func:`split_path` does the
``<...>`` part), :func:`parse_path` turns the path into an :class:`Address` (or
``None`` for the null reverse-path ``<>``), :func:`parse_params` reads the ESMTP
parameters, and :func:`check_mail_params` checks SIZE, BODY and SMTPUTF8.
Errors are :class:`~mailserver.errors.ProtocolError` (:class:`AddressError` for
paths) carrying the catalog reply to send.

What is accepted, and how it is normalised:

* ``<>``: the null path, for MAIL only.
* A source route (``<@a.example,@b.example:user@d.example>``) is checked for
  syntax and then dropped, as RFC 5321 §4.1.1.3 and appendix C tell servers to
  do.  It never takes part in routing, so it cannot open a relay.
* The local part is a dot-string or a quoted string.  A quoted string is
  written in its simplest equivalent form (RFC 5322 §3.2.4: the quotes are
  not part of the value): when its content, quoted-pairs undone, is a
  dot-string, the quotes go (``"alice"`` and ``"\\alice"`` are ``alice``), so
  the directory sees one spelling of each address.  Content that needs the
  quotes (a space, ``@``, ``,``, a leading dot...) stays quoted, with only
  ``"`` and ``\\`` escaped (``"a\\ b"`` is ``"a b"``).  A quoted ``@`` thus
  stays inside the quoted local part, where policy sees it, and the domain is
  always what follows the last ``@`` outside the quotes.  The local part
  keeps its case.
* The domain is a dot-atom domain (letters, digits, hyphens; no leading,
  trailing or doubled dot, so ``user@example.com.`` is refused) or an address
  literal.  Domains are lower-cased; UTF-8 domains (SMTPUTF8 only) are kept as
  given, lower-cased, without IDNA conversion.  Address literals are checked
  with :mod:`ipaddress` and written in canonical form: ``[192.0.2.1]`` and
  ``[IPv6:2001:db8::1]``.  General address literals (``[tag:...]``) are refused.
* ``<postmaster>`` without a domain is accepted for RCPT only (RFC 5321
  §4.1.1.3) and gives ``Address("postmaster", "")``.
* Control characters (NUL, CR, LF, TAB, DEL...) anywhere give a syntax error.
  Non-ASCII without SMTPUTF8 gives ``553 5.6.7`` (``EIGHTBIT_ADDRESS``); bytes
  that were not valid UTF-8 (decoded with ``surrogateescape``) are a syntax
  error.
* Lengths are counted in UTF-8 octets: local part over 64 gives
  ``LOCAL_PART_TOO_LONG``, domain over 255 gives ``DOMAIN_TOO_LONG``, an ASCII
  domain label over 63 is a syntax error.
* Every error names the path it is about: ``5.1.7`` (``BAD_SENDER_SYNTAX``,
  ``SENDER_LOCAL_PART_TOO_LONG``, ``SENDER_DOMAIN_TOO_LONG``) for MAIL,
  ``5.1.3`` for RCPT; only ``EIGHTBIT_ADDRESS`` is shared (``5.6.7``, RFC 6531).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Optional

from mailserver import reply as R
from mailserver.errors import ProtocolError
from mailserver.reply import Reply

__all__ = [
    "Address",
    "AddressError",
    "check_known_params",
    "check_mail_params",
    "parse_params",
    "parse_path",
    "split_argument",
    "split_path",
]

BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
"""BODY= values accepted (BINARYMIME is not offered)."""


@dataclass(frozen=True)
class Address:
    """A mailbox: ``local`` part (quoted only when it must be, see the module
    notes) and lower-cased ``domain``.

    ``domain`` is ``""`` only for the special RCPT recipient ``<postmaster>``.
    """

    local: str
    domain: str

    def __str__(self) -> str:
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


class AddressError(ProtocolError):
    """A path or parameter the client sent is unacceptable; ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)


# --- character classes -----------------------------------------------------
# Everything from U+0080 up, except the surrogates that surrogateescape uses
# for bytes that were not UTF-8.
_UTF8 = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _UTF8
_DOT_STRING = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*")
_QUOTED_STRING = re.compile(
    f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_UTF8}]|\\\\[\\x20-\\x7e])*"'
)
_QUOTED_PAIR = re.compile(r"\\(.)")
_LETDIG = "A-Za-z0-9" + _UTF8
_LABEL = re.compile(f"[{_LETDIG}](?:[{_LETDIG}\\-]*[{_LETDIG}])?")
_CONTROLS = re.compile("[\x00-\x1f\x7f]")
_SURROGATES = re.compile("[\udc80-\udcff]")
_KEYWORD = re.compile("[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_UTF8}]+")
_DIGITS = re.compile("[0-9]+")

MAX_LABEL = 63


def split_path(arg: str) -> tuple[str, str]:
    """Split ``"<path> rest"`` into ``("<path>", " rest")``.

    The path ends at the first ``>`` outside a quoted string (a quoted local
    part may contain ``>``).  Raises ``ValueError`` when ``arg`` does not start
    with ``<`` or has no closing ``>``.
    """
    if not arg.startswith("<"):
        raise ValueError("path must start with '<'")
    quoted = False
    escaped = False
    for i in range(1, len(arg)):
        ch = arg[i]
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return arg[: i + 1], arg[i + 1 :]
    raise ValueError("path has no closing '>'")


def parse_path(
    text: str,
    *,
    smtputf8: bool,
    for_rcpt: bool = False,
    max_local: int = 64,
    max_domain: int = 255,
) -> Optional[Address]:
    """Parse ``<path>`` (angle brackets included) from MAIL or RCPT.

    Returns ``None`` for the null path ``<>`` (MAIL only).  ``for_rcpt``
    selects the error replies (``BAD_RCPT_SYNTAX``, ``LOCAL_PART_TOO_LONG``,
    ``DOMAIN_TOO_LONG``: 5.1.3, instead of the sender's ``BAD_SENDER_SYNTAX``,
    ``SENDER_LOCAL_PART_TOO_LONG``, ``SENDER_DOMAIN_TOO_LONG``: 5.1.7) and
    allows ``<postmaster>``.  Raises
    :class:`AddressError`.
    """
    syntax = R.BAD_RCPT_SYNTAX if for_rcpt else R.BAD_SENDER_SYNTAX
    if _CONTROLS.search(text):
        raise AddressError(syntax)
    if not smtputf8 and not text.isascii():
        raise AddressError(R.EIGHTBIT_ADDRESS)
    if _SURROGATES.search(text):
        raise AddressError(syntax)
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise AddressError(syntax)
    inner = text[1:-1]
    if not inner:
        if for_rcpt:
            raise AddressError(syntax)
        return None
    mailbox = _drop_source_route(inner, syntax)
    if for_rcpt and mailbox.lower() == "postmaster":
        return Address("postmaster", "")
    local, at, domain = mailbox.rpartition("@")
    if not at or not _is_local_part(local):
        raise AddressError(syntax)
    domain = _normalise_domain(domain, syntax)
    if len(local.encode("utf-8")) > max_local:
        raise AddressError(R.LOCAL_PART_TOO_LONG if for_rcpt else R.SENDER_LOCAL_PART_TOO_LONG)
    if len(domain.encode("utf-8")) > max_domain:
        raise AddressError(R.DOMAIN_TOO_LONG if for_rcpt else R.SENDER_DOMAIN_TOO_LONG)
    return Address(_normalise_local_part(local), domain)


def parse_params(text: str) -> dict[str, Optional[str]]:
    """Parse ESMTP parameters: ``KEY=VALUE`` or ``KEY``, separated by spaces.

    Keys are upper-cased; a key without ``=`` maps to ``None``.  An empty
    value, a bad keyword, a control character or a repeated key raises
    ``ProtocolError(BAD_ARGUMENTS)``.
    """
    params: dict[str, Optional[str]] = {}
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise ProtocolError(R.BAD_ARGUMENTS)
        key = key.upper()
        if key in params:
            raise ProtocolError(R.BAD_ARGUMENTS)
        params[key] = value if eq else None
    return params


def split_argument(arg: str, keyword: str, syntax: Reply) -> tuple[str, str]:
    """Split ``FROM:<path> params`` (or ``TO:...``) into path and parameter text.

    Spaces after the colon are tolerated (``MAIL FROM: <a@b>``), as Postfix
    does.  A missing keyword raises ``ProtocolError(BAD_ARGUMENTS)``; a
    missing or unterminated path, or text glued to its ``>``, raises
    ``AddressError(syntax)``.
    """
    if arg[: len(keyword)].upper() != keyword.upper():
        raise ProtocolError(R.BAD_ARGUMENTS)
    try:
        path, rest = split_path(arg[len(keyword) :].lstrip(" "))
    except ValueError:
        raise AddressError(syntax) from None
    if rest and not rest.startswith(" "):
        raise AddressError(syntax)
    return path, rest


def check_known_params(params: dict[str, Optional[str]], allowed: frozenset[str]) -> None:
    """Refuse any parameter not in ``allowed`` with ``PARAM_NOT_RECOGNIZED``."""
    for key in params:
        if key not in allowed:
            raise ProtocolError(R.PARAM_NOT_RECOGNIZED)


def check_mail_params(
    params: dict[str, Optional[str]], allowed: frozenset[str], max_size: int
) -> tuple[Optional[int], Optional[str]]:
    """Check MAIL parameters; return the declared SIZE and the BODY type.

    ``max_size`` of 0 means no limit.  SIZE must be digits and within the
    limit (``MESSAGE_TOO_BIG``), BODY must be 7BIT or 8BITMIME
    (``BODY_NOT_SUPPORTED``), SMTPUTF8 takes no value.
    """
    check_known_params(params, allowed)
    if params.get("SMTPUTF8") is not None:
        raise ProtocolError(R.BAD_ARGUMENTS)
    size = None
    if "SIZE" in params:
        value = params["SIZE"]
        if value is None or not _DIGITS.fullmatch(value):
            raise ProtocolError(R.BAD_ARGUMENTS)
        size = int(value)
        if max_size and size > max_size:
            raise ProtocolError(R.MESSAGE_TOO_BIG)
    body = None
    if "BODY" in params:
        body = (params["BODY"] or "").upper()
        if body not in BODY_TYPES:
            raise ProtocolError(R.BODY_NOT_SUPPORTED)
    return size, body


def _drop_source_route(inner: str, syntax: Reply) -> str:
    """Check and remove an ``@a,@b:`` source route; return the mailbox."""
    if not inner.startswith("@"):
        return inner
    route, colon, mailbox = inner.partition(":")
    if not colon:
        raise AddressError(syntax)
    for hop in route.split(","):
        if not hop.startswith("@"):
            raise AddressError(syntax)
        _normalise_domain(hop[1:], syntax)
    return mailbox


def _is_local_part(local: str) -> bool:
    return bool(_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local))


def _normalise_local_part(local: str) -> str:
    """A valid local part in its simplest equivalent form: a quoted string
    whose content is a dot-string loses its quotes; any other keeps them,
    with only the quoted-pairs it needs (``\\"`` and ``\\\\``)."""
    if not local.startswith('"'):
        return local
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    if _DOT_STRING.fullmatch(content):
        return content
    return '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _normalise_domain(domain: str, syntax: Reply) -> str:
    """Validate a domain or address literal and return its normal form."""
    if domain.startswith("["):
        return _address_literal(domain, syntax)
    labels = domain.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AddressError(syntax)
        if label.isascii() and len(label) > MAX_LABEL:
            raise AddressError(syntax)
    return domain.lower()


def _address_literal(literal: str, syntax: Reply) -> str:
    """``[192.0.2.1]`` or ``[IPv6:...]`` in canonical form."""
    if not literal.endswith("]"):
        raise AddressError(syntax)
    content = literal[1:-1]
    try:
        if content[:5].lower() == "ipv6:":
            address6 = ipaddress.IPv6Address(content[5:])
            if address6.scope_id is not None:
                raise ValueError("zone index in address literal")
            return f"[IPv6:{address6.compressed}]"
        return f"[{ipaddress.IPv4Address(content)}]"
    except ValueError:
        raise AddressError(syntax) from None


_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
NOTIFY_VALUES = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def check_dsn_mail_params(params: dict[str, Optional[str]]) -> None:
    """RFC 3461 RET (FULL or HDRS) and ENVID (xtext, at most 100 characters)."""
    if "RET" in params and (params["RET"] or "").upper() not in ("FULL", "HDRS"):
        raise ProtocolError(R.BAD_ARGUMENTS)
    if "ENVID" in params:
        envid = params["ENVID"] or ""
        if not envid or len(envid) > 100 or not _XTEXT.fullmatch(envid):
            raise ProtocolError(R.BAD_ARGUMENTS)


def check_dsn_rcpt_params(params: dict[str, Optional[str]]) -> None:
    """RFC 3461 NOTIFY (NEVER, or any of SUCCESS/FAILURE/DELAY) and ORCPT
    (``addr-type;xtext``)."""
    if "NOTIFY" in params:
        values = [v.strip().upper() for v in (params["NOTIFY"] or "").split(",")]
        if values != ["NEVER"] and not (values and set(values) <= NOTIFY_VALUES
                                        and len(set(values)) == len(values)):
            raise ProtocolError(R.BAD_ARGUMENTS)
    if "ORCPT" in params:
        kind, sep, value = (params["ORCPT"] or "").partition(";")
        if not sep or not kind or not value or len(value) > 500 \
                or not _XTEXT.fullmatch(value):
            raise ProtocolError(R.BAD_ARGUMENTS)
