# -*- test-case-name: tests.unit.test_maildrop -*-
"""File-system helpers of the POP3 maildrop (:mod:`mailserver.store.maildrop`):
directories and message files opened without following links, the listing
of ``new/`` and ``cur/``, and the ``flock`` lock; the decisions are in that
module's docstring."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from typing import BinaryIO, Dict, List, Optional, Tuple

from mailserver.durable import O_CLOEXEC, O_DIRECTORY

#: The lock file in the maildir's top directory.
LOCK_NAME = ".mailserver-pop3.lock"

SUBDIRS = ("new", "cur")
_LOCK_POLL = 0.05
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

# One message's place: (subdir, file name).
Location = Tuple[str, str]


class MaildropInUse(Exception):
    """Another session holds this maildir's POP3 lock."""


def base_name(name: str) -> str:
    """The name up to the first ``:`` (Dovecot's base name)."""
    return name.partition(":")[0]


class NotRegular(PermissionError):
    """A symbolic link, directory or special file where a file should be."""

    def __init__(self, path: str, what: str) -> None:
        super().__init__(
            errno.EPERM, f"{what} is a symbolic link or not a regular file; refusing it", path
        )


def open_subdir(maildir_fd: int, maildir: str, sub: str) -> Optional[int]:
    """Open ``new/`` or ``cur/`` without following a link; None if missing."""
    path = os.path.join(maildir, sub)
    try:
        return os.open(
            sub, os.O_RDONLY | O_DIRECTORY | _O_NOFOLLOW | O_CLOEXEC, dir_fd=maildir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a link fails with ELOOP or (Linux) ENOTDIR.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(sub, dir_fd=maildir_fd, follow_symlinks=False)
                is_link = stat.S_ISLNK(st.st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise PermissionError(
                    errno.EPERM, f"maildir {sub}/ is a symbolic link; refusing to follow it", path
                ) from None
        raise


def _open_regular_fd(name: str, dir_fd: int, path: str, what: str, flags: int,
                     mode: int = 0o600) -> int:
    """A descriptor for ``name`` in ``dir_fd``, opened with ``flags``, never
    through a link and never a FIFO or device (:class:`NotRegular`, naming
    ``what`` at ``path``)."""
    try:
        fd = os.open(name, flags | _O_NOFOLLOW | _O_NONBLOCK | O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegular(path, what) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegular(path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(name: str, dir_fd: int, path: str) -> BinaryIO:
    """Open a file read-only, never through a link, never a FIFO or device."""
    fd = _open_regular_fd(name, dir_fd, path, "message file", os.O_RDONLY)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_small(name: str, dir_fd: int, limit: int) -> Optional[bytes]:
    """The whole content of a regular file of at most ``limit`` octets, in
    one ``read``; None when the file is not there, is larger, is not a
    regular file (a link is not followed), changed size meanwhile or could
    not be read."""
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        data = os.read(fd, st.st_size + 1)
        return data if len(data) == st.st_size else None
    except OSError:  # EIO and the like: the caller's other path reports it
        return None
    finally:
        os.close(fd)


def scan(dir_fds: Dict[str, int]) -> Dict[str, Location]:
    """Map base name -> (subdir, name) for the regular files in new/, cur/.

    ``new/`` first, so that a message moved to ``cur/`` while we read is
    found there; within ``cur/``, of two names with one base the greater
    is kept (a deterministic choice; Dovecot would rename one).
    """
    found: Dict[str, Location] = {}
    for sub in SUBDIRS:
        fd = dir_fds.get(sub)
        if fd is None:
            continue
        with os.scandir(fd) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                base = base_name(name)
                old = found.get(base)
                if old is None or old[0] != sub or name > old[1]:
                    found[base] = (sub, name)
    return found


def close_fds(fds: List[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


def lock(maildir_fd: int, maildir: str, timeout: float) -> int:
    path = os.path.join(maildir, LOCK_NAME)
    fd = _open_regular_fd(LOCK_NAME, maildir_fd, path, "POP3 lock file",
                          os.O_RDWR | os.O_CREAT)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MaildropInUse(f"{maildir} is in use by another POP3 session") from None
                time.sleep(min(_LOCK_POLL, remaining))
    except BaseException:
        os.close(fd)
        raise
