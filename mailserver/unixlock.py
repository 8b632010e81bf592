# -*- test-case-name: tests.unit.test_unixlock -*-
"""UNIX-socket listeners guarded by a lock that dies with the process.

Twisted's ``wantPID`` lock is a symlink naming a PID: after SIGKILL the old
PID can still be a zombie (the restart fails with "Cannot acquire lock"),
and after a reboot an unrelated process may have that PID (the lock blocks
for good).  Here the lock is ``flock`` on ``<socket>.lock``, a regular file
opened with ``O_NOFOLLOW|O_CLOEXEC`` and kept open for the life of the
process: the kernel drops it when the process exits, however it exits.
Holding it, we may remove a stale socket file and bind.  The PID written
into the file is for people reading it; nothing trusts it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from twisted.internet import endpoints
from twisted.internet.error import CannotListenError

# path -> open descriptor: one per socket, for the life of the process.
_HELD: dict = {}


def lock_path(socket_path: str) -> str:
    return socket_path + ".lock"


def acquire(socket_path: str) -> int:
    """Take the lock for ``socket_path`` (idempotent within one process) and
    remove a stale socket file.  Raises :class:`CannotListenError` with one
    clear line when a live process holds it."""
    if socket_path in _HELD:
        return _HELD[socket_path]
    path = lock_path(socket_path)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise CannotListenError(None, socket_path, f"cannot open lock {path}: "
                                    f"{e.strerror}") from None
        # Twisted's old PID lock is a symlink: a leftover, never followed.
        os.unlink(path)
        fd = os.open(path, flags, 0o600)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CannotListenError(None, socket_path, f"lock {path} is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _read_pid(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            who = f"process {holder}" if holder else "another process"
            raise CannotListenError(None, socket_path, f"already in use: {who} holds {path} "
                                    "(another server running on this socket?)") from None
        raise CannotListenError(None, socket_path, f"cannot lock {path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:  # we hold the lock: a socket file left there is nobody's
        if stat.S_ISSOCK(os.lstat(socket_path).st_mode):
            os.unlink(socket_path)
    except FileNotFoundError:
        pass
    _HELD[socket_path] = fd
    return fd


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def release_all() -> None:
    """Close every held lock (tests; the process exit does it otherwise)."""
    while _HELD:
        _path, fd = _HELD.popitem()
        os.close(fd)


class LockedUNIXServerEndpoint:
    """A ``UNIXServerEndpoint`` (``wantPID=False``) that takes the flock first."""

    def __init__(self, reactor, path: str, mode: int = 0o660, backlog: int = 50) -> None:
        self.path = path
        self._inner = endpoints.UNIXServerEndpoint(reactor, path, backlog=backlog, mode=mode,
                                                   wantPID=False)

    def listen(self, factory):
        from twisted.internet import defer

        try:
            acquire(self.path)
        except CannotListenError as e:
            return defer.fail(e)
        return self._inner.listen(factory)
