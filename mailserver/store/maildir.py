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
   headers, then the content, with CRLF turned into LF on the fly;
3. flush and fsync the file;
4. hard-link it to ``new/<name>,S=<size>,W=<vsize>`` (rename where the
   filesystem has no hard links) and unlink the tmp name;
5. fsync ``new/``; only now is the message delivered.

A crash before step 4 leaves a file in ``tmp/`` that no reader looks at, and
:func:`cleanup_tmp` removes it after 36 hours.  A failure before step 4
removes the tmp file and re-raises; ``OSError`` keeps its ``errno`` so that
``ENOSPC``/``EDQUOT`` become a 452 through :func:`mailserver.errors.to_reply`.
A failure of the final directory fsync is re-raised too, but the file in
``new/`` is left where it is: the client will retry and may cause a
duplicate, which the design accepts, whereas removing it could lose mail.

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
import time
from typing import Callable, List, Optional

from zope.interface import implementer

from mailserver.durable import O_CLOEXEC, fsync_dir
from mailserver.faults import crash_point
from mailserver.directory.interfaces import Mailbox
from mailserver.errors import PermFailure
from mailserver import reply as catalog
from mailserver.store.interfaces import IDelivery, IMailStore

__all__ = [
    "MAILBOX_UNAVAILABLE",
    "TMP_MAX_AGE",
    "MaildirDelivery",
    "MaildirStore",
    "UnsafeMailboxPath",
    "cleanup_tmp",
    "encode_component",
]

#: The reply for a mailbox whose path cannot be computed safely.
MAILBOX_UNAVAILABLE = catalog.MAILBOX_UNAVAILABLE

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


@implementer(IDelivery)
class MaildirDelivery:
    """One message being written into ``tmp/`` of one maildir.

    Made by :meth:`MaildirStore.begin`.  Usable as a context manager: leaving
    the block without :meth:`commit` aborts.
    """

    def __init__(self, maildir: str, name: str, fd: int, *, fsync: bool) -> None:
        self.maildir = maildir
        self.name = name
        self.path = os.path.join(maildir, "tmp", name)
        self._file = io.FileIO(fd, "wb", closefd=True)
        self._buffer = io.BufferedWriter(self._file, buffer_size=DEFAULT_CHUNK_SIZE)
        self._fsync = fsync
        self._convert = _CRLFToLF()
        self._size = 0
        self._newlines = 0
        self._done = False

    def __enter__(self) -> "MaildirDelivery":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        """Append CRLF-terminated content; it is stored with LF endings."""
        if self._done:
            raise ValueError("delivery already finished")
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
            self._emit(self._convert.flush())
            self._buffer.flush()
            crash_point("maildir.tmp_written")
            if self._fsync:
                os.fsync(self._file.fileno())
            crash_point("maildir.fsynced")
            self._buffer.close()
            final = f"{self.name},S={self._size},W={self._size + self._newlines}"
            new_dir = os.path.join(self.maildir, "new")
            new_path = os.path.join(new_dir, final)
            self._publish(new_path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        if self._fsync:
            # On failure the message stays in new/ (see the module docstring).
            fsync_dir(new_dir)
        crash_point("maildir.dir_fsynced")
        return new_path

    def _publish(self, new_path: str) -> None:
        try:
            os.link(self.path, new_path)
            crash_point("maildir.linked")
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            # No hard links here: rename, which would silently replace an
            # existing file, so check for one first.
            if os.path.lexists(new_path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), new_path)
            os.rename(self.path, new_path)
            return
        try:
            os.unlink(self.path)
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
            os.unlink(self.path)
        except FileNotFoundError:
            pass


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

    def maildir_for(self, mailbox: Mailbox) -> str:
        """The absolute path of ``mailbox``'s maildir (it need not exist).

        Raises :class:`UnsafeMailboxPath` when the address cannot be mapped
        or the path, with symbolic links resolved, is not strictly inside
        the root.
        """
        path = os.path.join(self.root, *self._relative_path(mailbox))
        real_root = os.path.realpath(self.root)
        real = os.path.realpath(path)
        if real == real_root or os.path.commonpath([real_root, real]) != real_root:
            raise UnsafeMailboxPath(f"maildir for {mailbox.address!r} resolves outside the root")
        return path

    def ensure_maildir(self, maildir: str) -> None:
        """Create ``maildir`` and its ``cur/``, ``new/``, ``tmp/`` if missing.

        Each directory created is made durable by fsyncing its parent.
        """
        subdirs = [os.path.join(maildir, sub) for sub in ("cur", "new", "tmp")]
        if all(os.path.isdir(d) for d in subdirs):
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

    def begin(self, mailbox: Mailbox, *, sender: str, prefix: bytes = b"") -> MaildirDelivery:
        """Open ``tmp/<unique>`` in ``mailbox``'s maildir, headers written.

        Returns a :class:`MaildirDelivery`; call ``write`` with the content,
        then ``commit`` (or ``abort``).
        """
        headers = self._headers(mailbox, sender, prefix)
        maildir = self.maildir_for(mailbox)
        self.ensure_maildir(maildir)
        name = self.unique_name()
        tmp_path = os.path.join(maildir, "tmp", name)
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600)
        try:
            delivery = MaildirDelivery(maildir, name, fd, fsync=self.fsync)
        except BaseException:
            os.close(fd)
            os.unlink(tmp_path)
            raise
        try:
            delivery.write(headers)
        except BaseException:
            delivery.abort()
            raise
        return delivery

    def deliver(
        self, mailbox: Mailbox, *, sender: str, source_path: str, prefix: bytes = b""
    ) -> str:
        """Copy the message in ``source_path`` into ``mailbox``; return the
        path in ``new/`` once it is on stable storage.

        The file is read ``chunk_size`` bytes at a time.  On any error the
        partial message is removed and the error re-raised.
        """
        with open(source_path, "rb", buffering=0) as source:
            with self.begin(mailbox, sender=sender, prefix=prefix) as delivery:
                while True:
                    chunk = source.read(self.chunk_size)
                    if not chunk:
                        break
                    delivery.write(chunk)
                return delivery.commit()

    def deliver_bytes(
        self, mailbox: Mailbox, *, sender: str, data: bytes, prefix: bytes = b""
    ) -> str:
        """Like :meth:`deliver`, with the content in memory (tests, small
        generated messages such as bounces)."""
        with self.begin(mailbox, sender=sender, prefix=prefix) as delivery:
            for start in range(0, len(data), self.chunk_size):
                delivery.write(data[start : start + self.chunk_size])
            return delivery.commit()


def cleanup_tmp(
    maildir: str, older_than: float = TMP_MAX_AGE, *, now: Optional[float] = None
) -> List[str]:
    """Remove abandoned files from ``maildir``'s ``tmp/``; return their paths.

    A file goes only when its access, modification and change times are all
    older than ``older_than`` seconds, so a delivery in progress is never
    touched.  Directories and symbolic links are left alone.
    """
    cutoff = (time.time() if now is None else now) - older_than
    removed: List[str] = []
    try:
        entries = os.scandir(os.path.join(maildir, "tmp"))
    except FileNotFoundError:
        return removed
    with entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if max(st.st_atime, st.st_mtime, st.st_ctime) >= cutoff:
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.path)
    return removed
