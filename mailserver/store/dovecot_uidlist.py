# -*- test-case-name: tests.unit.test_maildrop -*-
"""Dovecot's ``dovecot-uidlist``, read so that POP3 clients moving over
from Dovecot keep their UIDLs (see :mod:`mailserver.store.maildrop`).

Decisions:

* **dovecot-uidlist.**  Users moving from Dovecot must not download their
  whole mailbox again, so when the maildir holds Dovecot's ``dovecot-uidlist``
  (version 3: header ``3 V<uidvalidity> N<nextuid> ...``, records
  ``<uid> [<key><value> ...] :<filename>``; version 1: ``1 <uidvalidity>
  <nextuid>`` then ``<uid> <filename>``) a listed message gets the UIDL
  Dovecot gave it: the saved ``P`` field, else Dovecot's default
  ``pop3_uidl_format`` ``%08Xu%08Xv`` (UID, then UIDVALIDITY, each as 8
  upper-case hex digits).  Records are matched by base name.  The file is
  read once, with Dovecot's own validity rules (ordered UIDs, non-zero
  UIDVALIDITY and next UID, no ``/`` in names), and never written; a file
  that breaks them is ignored as a whole and the reason is left in
  :attr:`~mailserver.store.maildrop.Maildrop.uidlist_problem` for the caller to log.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from typing import Dict, Iterable, Optional, Tuple

from mailserver.durable import O_CLOEXEC
from mailserver.store.maildrop_files import base_name

#: Dovecot's UID list in the maildir's top directory.
UIDLIST_NAME = "dovecot-uidlist"

# Longest dovecot-uidlist line we read; real ones are a few hundred bytes.
_MAX_UIDLIST_LINE = 64 * 1024
_UINT32_MAX = 0xFFFFFFFF
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIGITS_RE = re.compile(r"[0-9]{1,10}")


class _UidlistError(Exception):
    pass


def _uint(text: str, what: str) -> int:
    if _DIGITS_RE.fullmatch(text) is None or int(text) > _UINT32_MAX:
        raise _UidlistError(f"invalid {what}: {text[:40]!r}")
    return int(text)


def parse_uidlist(lines: Iterable[str]) -> Dict[str, str]:
    """Map base name -> Dovecot's POP3 UIDL; raises _UidlistError."""
    lines = iter(lines)
    header = next(lines, None)
    if header is None:
        raise _UidlistError("empty file")
    if len(header) < 2 or not header[0].isdigit() or header[1] != " ":
        raise _UidlistError("invalid version number")
    version = header[0]
    if version == "1":
        fields = header[2:].split()
        if len(fields) != 2:
            raise _UidlistError("corrupted version 1 header")
        validity, next_uid = _uint(fields[0], "uidvalidity"), _uint(fields[1], "next uid")
    elif version == "3":
        values = {}
        for field in header[2:].split(" "):
            if field:
                values[field[0]] = field[1:]
        validity = _uint(values.get("V", ""), "uidvalidity")
        next_uid = _uint(values.get("N", ""), "next uid")
    else:
        raise _UidlistError(f"unsupported version {version}")
    if validity == 0 or next_uid == 0:
        raise _UidlistError(f"broken header (uidvalidity={validity}, next uid={next_uid})")

    uidls: Dict[str, str] = {}
    previous = 0
    for number, line in enumerate(lines, start=2):
        uid_text, space, rest = line.partition(" ")
        if not space or _DIGITS_RE.fullmatch(uid_text) is None:
            raise _UidlistError(f"line {number}: invalid data")
        uid = int(uid_text)
        if uid == 0 or uid >= _UINT32_MAX:
            raise _UidlistError(f"line {number}: invalid uid {uid}")
        if uid <= previous:
            raise _UidlistError(f"line {number}: uids not ordered ({uid} <= {previous})")
        if version == "1" and uid >= next_uid:
            raise _UidlistError(f"line {number}: uid {uid} not below next uid {next_uid}")
        previous = uid
        rest = rest.lstrip(" ")
        pop3_uidl = None
        if version == "3":
            # Extension fields "<key><value>" up to " :<filename>".
            while rest and not rest.startswith(":"):
                field, _, rest = rest.partition(" ")
                rest = rest.lstrip(" ")
                if field.startswith("P") and len(field) > 1:
                    pop3_uidl = field[1:]
            if not rest.startswith(":"):
                raise _UidlistError(f"line {number}: no file name")
            rest = rest[1:]
        filename = rest
        if not filename or "/" in filename:
            raise _UidlistError(f"line {number}: broken file name")
        # A later record for the same file replaces an earlier one (Dovecot).
        uidls[base_name(filename)] = pop3_uidl or f"{uid:08X}{validity:08X}"
    return uidls


def read_uidlist(maildir_fd: int) -> Tuple[Dict[str, str], Optional[str]]:
    """Dovecot's UIDLs by base name, and the reason the file was ignored."""
    try:
        fd = os.open(
            UIDLIST_NAME, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | O_CLOEXEC, dir_fd=maildir_fd
        )
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return {}, f"{UIDLIST_NAME} is a symbolic link; ignored"
        return {}, f"{UIDLIST_NAME}: cannot open: {exc.strerror or exc}"
    stream = io.open(fd, "rb")
    try:
        with stream:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}, f"{UIDLIST_NAME} is not a regular file; ignored"

            def lines():
                while True:
                    raw = stream.readline(_MAX_UIDLIST_LINE + 1)
                    if not raw:
                        return
                    if len(raw) > _MAX_UIDLIST_LINE:
                        raise _UidlistError("line too long")
                    yield os.fsdecode(raw.rstrip(b"\n"))

            return parse_uidlist(lines()), None
    except _UidlistError as exc:
        return {}, f"{UIDLIST_NAME} is malformed, ignored: {exc}"
    except OSError as exc:
        return {}, f"{UIDLIST_NAME}: cannot read: {exc.strerror or exc}"
