# -*- test-case-name: tests.unit.test_maildrop -*-
"""The POP3 maildrop: one session's snapshot of one user's maildir.

:meth:`Maildrop.open` locks the maildir, then lists ``new/`` and ``cur/``
once; that listing is the session's drop (RFC 1939 numbers messages for the
session, so mail delivered afterwards waits for the next login).  DELE only
marks; :meth:`Maildrop.update` applies the marks at QUIT.  Opening and
updating block on file I/O, so the Twisted side calls them from a worker
thread; :meth:`Maildrop.read_small` (a bounded read of one small file) and
:meth:`Maildrop.needs_io` are cheap enough for its event loop.  No Twisted
code is imported.  Dovecot is the reference for maildir behaviour,
so that a mailbox can be served by both, or moved from one to the other.

Decisions:

* **Message indexes are 0-based** positions in :attr:`Maildrop.messages`;
  the protocol layer turns them into POP3's 1-based numbers.
* **Listing.**  ``os.scandir`` on directory descriptors opened with
  ``O_NOFOLLOW``; only regular files count (``follow_symlinks=False``: a
  symbolic link is skipped, never followed), and names starting with ``.``
  are ignored.  ``new/`` is read before ``cur/``, and a message is known by
  its *base name* (the name up to the first ``:``, as in Dovecot's
  ``maildir_filename_base_cmp``); when a base turns up in both, because
  another reader moved it between the two reads, the ``cur/`` entry wins.
  A ``new/`` or ``cur/`` that is a symbolic link is refused with
  ``PermissionError``; a missing one is empty.  A missing maildir is an
  empty drop: nothing is created, nothing is locked.
* **Order** is by delivery time, the leading seconds and the microseconds
  after ``M`` in the first dot-separated part (Dovecot's
  ``maildir_filename_sort_cmp``), then by base name.  Names that do not
  start with digits come last.
* **Sizes** are what RETR sends: CRLF line ends.  The ``,W=<n>`` field of
  the name is trusted when present (our store and Dovecot write it), so a
  large mailbox opens without reading a single message; otherwise the file
  is read in chunks and its length plus the number of bare LFs is used.
  A file that vanishes or turns into a link meanwhile is left out; any
  other read error fails :meth:`Maildrop.open` (the caller answers
  ``-ERR [SYS/TEMP]``) rather than hiding mail.
* **UIDLs** stay the same across sessions and across renames (new/ to
  cur/, flag changes), since they come from the unique part of the name:
  the text up to the first ``,`` or ``:`` (our ``,S=``/``,W=`` fields are
  fixed at delivery, but other writers may add them later).  RFC 1939
  allows 1 to 70 characters in 0x21-0x7E; anything else (a long host name,
  a space) is replaced by the first 32 hex digits of the SHA-256 of the
  unique part.  UIDLs must be unique within a listing: when two messages
  would share one (a broken maildir), the later one gets a hash of its base
  name and a counter instead, which may change once the other one is gone.
* **dovecot-uidlist.**  Where the maildir holds Dovecot's UID list, a
  listed message keeps the UIDL Dovecot gave it
  (:mod:`mailserver.store.dovecot_uidlist` reads the file).
* **Lock.**  ``flock(LOCK_EX|LOCK_NB)`` on ``<maildir>/.mailserver-pop3.lock``
  (created 0600, ``O_NOFOLLOW``, ``O_CLOEXEC``).  The kernel drops it when
  the process dies, so a crash leaves no stale lock; it works across
  processes and, being per open file description, between two sessions of
  one process.  The file is never removed: unlinking a lock file lets two
  holders lock two different inodes.  A drop collected without
  :meth:`Maildrop.close` releases its lock too (``weakref.finalize``).  Deliveries do not take it; maildir
  needs no lock for them.
* **Renames by others.**  Another reader (Dovecot IMAP) may move a message
  to ``cur/`` or change its flags during the session.  When a file is not
  where the snapshot saw it, both directories are listed again and every
  message is looked up by its base name (then by its unique part); a
  message found nowhere has been expunged: ``FileNotFoundError``, for the
  rest of the session (a client asking again costs no new listing).
* **UPDATE** unlinks the deleted messages (already gone is fine), moves
  every other message still in ``new/`` to ``cur/<base>:2,`` (Dovecot's
  mark for "a client has seen it"), and gives the retrieved ones the ``S``
  flag, merged into the existing flags in ASCII order (``:2,F`` becomes
  ``:2,FS``; a second flag set after ``,`` is kept as Dovecot keeps it).
  The base name, hence the UIDL, never changes.  Only the messages that
  can change are looked at (deleted, retrieved without ``S``, in ``new/``:
  kept as sets from the snapshot on), so a QUIT after reading a mailbox
  that is already in ``cur/`` and seen costs nothing per message, and
  :meth:`Maildrop.needs_io` says so without a system call.  Each touched directory is
  fsynced once, at the end.  A failure on one file does not stop the
  others; the failures are raised together as :class:`MaildropUpdateError`
  afterwards.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import BinaryIO, Collection, Dict, List, Optional, Tuple

from zope.interface import implementer

from mailserver.durable import O_CLOEXEC, O_DIRECTORY
from mailserver.store.dovecot_uidlist import UIDLIST_NAME, read_uidlist
from mailserver.store.interfaces import IMaildrop
from mailserver.store.maildrop_files import (
    LOCK_NAME,
    SUBDIRS,
    Location,
    MaildropInUse,
    NotRegular,
    base_name,
    close_fds,
    lock,
    open_regular,
    open_subdir,
    read_small,
    scan,
)

__all__ = [
    "LOCK_NAME",
    "UIDLIST_NAME",
    "DropMessage",
    "Maildrop",
    "MaildropInUse",
    "MaildropUpdateError",
]

_CHUNK_SIZE = 64 * 1024

# Leading seconds, then the digits after the first "M" of the next part.
_TIME_RE = re.compile(r"([0-9]+)(?:\.[^.:M]*M([0-9]*))?")
_VSIZE_RE = re.compile(r",W=([0-9]{1,19})(?:,|$)")
_UIDL_RE = re.compile(r"[\x21-\x7e]{1,70}")


class MaildropUpdateError(OSError):
    """Some changes of :meth:`Maildrop.update` failed.

    ``failures`` lists ``(path, error)`` pairs, path relative to the
    maildir; the other changes were made.  The caller answers
    ``-ERR [SYS/TEMP]``.
    """

    def __init__(self, failures: List[Tuple[str, OSError]]) -> None:
        self.failures = tuple(failures)
        first_path, first = self.failures[0]
        super().__init__(
            first.errno,
            f"{len(self.failures)} maildrop change(s) failed, first: "
            f"{first_path}: {first.strerror or first}",
        )


@dataclass(frozen=True)
class DropMessage:
    """One message of a session's snapshot."""

    #: The file name at snapshot time.
    name: str
    #: ``"new"`` or ``"cur"``, at snapshot time.
    subdir: str
    #: The UIDL: 1-70 characters in 0x21-0x7E, unique in the drop.
    uid: str
    #: Octets RETR sends, with CRLF line ends.
    size: int


# --- names ------------------------------------------------------------


_base = base_name


def _unique(name: str) -> str:
    """The name up to the first ``,`` or ``:``."""
    return name.partition(":")[0].partition(",")[0]


def _hashed(text: str) -> str:
    return hashlib.sha256(os.fsencode(text)).hexdigest()[:32]


def _valid_uidl(text: str) -> bool:
    return _UIDL_RE.fullmatch(text) is not None


def _order_key(base: str) -> tuple:
    match = _TIME_RE.match(base)
    if match is None:
        return (1, 0, 0, base)
    secs, usecs = match.groups()
    return (0, int(secs), int(usecs) if usecs else 0, base)


def _vsize(base: str) -> Optional[int]:
    if ",W=" not in base:
        return None
    match = _VSIZE_RE.search(base)
    return int(match.group(1)) if match else None


def _with_flags(name: str, seen: bool) -> str:
    """``name`` with a ``:2,`` info part, plus the S flag when ``seen``.

    Like Dovecot's ``maildir_filename_flags_set``: old flags are kept when
    the info part is ``2,...``, flags stay in ASCII order, and a further
    flag set after ``,`` is kept as it is.  Other info parts are dropped.
    """
    base, sep, info = name.partition(":")
    flags, rest = "", ""
    if sep and info.startswith("2,"):
        flags, comma, tail = info[2:].partition(",")
        rest = comma + tail
    if seen:
        flags = "".join(sorted(set(flags) | {"S"}))
    return f"{base}:2,{flags}{rest}"


def _seen_already(name: str) -> bool:
    """Giving ``name`` the S flag would not change it (the common
    ``...:2,S`` is recognised without building the new name)."""
    if name.endswith(":2,S") and name.find(":") == len(name) - 4:
        return True
    return _with_flags(name, True) == name


def _wire_size(fileobj: BinaryIO) -> int:
    """Length with every bare LF counted as CRLF, read in chunks."""
    size = 0
    after_cr = False
    while True:
        chunk = fileobj.read(_CHUNK_SIZE)
        if not chunk:
            return size
        bare = chunk.count(b"\n") - chunk.count(b"\r\n")
        if after_cr and chunk.startswith(b"\n"):
            bare -= 1
        size += len(chunk) + bare
        after_cr = chunk.endswith(b"\r")


# --- the maildrop ---------------------------------------------------------


@implementer(IMaildrop)
class Maildrop:
    """A snapshot of one maildir for one POP3 session.

    Made by :meth:`open`; close it (or use it as a context manager) to
    release the lock.  Not meant to be shared between sessions; calls are
    serialised by an internal lock so that worker threads may take turns.
    """

    def __init__(
        self,
        maildir: str,
        *,
        lock_fd: Optional[int] = None,
        dir_fds: Optional[Dict[str, int]] = None,
        uidlist: Optional[Dict[str, str]] = None,
        uidlist_problem: Optional[str] = None,
    ) -> None:
        self.maildir = maildir
        self.uidlist_problem = uidlist_problem
        self.messages: List[DropMessage] = []
        self._dir_fds: Dict[str, int] = dict(dir_fds or {})
        self._uidlist = uidlist or {}
        self._bases: List[str] = []
        self._where: List[Optional[Location]] = []
        # What UPDATE may have to do, kept up to date so that QUIT need not
        # look at every message: indexes last seen in new/ (to move), and
        # those whose name lacks the S flag (to flag if retrieved).
        self._in_new: set = set()
        self._unseen: set = set()
        self._mutex = threading.Lock()
        self._closed = False
        fds = list(self._dir_fds.values())
        if lock_fd is not None:
            fds.append(lock_fd)
        # Releases the lock even if a caller forgets close().
        self._finalizer = weakref.finalize(self, close_fds, fds)

    # --- opening ---------------------------------------------------------

    @classmethod
    def open(cls, maildir: str, *, lock_timeout: float = 0.0) -> "Maildrop":
        """Lock ``maildir`` and take the snapshot.

        Raises :class:`MaildropInUse` when another session holds the lock
        after ``lock_timeout`` seconds (0: at once), ``PermissionError``
        when ``new/``, ``cur/`` or the lock file is a symbolic link, and
        ``OSError`` for other file-system failures.  A missing maildir
        gives an empty drop, and nothing is created.
        """
        try:
            maildir_fd = os.open(maildir, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        except FileNotFoundError:
            return cls(maildir)
        try:
            lock_fd = lock(maildir_fd, maildir, lock_timeout)
            dir_fds: Dict[str, int] = {}
            try:
                for sub in SUBDIRS:
                    fd = open_subdir(maildir_fd, maildir, sub)
                    if fd is not None:
                        dir_fds[sub] = fd
                uidlist, problem = read_uidlist(maildir_fd)
            except BaseException:
                close_fds([lock_fd, *dir_fds.values()])
                raise
        finally:
            os.close(maildir_fd)
        drop = cls(
            maildir, lock_fd=lock_fd, dir_fds=dir_fds, uidlist=uidlist, uidlist_problem=problem
        )
        try:
            drop._snapshot()
        except BaseException:
            drop.close()
            raise
        return drop

    def _snapshot(self) -> None:
        found = scan(self._dir_fds)
        entries = []
        for base in sorted(found, key=_order_key):
            sub, name = found[base]
            size = _vsize(base)
            if size is None:
                size = self._computed_size(sub, name)
                if size is None:
                    continue  # gone or replaced since the listing
            entries.append((base, sub, name, size))
        taken = set()
        for base, sub, name, size in entries:
            uid = self._uidl(base, taken)
            taken.add(uid)
            self.messages.append(DropMessage(name=name, subdir=sub, uid=uid, size=size))
            if sub == "new":
                self._in_new.add(len(self._where))
            if not _seen_already(name):
                self._unseen.add(len(self._where))
            self._bases.append(base)
            self._where.append((sub, name))

    def _computed_size(self, sub: str, name: str) -> Optional[int]:
        try:
            fileobj = open_regular(name, self._dir_fds[sub], self._path(sub, name))
        except (FileNotFoundError, NotRegular):
            return None
        with fileobj:
            return _wire_size(fileobj)

    def _uidl(self, base: str, taken: set) -> str:
        uid = self._uidlist.get(base)
        if uid is None:
            uid = _unique(base)
        if not _valid_uidl(uid):
            uid = _hashed(uid)
        counter = 0
        while uid in taken:
            counter += 1
            uid = _hashed(f"{base}\0{counter}")
        return uid

    def _path(self, sub: str, name: str) -> str:
        return os.path.join(self.maildir, sub, name)

    # --- finding messages again ------------------------------------------

    def _check(self, index: int) -> None:
        if self._closed:
            raise ValueError("maildrop is closed")
        if not 0 <= index < len(self.messages):
            raise IndexError(f"no message {index} in this maildrop")

    def _rescan(self) -> None:
        """Find every message again by its base name, then its unique part;
        a message found nowhere is marked gone (None)."""
        found = scan(self._dir_fds)
        ours = set(self._bases)
        by_unique: Dict[str, List[str]] = {}
        for base in found:
            if base not in ours:
                by_unique.setdefault(_unique(base), []).append(base)
        for i, base in enumerate(self._bases):
            if self._where[i] is None:
                continue
            location = found.get(base)
            if location is None:
                candidates = sorted(by_unique.get(_unique(base), ()))
                if candidates:
                    new_base = candidates[0]
                    by_unique[_unique(base)].remove(new_base)
                    self._bases[i] = new_base
                    location = found[new_base]
            self._where[i] = location
        self._in_new = {i for i, loc in enumerate(self._where) if loc and loc[0] == "new"}
        self._unseen = {i for i, loc in enumerate(self._where)
                        if loc and not _seen_already(loc[1])}

    def read_small(self, index: int, limit: int) -> Optional[bytes]:
        """The message's whole content when its file is where it was last
        seen and holds at most ``limit`` octets, else None (the caller uses
        :meth:`open_message`, which finds moved files and reports errors).

        An ``openat``, an ``fstat``, one ``read`` of at most ``limit``
        octets and a ``close``, no listing: bounded, and cheap enough for
        the caller's event loop when the file is in the page cache.
        """
        with self._mutex:
            self._check(index)
            location = self._where[index]
            if location is None:
                return None
            sub, name = location
            return read_small(name, self._dir_fds[sub], limit)

    def open_message(self, index: int) -> BinaryIO:
        """The message file, opened read-only (``O_NOFOLLOW``).

        Follows the message when another reader has moved it to ``cur/`` or
        changed its flags; raises ``FileNotFoundError`` when it has been
        expunged, ``PermissionError`` when a link or special file took its
        place, ``IndexError`` for a bad index.
        """
        with self._mutex:
            self._check(index)
            for attempt in range(3):
                location = self._where[index]
                if location is None:
                    break
                sub, name = location
                try:
                    return open_regular(name, self._dir_fds[sub], self._path(sub, name))
                except FileNotFoundError:
                    if attempt < 2:
                        self._rescan()
            message = self.messages[index]
            raise FileNotFoundError(
                errno.ENOENT, "message expunged by another session",
                self._path(message.subdir, message.name),
            )

    # --- UPDATE ---------------------------------------------------------

    def update(self, deleted: Collection[int], retrieved: Collection[int]) -> None:
        """Apply the session's changes (the POP3 UPDATE state).

        Deleted messages are unlinked (already gone is fine).  Every other
        message still in ``new/`` moves to ``cur/<base>:2,``; retrieved
        ones get the ``S`` flag, in ``new/`` or ``cur/``.  ``new/`` and
        ``cur/`` are fsynced once each at the end if they changed.  Failures
        do not stop the other changes; they are raised together as
        :class:`MaildropUpdateError`.
        """
        with self._mutex:
            if self._closed:
                raise ValueError("maildrop is closed")
            deleted = set(deleted)
            seen = set(retrieved)
            count = len(self.messages)
            for index in deleted | seen:
                if not 0 <= index < count:
                    self._check(index)  # raises IndexError
            failures: List[Tuple[str, OSError]] = []
            touched: set = set()
            missing = []
            # Only these can change: a message in cur/ that is neither
            # deleted nor retrieved is left as it is.
            for index in sorted(deleted | (seen & self._unseen) | self._in_new):
                if not self._apply(index, index in deleted, index in seen, touched, failures):
                    missing.append(index)
            if missing:
                self._rescan()
                for index in missing:
                    if not self._apply(index, index in deleted, index in seen, touched, failures):
                        self._where[index] = None  # expunged meanwhile: nothing to do
            for sub in SUBDIRS:
                if sub in touched:
                    try:
                        os.fsync(self._dir_fds[sub])
                    except OSError as exc:
                        failures.append((sub, exc))
            if failures:
                raise MaildropUpdateError(failures)

    def needs_io(self, deleted: Collection[int], retrieved: Collection[int]) -> bool:
        """Whether :meth:`update` would touch the file system: something to
        delete, a message still in ``new/``, or a retrieved one without the
        ``S`` flag.  Pure bookkeeping, no system call: when False, ``update``
        is cheap enough to run anywhere."""
        return bool(deleted or self._in_new or not self._unseen.isdisjoint(retrieved))

    def _apply(
        self,
        index: int,
        delete: bool,
        seen: bool,
        touched: set,
        failures: List[Tuple[str, OSError]],
    ) -> bool:
        """Change one message; False when its file was not where expected."""
        location = self._where[index]
        if location is None:
            return True
        sub, name = location
        if delete:
            try:
                os.unlink(name, dir_fd=self._dir_fds[sub])
            except FileNotFoundError:
                return False
            except OSError as exc:
                failures.append((f"{sub}/{name}", exc))
                return True
            touched.add(sub)
            self._where[index] = None
            self._in_new.discard(index)
            self._unseen.discard(index)
            return True
        if sub == "cur" and (not seen or _seen_already(name)):
            return True
        target = _with_flags(name, seen)
        if sub == "cur" and target == name:
            return True
        cur_fd = self._dir_fds.get("cur")
        if cur_fd is None:
            failures.append(
                ("cur", FileNotFoundError(errno.ENOENT, "maildir has no cur/ directory"))
            )
            return True
        try:
            os.rename(name, target, src_dir_fd=self._dir_fds[sub], dst_dir_fd=cur_fd)
        except FileNotFoundError as exc:
            if self._exists(sub, name):
                failures.append((f"{sub}/{name}", exc))  # cur/ itself went away
                return True
            return False
        except OSError as exc:
            failures.append((f"{sub}/{name}", exc))
            return True
        touched.update((sub, "cur"))
        self._where[index] = ("cur", target)
        self._in_new.discard(index)
        if seen:
            self._unseen.discard(index)
        return True

    def _exists(self, sub: str, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self._dir_fds[sub], follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    # --- closing ----------------------------------------------------------

    def close(self) -> None:
        """Release the lock and the directories; safe to call again."""
        with self._mutex:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "Maildrop":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
