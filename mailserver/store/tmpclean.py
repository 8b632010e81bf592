# -*- test-case-name: tests.unit.test_tmpclean -*-
"""The scheduled ``tmp/`` cleaner: :func:`~mailserver.store.maildir.cleanup_tmp`
for every maildir, a few at a time.

A crash between creating ``tmp/<name>`` and linking it into ``new/`` leaves a
file nobody reads; DJB's rule removes it after 36 hours.  Walking every
maildir of a large store at once would be a burst of directory reads, so
:class:`TmpCleaner` keeps a resumable cursor over the store (a depth-first
walk from the root, symbolic links never followed) and handles at most
``batch`` maildirs per tick, one tick every ``interval`` seconds, on the I/O
thread pool.  When the walk reaches the end the next tick starts it again
from the root.  A tick still running when the next one is due delays it
(``LoopingCall`` waits for the Deferred), so ticks never overlap.

A maildir is a directory with ``cur/``, ``new/`` and ``tmp/`` (real
directories, not links); Maildir++ folders (``.Name`` inside a maildir) are
maildirs of their own and are visited too.  Errors on one directory (gone,
permissions) are skipped; an error of a whole tick is logged and the
schedule goes on.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Callable, Iterator, List, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from mailserver.store.maildir import TMP_MAX_AGE, cleanup_tmp

__all__ = ["DEFAULT_BATCH", "DEFAULT_INTERVAL", "TmpCleaner", "iter_maildirs"]

log = Logger(namespace="mailserver.store")

#: Seconds between ticks.
DEFAULT_INTERVAL = 60.0
#: Maildirs cleaned per tick at most.
DEFAULT_BATCH = 100

_SUBDIRS = ("cur", "new", "tmp")


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def iter_maildirs(root: str) -> Iterator[str]:
    """Every maildir below ``root`` (depth first, names sorted), without
    following symbolic links; lazily, so a caller can stop and resume."""
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as entries:
                children = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        except OSError:
            continue
        names = set(children)
        if all(sub in names for sub in _SUBDIRS):
            yield path
            children = [c for c in children if c.startswith(".")]  # Maildir++ folders
        # Reversed onto the stack: visited in sorted order.
        stack.extend(os.path.join(path, c) for c in reversed(children))


class TmpCleaner(service.Service):
    """Runs :func:`cleanup_tmp` over the store, ``batch`` maildirs per tick.

    ``io(f, *args)`` runs ``f`` on the I/O thread pool and returns a
    Deferred; ``clock`` is the reactor (``task.Clock`` in tests); ``now``
    gives the wall-clock time the file ages are compared with.
    """

    name = "maildir-tmp-cleaner"

    def __init__(self, root: str, clock, io: Callable, *, interval: float = DEFAULT_INTERVAL,
                 batch: int = DEFAULT_BATCH, older_than: float = TMP_MAX_AGE,
                 now: Callable[[], float] = time.time) -> None:
        if batch < 1 or interval <= 0:
            raise ValueError("batch and interval must be positive")
        self.root = root
        self.clock = clock
        self.io = io
        self.interval = interval
        self.batch = batch
        self.older_than = older_than
        self.now = now
        self.removed_total = 0
        self._cursor: Optional[Iterator[str]] = None
        self._loop: Optional[task.LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.clock
        # The first tick after one interval: start-up has enough to do.
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("maildir tmp/ cleaner stopped", f))

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def tick(self) -> defer.Deferred:
        """Clean the next ``batch`` maildirs (on the I/O pool); never fails."""
        d = defer.maybeDeferred(self.io, self.run_batch)

        def done(removed):
            if removed:
                self.removed_total += len(removed)
                log.info("removed {n} file(s) older than {hours:g} h from maildir tmp/: {first}",
                         n=len(removed), hours=self.older_than / 3600, first=removed[0])

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("maildir tmp/ cleaning failed", f))
        return d

    def run_batch(self) -> List[str]:
        """Blocking: clean up to ``batch`` maildirs from the cursor; return
        the paths removed."""
        removed: List[str] = []
        now = self.now()
        for _ in range(self.batch):
            if self._cursor is None:
                self._cursor = iter_maildirs(self.root)
            maildir = next(self._cursor, None)
            if maildir is None:
                self._cursor = None  # a full pass done; the next tick starts again
                break
            try:
                removed.extend(cleanup_tmp(maildir, self.older_than, now=now))
            except OSError as e:
                log.warn("cannot clean {path}/tmp: {error}", path=maildir, error=e)
            except Exception:
                log.failure("cannot clean {path}/tmp", path=maildir)
        return removed
