# -*- test-case-name: tests.unit.test_maildir -*-
"""Durable delivery into maildirs.

Layout.  Every user has one maildir under the store root, by default
``<root>/<domain>/<localpart>``, holding ``tmp/``, ``new/`` and ``cur/``
(created on first delivery, mode 0700).  The path is derived from the mailbox
address and cannot leave the root: see :func:`encode_component`.

The transaction (D. J. Bernstein's maildir protocol, with the fsyncs his
description leaves implicit):

1. pick a name no other process or host will ever pick (:meth:`MaildirStore.unique_name`);
2. create ``tmp/<name>`` with ``O_CREAT|O_EXCL``, mode 0600, and write the
   message into it: ``Return-Path``, ``Delivered-To``, the caller's prefix
   headers, then the content, with CRLF turned into LF on the fly and the
   sender's own ``Return-Path:`` fields left out of its header section (a
   ``Delivered-To:`` there naming this mailbox is a loop: :class:`MailLoop`,
   554 5.4.6; see ``docs/decisions.rst``);
3. flush and fsync the file;
4. hard-link it to ``new/<name>,S=<size>,W=<vsize>`` (rename where the
   filesystem has no hard links) and unlink the tmp name;
5. fsync ``new/``; only now is the message delivered.  Deliveries into one
   maildir at the same time share that fsync: one that starts after a link
   is complete makes it durable, so a delivery whose link an fsync begun
   later has covered does not repeat it (:class:`_DirSyncs`).

A crash before step 4 leaves a file in ``tmp/`` that no reader looks at, and
:func:`cleanup_tmp` removes it after 36 hours (the server runs it over every
maildir, a batch per minute: :mod:`mailserver.store.tmpclean`).  A failure before step 4
removes the tmp file and re-raises; ``OSError`` keeps its ``errno`` so that
``ENOSPC``/``EDQUOT`` become a 452 through :func:`mailserver.errors.to_reply`.
A failure of the final directory fsync is re-raised too, but the file in
``new/`` is left where it is: the client will retry and may cause a
duplicate, which the design accepts, whereas removing it could lose mail.

Symbolic links.  :meth:`MaildirStore.maildir_for` refuses a path whose links
resolve outside the root (550, also checked at RCPT time).  Delivery itself
never follows a link below the root: the directories are opened component
by component from the root's descriptor with ``O_NOFOLLOW|O_DIRECTORY``
(created with ``mkdir`` relative to their parent's descriptor when missing),
the message is created through the ``tmp/`` descriptor (``O_EXCL|O_NOFOLLOW``),
linked or renamed into ``new/`` through the two descriptors, and ``new/``'s
descriptor is fsynced.  A domain, user, ``tmp/``, ``new/`` or ``cur/``
directory that is a symbolic link raises :class:`MaildirLinkRefused`, a
``451 4.3.0`` temporary failure that the delivery layer logs: the message
waits in the queue, it is neither written through the link nor bounced.
The root itself may be a link (the administrator's choice).

Names follow Dovecot: ``<secs>.M<usecs>P<pid>Q<counter>R<random>.<host>``,
with ``,S=`` (bytes on disk) and ``,W=`` (size with CRLF line endings, what
POP3 reports) appended in ``new/``.  Hostname characters that would break
the name are written as octal escapes (``/`` -> ``\\057``, ``:`` -> ``\\072``,
and ``,`` -> ``\\054`` so that the size fields parse).

Everything here blocks; the Twisted side calls it from a worker thread.
"""

from __future__ import annotations

import errno
import hashlib
import io
import itertools
import os
import socket
import stat
import threading
import time
from typing import Callable, List, Optional

from zope.interface import implementer

from mailserver.durable import O_CLOEXEC, O_DIRECTORY, fsync_dir
from mailserver.faults import crash_point
from mailserver.directory.interfaces import Mailbox
from mailserver.errors import PermFailure, TempFailure
from mailserver import reply as catalog
from mailserver.store.interfaces import IDelivery, IMailStore

__all__ = [
    "MAILBOX_UNAVAILABLE",
    "TMP_MAX_AGE",
    "MAILDIR_LINK",
    "MAILDIR_LOOP",
    "MailLoop",
    "MaildirDelivery",
    "MaildirLinkRefused",
    "MaildirStore",
    "UnsafeMailboxPath",
    "cleanup_tmp",
    "encode_component",
]

#: The reply for a mailbox whose path cannot be computed safely.
MAILBOX_UNAVAILABLE = catalog.MAILBOX_UNAVAILABLE

#: The reply when a maildir path component is a symbolic link: temporary, so
#: the message waits in the queue while the administrator looks (never lost,
#: never bounced for what is a local configuration fault or an attack).
MAILDIR_LINK = catalog.R(451, "4.3.0", "Mailbox temporarily unavailable")

#: The reply when the message already says it was delivered to this mailbox
#: (Postfix local(8): "mail forwarding loop for ...").
MAILDIR_LOOP = catalog.R(554, "5.4.6", "Mail forwarding loop: already delivered to this mailbox")

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | _O_NOFOLLOW | O_CLOEXEC

#: Age after which an abandoned ``tmp/`` file may be removed (DJB: 36 hours).
TMP_MAX_AGE = 36 * 3600

DEFAULT_CHUNK_SIZE = 64 * 1024

# Longest encoded path component we produce; NAME_MAX is 255 on the usual
# filesystems, and a margin leaves room for encodings of other tools.
_MAX_COMPONENT = 200
_SAFE_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._+=-")
_HOSTNAME_ESCAPES = {"/": "\\057", ":": "\\072", ",": "\\054"}

# link() errors meaning "this filesystem does not do hard links here".
_NO_HARD_LINKS = frozenset(
    e
    for e in (
        errno.EPERM,
        errno.EXDEV,
        errno.EMLINK,
        errno.ENOSYS,
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "EOPNOTSUPP", None),
    )
    if e is not None
)


# Deliveries made by this process (the Q field).  next() on a count is atomic
# in CPython, so threads need no lock; after a fork the pid differs anyway.
_deliveries = itertools.count(1)


class UnsafeMailboxPath(PermFailure, ValueError):
    """The mailbox's maildir path is unusable or would leave the store root."""

    def __init__(self, reason: str) -> None:
        super().__init__(MAILBOX_UNAVAILABLE, reason)


class MaildirLinkRefused(TempFailure, OSError):
    """A component of the maildir path (below the root) is a symbolic link:
    nothing is written through it (451 4.3.0)."""

    def __init__(self, path: str) -> None:
        TempFailure.__init__(
            self, MAILDIR_LINK, f"{path} is a symbolic link; refusing to deliver through it")
        self.filename = path


class MailLoop(PermFailure):
    """The header section has ``Delivered-To:`` naming the mailbox being
    delivered to: the message has been here before (554 5.4.6)."""

    def __init__(self, address: str) -> None:
        super().__init__(MAILDIR_LOOP, f"mail forwarding loop for {address}")


def encode_component(text: str) -> str:
    """Turn one address part into a safe, single path component.

    The text is lower-cased and UTF-8 encoded; every byte outside
    ``[a-z0-9._+=-]`` becomes ``%XX`` (upper-case hex), and so does a leading
    dot, so the result never contains ``/`` or NUL and is never ``.``,
    ``..`` or a hidden name.  The encoding is one-to-one, so two addresses
    never share a maildir.  Results longer than 200 characters are cut and
    given a ``~<sha256>`` suffix of the original, keeping them under
    NAME_MAX and still distinct.  Raises :class:`UnsafeMailboxPath` for empty
    text.
    """
    raw = text.lower().encode("utf-8", "surrogatepass")
    if not raw:
        raise UnsafeMailboxPath("empty address part")
    parts = []
    for i, byte in enumerate(raw):
        if byte in _SAFE_BYTES and not (i == 0 and byte == 0x2E):
            parts.append(chr(byte))
        else:
            parts.append("%%%02X" % byte)
    name = "".join(parts)
    if len(name) > _MAX_COMPONENT:
        digest = hashlib.sha256(raw).hexdigest()[:32]
        name = name[: _MAX_COMPONENT - len(digest) - 1] + "~" + digest
    return name


def _escape_hostname(hostname: str) -> str:
    escaped = "".join(_HOSTNAME_ESCAPES.get(c, c) for c in hostname)
    return escaped or "localhost"


def _split_address(address: str) -> tuple[str, str]:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise UnsafeMailboxPath(f"not a local@domain address: {address!r}")
    return local, domain


class _PathFields:
    """The template's fields for one mailbox, encoded only when used."""

    def __init__(self, mailbox: Mailbox) -> None:
        self._mailbox = mailbox

    def __getitem__(self, key: str) -> str:
        if key == "localpart":
            return encode_component(_split_address(self._mailbox.address)[0])
        if key == "domain":
            return encode_component(_split_address(self._mailbox.address)[1])
        if key == "login":
            return encode_component(self._mailbox.login)
        raise KeyError(key)


class _CRLFToLF:
    """Streaming CRLF -> LF conversion.

    A CR at the end of one chunk is held back until the next chunk shows
    whether an LF follows.  Bare CRs and bare LFs pass through unchanged.
    """

    __slots__ = ("_held_cr",)

    def __init__(self) -> None:
        self._held_cr = False

    def feed(self, data: bytes) -> bytes:
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._held_cr = True
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        if self._held_cr:
            self._held_cr = False
            return b"\r"
        return b""


# Longest field name prefix held before deciding what a header line is.
_MAX_NAME = 256
# Longest Delivered-To value kept for the loop check (an address is < 330).
_MAX_DELIVERED_TO = 1024


def _normal_address(value: bytes) -> str:
    text = "".join(value.decode("utf-8", "replace").split())  # unfolded, no spaces
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    return text.lower()


class _TraceFilter:
    """Streaming filter of the sender's header section, in one pass.

    Drops every ``Return-Path:`` field (continuation lines included): the
    store writes the envelope's own on top, and RFC 5321 4.4 lets the final
    delivery remove the others.  Raises :class:`MailLoop` when a
    ``Delivered-To:`` field names ``address`` (every such field is checked,
    however many the sender put before it).  Everything from the first
    empty line on passes unchanged.  Memory: at most one line start
    (``_MAX_NAME``) and one Delivered-To value (``_MAX_DELIVERED_TO``).
    """

    __slots__ = ("_address", "_body", "_pending", "_mode", "_field", "_value", "_overflow")

    def __init__(self, address: Optional[str]) -> None:
        self._address = address.lower() if address else None
        self._body = False
        self._pending = bytearray()  # a line start not yet classified
        self._mode: Optional[str] = None  # None: at a line start; "keep"/"drop": mid-line
        self._field: Optional[bytes] = None  # lower-case name of the field being read
        self._value = bytearray()  # the current Delivered-To value
        self._overflow = False

    def feed(self, data: bytes) -> bytes:
        if self._body:
            return data
        out = []
        i, n = 0, len(data)
        while i < n:
            if self._body:
                out.append(data[i:])
                break
            j = data.find(b"\n", i)
            end = n if j < 0 else j + 1
            if self._mode is None:
                self._pending += data[i:end]
                i = end
                start = self._classify(complete=j >= 0)
                if start is None:
                    continue  # need more of the line
                piece = bytes(self._pending)
                self._pending.clear()
                self._take(piece, start, out)
            else:
                self._take(data[i:end], 0, out)
                i = end
        return b"".join(out)

    def flush(self) -> bytes:
        """The content ended (possibly inside the header section)."""
        out = []
        if not self._body and self._pending:
            start = self._classify(complete=True)
            piece = bytes(self._pending)
            self._pending.clear()
            self._take(piece, start or 0, out)
        if not self._body:
            self._end_field()
            self._body = True
        return b"".join(out)

    def _classify(self, complete: bool) -> Optional[int]:
        """Set the mode for the held line start; return where the part of
        it that belongs to a field value begins, None to wait for more."""
        p = self._pending
        if p[:1] == b"\n" or p[:2] == b"\r\n":
            self._end_field()
            self._body = True
            self._mode = "keep"
            return 0
        if p == b"\r" and not complete:
            return None
        if p[:1] in (b" ", b"\t"):  # continues the field before
            self._mode = "drop" if self._field == b"return-path" else "keep"
            return 0
        colon = p.find(b":")
        if colon < 0 and not complete and len(p) < _MAX_NAME:
            return None
        self._end_field()
        name = p[:colon].strip(b" \t").lower() if colon >= 0 else None
        self._field = name
        self._mode = "drop" if name == b"return-path" else "keep"
        return colon + 1 if colon >= 0 else 0

    def _take(self, piece: bytes, start: int, out: list) -> None:
        if self._mode == "keep":
            out.append(piece)
        if self._field == b"delivered-to" and not self._body and not self._overflow:
            self._value += piece[start:]
            if len(self._value) > _MAX_DELIVERED_TO:
                self._overflow = True  # longer than any address: not ours
        if piece.endswith(b"\n") and not self._body:
            self._mode = None

    def _end_field(self) -> None:
        if self._field == b"delivered-to" and not self._overflow and self._address:
            if _normal_address(bytes(self._value)) == self._address:
                self._field = None
                raise MailLoop(self._address)
        self._field = None
        self._value.clear()
        self._overflow = False


class _DirSyncs:
    """Shares one directory fsync among concurrent deliveries into it.

    A delivery takes a ticket once its link into ``new/`` is done, then
    waits its turn on that directory.  An fsync that *starts* after a link
    is complete makes that link durable, so when a turn comes and an fsync
    begun after its ticket has already succeeded, there is nothing left to
    do; otherwise it fsyncs, covering every link ticketed so far.  A failed
    fsync covers nobody: each waiter tries its own.  Directories are keyed
    by device and inode (a path could name another directory by now).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the table and the counters
        self._dirs: dict = {}

    def fsync(self, fd: int) -> None:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            entry = self._dirs.get(key)
            if entry is None:
                entry = self._dirs[key] = _DirSync()
            entry.linked += 1
            ticket = entry.linked
            entry.users += 1
        try:
            with entry.turn:
                if entry.synced >= ticket:
                    return  # an fsync that began after our link has succeeded
                with self._lock:
                    upto = entry.linked
                os.fsync(fd)
                entry.synced = upto
        finally:
            with self._lock:
                entry.users -= 1
                if entry.users == 0:
                    del self._dirs[key]


class _DirSync:
    __slots__ = ("turn", "linked", "synced", "users")

    def __init__(self) -> None:
        self.turn = threading.Lock()  # one fsync of this directory at a time
        self.linked = 0  # tickets handed out
        self.synced = 0  # every ticket up to this one is durable
        self.users = 0  # deliveries holding this entry


#: One per process: deliveries by any store share the fsyncs of a directory.
_dir_syncs = _DirSyncs()


@implementer(IDelivery)
class MaildirDelivery:
    """One message being written into ``tmp/`` of one maildir.

    Made by :meth:`MaildirStore.begin`.  Usable as a context manager: leaving
    the block without :meth:`commit` aborts.
    """

    def __init__(self, maildir: str, name: str, fd: int, *, fsync: bool,
                 tmp_fd: int, new_fd: int, mailbox_address: Optional[str] = None) -> None:
        self.maildir = maildir
        self.name = name
        self.path = os.path.join(maildir, "tmp", name)
        # tmp/ and new/ as opened (O_NOFOLLOW) by the store; owned from here on.
        self._tmp_fd = tmp_fd
        self._new_fd = new_fd
        self._file = io.FileIO(fd, "wb", closefd=True)
        self._buffer = io.BufferedWriter(self._file, buffer_size=DEFAULT_CHUNK_SIZE)
        self._fsync = fsync
        self._convert = _CRLFToLF()
        self._trace = _TraceFilter(mailbox_address)
        self._size = 0
        self._newlines = 0
        self._done = False

    def __enter__(self) -> "MaildirDelivery":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        """Append CRLF-terminated content; it is stored with LF endings, the
        sender's ``Return-Path:`` fields left out of its header section
        (:class:`MailLoop` when its ``Delivered-To:`` names this mailbox)."""
        if self._done:
            raise ValueError("delivery already finished")
        self._emit(self._convert.feed(self._trace.feed(data)))

    def _write_own(self, data: bytes) -> None:
        """Our own header lines, before the content: not filtered."""
        self._emit(self._convert.feed(data))

    def _emit(self, out: bytes) -> None:
        if out:
            self._buffer.write(out)
            self._size += len(out)
            self._newlines += out.count(b"\n")

    def commit(self) -> str:
        """Fsync, move into ``new/``, fsync ``new/``; return the final path."""
        if self._done:
            raise ValueError("delivery already finished")
        try:
            self._emit(self._convert.feed(self._trace.flush()))
            self._emit(self._convert.flush())
            self._buffer.flush()
            crash_point("maildir.tmp_written")
            if self._fsync:
                os.fsync(self._file.fileno())
            crash_point("maildir.fsynced")
            self._buffer.close()
            final = f"{self.name},S={self._size},W={self._size + self._newlines}"
            new_path = os.path.join(self.maildir, "new", final)
            self._publish(final, new_path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        try:
            if self._fsync:
                # On failure the message stays in new/ (see the module docstring).
                # Concurrent deliveries into this maildir share an fsync.
                _dir_syncs.fsync(self._new_fd)
        finally:
            self._close_dirs()
        crash_point("maildir.dir_fsynced")
        return new_path

    def _close_dirs(self) -> None:
        for fd in (self._tmp_fd, self._new_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self._tmp_fd = self._new_fd = -1

    def _publish(self, final: str, new_path: str) -> None:
        try:
            os.link(self.name, final, src_dir_fd=self._tmp_fd, dst_dir_fd=self._new_fd,
                    follow_symlinks=False)
            crash_point("maildir.linked")
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here: rename, which would silently replace an
            # existing file, so check for one first.
            try:
                os.stat(final, dir_fd=self._new_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new_path)
            os.rename(self.name, final, src_dir_fd=self._tmp_fd, dst_dir_fd=self._new_fd)
            return
        try:
            os.unlink(self.name, dir_fd=self._tmp_fd)
        except OSError:
            # Delivered all the same; the leftover link goes with cleanup_tmp.
            pass

    def abort(self) -> None:
        """Close and remove the tmp file, unless already committed."""
        if self._done:
            return
        self._done = True
        for closable in (self._buffer, self._file):
            try:
                closable.close()
            except OSError:
                pass
        try:
            os.unlink(self.name, dir_fd=self._tmp_fd)
        except FileNotFoundError:
            pass
        finally:
            self._close_dirs()


@implementer(IMailStore)
class MaildirStore:
    """Maildirs under ``root``, one per mailbox.

    ``template`` places a mailbox's maildir below ``root``; its fields are
    ``{domain}``, ``{localpart}`` and ``{login}``, each encoded by
    :func:`encode_component`.  ``hostname`` goes into message names (default:
    this host's name).  ``fsync=False`` skips every fsync and is only for
    benchmarks.  ``clock`` returns the time in seconds (injectable for
    tests); ``chunk_size`` bounds how much of a source file is read at once.
    """

    def __init__(
        self,
        root: str,
        *,
        template: str = "{domain}/{localpart}",
        hostname: Optional[str] = None,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.root = os.path.abspath(root)
        self.template = template
        self.hostname = _escape_hostname(socket.gethostname() if hostname is None else hostname)
        self.fsync = fsync
        self.chunk_size = chunk_size
        self._clock = clock
        # Fail at start-up, not at the first delivery, on a bad template.
        self._relative_path(Mailbox(address="user@example.org", login="user"))

    # --- paths ------------------------------------------------------------

    def _relative_path(self, mailbox: Mailbox) -> List[str]:
        try:
            rendered = self.template.format_map(_PathFields(mailbox))
        except KeyError as exc:
            raise ValueError(f"maildir template: unknown field {exc}") from None
        components = rendered.split("/")
        if any(c in ("", ".", "..") for c in components) or "\0" in rendered:
            raise ValueError(f"maildir template gives an unsafe path: {self.template!r}")
        return components

    def _plain_path(self, mailbox: Mailbox) -> str:
        """The maildir's path as text, checked to lie strictly inside the
        root (:class:`UnsafeMailboxPath`); links are not looked at."""
        path = os.path.join(self.root, *self._relative_path(mailbox))
        root = os.path.normpath(self.root)
        plain = os.path.normpath(path)
        if plain == root or os.path.commonpath([root, plain]) != root:
            raise UnsafeMailboxPath(f"maildir for {mailbox.address!r} lies outside the root")
        return path

    def maildir_for(self, mailbox: Mailbox) -> str:
        """The absolute path of ``mailbox``'s maildir (it need not exist).

        Raises :class:`UnsafeMailboxPath` when the address cannot be mapped
        or the path is not strictly inside the root, and
        :class:`MaildirLinkRefused` (temporary) when a symbolic link below
        the root leads it out.
        """
        path = self._plain_path(mailbox)
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real == real_root or os.path.commonpath([real_root, real]) != real_root:
            # Only a symbolic link below the root can do this: someone's
            # mistake or an attack, fixed on disk, so a temporary refusal.
            raise MaildirLinkRefused(path)
        return path

    def ensure_maildir(self, maildir: str, *, subdirs: bool = True) -> None:
        """Create ``maildir`` and its ``cur/``, ``new/``, ``tmp/`` if missing.

        Each directory created is made durable by fsyncing its parent.
        Deliveries do not use this path-based walk (see :meth:`begin`); it
        creates the root, and serves tools and tests.
        """
        subdirs = [os.path.join(maildir, sub) for sub in ("cur", "new", "tmp")] if subdirs else []
        if os.path.isdir(maildir) and all(os.path.isdir(d) for d in subdirs):
            return
        missing = []
        path = maildir
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for path in reversed(missing):
            self._make_dir(path)
        for path in subdirs:
            self._make_dir(path)

    def _make_dir(self, path: str) -> None:
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            if not os.path.isdir(path):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
            # Someone else is creating it; make sure its entry is durable too.
            created = False
        if not self.fsync:
            return
        try:
            fsync_dir(os.path.dirname(path))
        except BaseException:
            if created:
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            raise

    # --- names ------------------------------------------------------------

    def unique_name(self) -> str:
        """A message name no other delivery, process or host will use.

        Time to the microsecond, pid, a per-process counter and 64 random
        bits, then the hostname.  Any one of counter+pid or the random part
        keeps names apart when clocks collide or step back.
        """
        now = self._clock()
        secs = int(now)
        usecs = min(max(int((now - secs) * 1_000_000), 0), 999_999)
        return (
            f"{secs}.M{usecs}P{os.getpid()}Q{next(_deliveries)}"
            f"R{os.urandom(8).hex()}.{self.hostname}"
        )

    # --- delivery ---------------------------------------------------------

    @staticmethod
    def _headers(mailbox: Mailbox, sender: str, prefix: bytes) -> bytes:
        for value in (sender, mailbox.address):
            if "\r" in value or "\n" in value or "\0" in value:
                raise ValueError(f"CR, LF or NUL in envelope address {value!r}")
        if prefix and not prefix.endswith(b"\r\n"):
            raise ValueError("prefix must be complete CRLF-terminated header lines")
        return (
            b"Return-Path: <" + sender.encode("utf-8") + b">\r\n"
            b"Delivered-To: " + mailbox.address.encode("utf-8") + b"\r\n" + prefix
        )

    def _open_dir(self, parent_fd: int, name: str, path: str, create: bool) -> int:
        """Open ``name`` under ``parent_fd`` as a directory, never through a
        symbolic link (:class:`MaildirLinkRefused`); create it (0700, parent
        fsynced) when missing and ``create``."""
        for _ in range(3):
            try:
                return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    raise
            except OSError as exc:
                # O_NOFOLLOW|O_DIRECTORY on a link: ELOOP, or ENOTDIR (Linux).
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                try:
                    st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                except OSError:
                    raise exc from None
                if stat.S_ISLNK(st.st_mode):
                    raise MaildirLinkRefused(path) from None
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
            try:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                continue  # made by another delivery meanwhile (or a link: see above)
            if self.fsync:
                try:
                    os.fsync(parent_fd)
                except BaseException:
                    try:
                        os.rmdir(name, dir_fd=parent_fd)
                    except OSError:
                        pass
                    raise
        raise OSError(errno.EAGAIN, "directory keeps changing", path)

    def _open_maildir(self, mailbox: Mailbox, folder: str = "") -> tuple:
        """``(maildir path, {"tmp": fd, "new": fd, "cur": fd})``, each
        directory opened component by component from the root without
        following links, missing ones created; with ``folder``, those of the
        Maildir++ folder ``<maildir>/.<folder>``.

        No ``realpath`` here (it was two per delivery, an ``lstat`` per
        component each): the walk itself refuses every link below the root
        (:class:`MaildirLinkRefused`), which is stricter than
        :meth:`maildir_for`'s check, and that check still runs at RCPT time.
        """
        maildir = self._plain_path(mailbox)
        components = self._relative_path(mailbox)
        if folder:
            if "/" in folder or folder.startswith(".") or not folder.isprintable():
                raise ValueError(f"bad Maildir++ folder name {folder!r}")
            components = components + ["." + folder]
            maildir = os.path.join(maildir, "." + folder)
        try:
            root_fd = os.open(self.root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        except FileNotFoundError:
            self.ensure_maildir(self.root, subdirs=False)
            root_fd = os.open(self.root, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        fd = root_fd
        opened = {}
        try:
            path = self.root
            for i, component in enumerate(components):
                path = os.path.join(path, component)
                child = self._open_dir(fd, component, path, create=True)
                os.close(fd)
                fd = child
                if folder and i == len(components) - 2:  # a folder's inbox is a maildir too
                    for sub in ("cur", "new", "tmp"):
                        os.close(self._open_dir(fd, sub, os.path.join(path, sub), create=True))
            for sub in ("cur", "new", "tmp"):
                opened[sub] = self._open_dir(fd, sub, os.path.join(path, sub), create=True)
            if folder:  # Maildir++: marks a folder (Dovecot, Courier)
                os.close(os.open("maildirfolder", os.O_WRONLY | os.O_CREAT | _O_NOFOLLOW
                                 | O_CLOEXEC, 0o600, dir_fd=fd))
        except BaseException:
            for sub_fd in opened.values():
                os.close(sub_fd)
            raise
        finally:
            os.close(fd)
        return maildir, opened

    def begin(self, mailbox: Mailbox, *, sender: str, prefix: bytes = b"",
              folder: str = "") -> MaildirDelivery:
        """Open ``tmp/<unique>`` in ``mailbox``'s maildir, headers written.

        Every directory below the root is opened with ``O_NOFOLLOW`` and the
        file is made through the ``tmp/`` descriptor, so nothing is written
        through a symbolic link: one raises :class:`MaildirLinkRefused`
        (451 4.3.0).  Returns a :class:`MaildirDelivery`; call ``write``
        with the content, then ``commit`` (or ``abort``).
        """
        headers = self._headers(mailbox, sender, prefix)
        maildir, fds = self._open_maildir(mailbox, folder)
        os.close(fds.pop("cur"))
        tmp_fd, new_fd = fds["tmp"], fds["new"]
        name = self.unique_name()
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | O_CLOEXEC,
                         0o600, dir_fd=tmp_fd)
        except BaseException:
            os.close(tmp_fd)
            os.close(new_fd)
            raise
        try:
            delivery = MaildirDelivery(maildir, name, fd, fsync=self.fsync,
                                       tmp_fd=tmp_fd, new_fd=new_fd,
                                       mailbox_address=mailbox.address)
        except BaseException:
            os.close(fd)
            os.unlink(name, dir_fd=tmp_fd)
            os.close(tmp_fd)
            os.close(new_fd)
            raise
        try:
            delivery._write_own(headers)
        except BaseException:
            delivery.abort()
            raise
        return delivery

    def deliver(
        self, mailbox: Mailbox, *, sender: str, source_path: str, prefix: bytes = b"",
        folder: str = ""
    ) -> str:
        """Copy the message in ``source_path`` into ``mailbox``; return the
        path in ``new/`` once it is on stable storage.

        The file is read ``chunk_size`` bytes at a time.  On any error the
        partial message is removed and the error re-raised.
        """
        with open(source_path, "rb", buffering=0) as source:
            with self.begin(mailbox, sender=sender, prefix=prefix, folder=folder) as delivery:
                while True:
                    chunk = source.read(self.chunk_size)
                    if not chunk:
                        break
                    delivery.write(chunk)
                return delivery.commit()

    def deliver_bytes(
        self, mailbox: Mailbox, *, sender: str, data: bytes, prefix: bytes = b"",
        folder: str = ""
    ) -> str:
        """Like :meth:`deliver`, with the content in memory (small messages
        as they arrived, bounces, tests)."""
        with self.begin(mailbox, sender=sender, prefix=prefix, folder=folder) as delivery:
            for start in range(0, len(data), self.chunk_size):
                delivery.write(data[start : start + self.chunk_size])
            return delivery.commit()


def cleanup_tmp(
    maildir: str, older_than: float = TMP_MAX_AGE, *, now: Optional[float] = None
) -> List[str]:
    """Remove abandoned files from ``maildir``'s ``tmp/``; return their paths.

    A file goes only when its access, modification and change times are all
    older than ``older_than`` seconds, so a delivery in progress is never
    touched.  Directories and symbolic links are left alone, and a ``tmp/``
    that is itself a symbolic link is not entered.
    """
    cutoff = (time.time() if now is None else now) - older_than
    removed: List[str] = []
    tmp_dir = os.path.join(maildir, "tmp")
    try:
        dir_fd = os.open(tmp_dir, _DIR_FLAGS)  # never through a link
    except FileNotFoundError:
        return removed
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            return removed  # a link or not a directory: nothing of ours
        raise
    try:
        with os.scandir(dir_fd) as entries:
            names = [e.name for e in entries]
        for name in names:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if max(st.st_atime, st.st_mtime, st.st_ctime) >= cutoff:
                continue
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            removed.append(os.path.join(tmp_dir, name))
    finally:
        os.close(dir_fd)
    return removed
