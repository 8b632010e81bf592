# -*- test-case-name: tests.unit.test_queue_spool -*-
"""The durable outbound queue on disk, Postfix style: state is a directory.

Layout under the queue root (every directory mode 0700, every file 0600)::

    data/<id>          message content, CRLF, as received with our Received
                       header on top; written once, never modified
    data/<id>.tmp      content still arriving (QueueWriter)
    tmp/               envelopes being written (never read by anyone)
    incoming/<id>      envelope (JSON, see envelope.py) of a message due now
    active/<id>        ... claimed by a delivery process, being delivered
    deferred/<id>      ... waiting for its next attempt (envelope.next_attempt)
    hold/<id>          ... put aside by the administrator; never delivered
    corrupt/<id>       ... that could not be read or has lost its data file;
                       corrupt/<id>.reason says why, corrupt/<id>.data is
                       its content (moved there from data/ with it).
                       Never deleted by us.
    flush              touched by ``flush``; the manager may watch its mtime

A message's state is the directory its envelope sits in: changing state is
one rename of a small file and an fsync of both directories; the content
never moves.  Files are written under a temporary name, fsynced, renamed
into place and their directory fsynced: a crash leaves old or new, never a mix.

Committing a message (:meth:`QueueWriter.commit`, :meth:`QueueSpool.enqueue_path`)
puts the content in place first and the envelope last; the envelope's arrival
in ``incoming/`` is the commit point.  Only when commit returns may the
listener answer 250.  Should any step fail, commit undoes what is visible and
raises (``OSError`` keeps its errno, so a full disk becomes a 452).

Who may change what, so that several processes can share one spool:

* Taking a message for delivery is ``move(id, "active")`` from ``incoming/``
  or ``deferred/``.  ``rename`` is atomic, so of two processes racing for the
  same file one wins and the other gets :class:`AlreadyClaimed`.
* Only the process holding a message in ``active/`` rewrites its envelope
  (:meth:`QueueSpool.save`) and moves it out of ``active/``.
* Everybody else (``mailserverctl queue``) only renames or unlinks envelopes
  in ``incoming/``, ``deferred/`` and ``hold/``, never rewrites one.  So a
  flushed message keeps its old ``next_attempt``: a message in ``incoming/``
  is due now, whatever its envelope says; ``next_attempt`` matters only in
  ``deferred/``.  The manager resets it when it next writes the envelope.

:meth:`QueueSpool.recover` is for start-up, before any process delivers or
receives: it sends ``active/`` back to ``incoming/`` (a crash in mid-delivery
means another attempt; duplicates are allowed, loss is not), removes
half-written files, orphaned content older than an hour (its client never
got a 250) and quarantines what it cannot read.

Everything here blocks; the Twisted side calls it from a worker thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple

from twisted.logger import Logger

from mailserver.durable import O_CLOEXEC, fsync_dir
from mailserver.faults import crash_point
from mailserver.queue.envelope import (
    ID_PATTERN, AlreadyClaimed, Envelope, EnvelopeError, InvalidQueueId, NotQueued, QueueError,
    check_id,
)
from mailserver.incoming import new_queue_id

__all__ = [
    "ACTIVE", "CORRUPT", "DEFERRED", "HOLD", "INCOMING", "STATES",
    "AlreadyClaimed", "InvalidQueueId", "NotQueued", "QueueError",
    "QueueSpool", "QueueWriter", "RecoveryReport", "ORPHAN_AGE",
]

log = Logger(namespace="mailserver.queue")

INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT = "incoming", "active", "deferred", "hold", "corrupt"
STATES = (INCOMING, ACTIVE, DEFERRED, HOLD, CORRUPT)

#: Content without an envelope older than this is removed by recover().
ORPHAN_AGE = 3600.0

_NO_HARD_LINKS = frozenset(
    e for e in (errno.EPERM, errno.EMLINK, errno.ENOSYS,
                getattr(errno, "ENOTSUP", None), getattr(errno, "EOPNOTSUPP", None))
    if e is not None
)
_REASON_SUFFIX = ".reason"
_DATA_SUFFIX = ".data"


@dataclass
class RecoveryReport:
    """What :meth:`QueueSpool.recover` did, for the start-up log line."""

    requeued: int = 0  # active/ -> incoming/
    tmp_removed: int = 0  # half-written content or envelopes
    orphans_removed: int = 0  # content nobody got a 250 for
    quarantined: int = 0  # moved to corrupt/

    def __bool__(self) -> bool:
        return bool(self.requeued or self.tmp_removed or self.orphans_removed
                    or self.quarantined)

    def __str__(self) -> str:
        return (f"requeued={self.requeued} tmp_removed={self.tmp_removed} "
                f"orphans_removed={self.orphans_removed} quarantined={self.quarantined}")


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class QueueWriter:
    """Content streaming into ``data/<id>.tmp``; made by :meth:`QueueSpool.begin`.

    ``write`` appends; ``commit(envelope)`` makes the message durable and
    queued; ``abort`` throws it away.  As a context manager, leaving the block
    without ``commit`` aborts.
    """

    def __init__(self, spool: "QueueSpool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = check_id(queue_id)
        self.path = spool.content_path(queue_id)
        self.tmp_path = self.path + ".tmp"
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self.size = 0
        self._done = False

    def __enter__(self) -> "QueueWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.abort()

    def write(self, data: bytes) -> None:
        if self._done:
            raise ValueError("queue writer already finished")
        self._file.write(data)
        self.size += len(data)

    def commit(self, envelope: Envelope) -> str:
        """Make the message durable and queue it in ``incoming/``; return its id.

        Sets ``envelope.id`` and ``envelope.size``.  On any failure everything
        is removed again and the exception propagates; the one exception is a
        manager that claimed the envelope in the instant between its rename
        and a failed directory fsync: that message stays queued (a possible
        duplicate, never a loss).
        """
        if self._done:
            raise ValueError("queue writer already finished")
        envelope.id = self.queue_id
        envelope.size = self.size
        try:
            envelope.validate()
            self._file.flush()
            if self.spool.fsync:
                os.fsync(self._file.fileno())
            self._file.close()
            os.rename(self.tmp_path, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        self.spool._publish_new(self.queue_id, envelope)
        return self.queue_id

    def abort(self) -> None:
        """Close and remove the content, unless committed."""
        if self._done:
            return
        self._done = True
        try:
            self._file.close()
        except OSError:
            pass
        _unlink(self.tmp_path)


class QueueSpool:
    """The queue directories under ``root``.

    ``clock`` gives the time in seconds (injectable for tests); ``fsync=False``
    skips every fsync and is for benchmarks only.  With ``create=False`` a
    missing directory is an error instead of being made (the CLI uses this, so
    a mistyped path does not grow a new queue).
    """

    def __init__(self, root: str, *, clock: Callable[[], float] = time.time,
                 fsync: bool = True, create: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.fsync = fsync
        self._clock = clock
        self.data_dir = os.path.join(self.root, "data")
        self.tmp_dir = os.path.join(self.root, "tmp")
        self.flush_path = os.path.join(self.root, "flush")
        for d in (self.data_dir, self.tmp_dir, *(self.state_dir(s) for s in STATES)):
            if create:
                os.makedirs(d, mode=0o700, exist_ok=True)
            elif not os.path.isdir(d):
                raise QueueError(f"{self.root} is not a queue directory (no {d})")

    # --- paths ------------------------------------------------------------

    def state_dir(self, state: str) -> str:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}")
        return os.path.join(self.root, state)

    def envelope_path(self, state: str, queue_id: str) -> str:
        return os.path.join(self.state_dir(state), check_id(queue_id))

    def content_path(self, queue_id: str) -> str:
        """Where the message's content is (or will be)."""
        return os.path.join(self.data_dir, check_id(queue_id))

    def corrupt_content_path(self, queue_id: str) -> str:
        """Where a quarantined message's content is kept (``corrupt/<id>.data``)."""
        return self.envelope_path(CORRUPT, queue_id) + _DATA_SUFFIX

    # --- durability helpers -----------------------------------------------

    def _fsync_dir(self, path: str) -> None:
        if self.fsync:
            fsync_dir(path)

    def _write_tmp(self, name: str, data: bytes) -> str:
        """Write ``data`` to a fresh file under tmp/, fsynced; return its path."""
        path = os.path.join(self.tmp_dir, f"{name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return path

    def _publish_new(self, queue_id: str, envelope: Envelope) -> None:
        """Content is in data/ already: fsync data/, then put the envelope in
        incoming/.  On failure remove what is visible and re-raise."""
        final = self.envelope_path(INCOMING, queue_id)
        tmp = None
        published = False
        try:
            self._fsync_dir(self.data_dir)
            crash_point("queue.data")
            tmp = self._write_tmp(queue_id, envelope.to_json())
            os.rename(tmp, final)
            published = True
            crash_point("queue.incoming")
            self._fsync_dir(self.state_dir(INCOMING))
        except BaseException:
            if tmp is not None and not published:
                _unlink(tmp)
            keep = False
            if published:
                try:
                    # Gone already: a manager claimed it, so it is queued after all.
                    keep = not _unlink(final)
                except OSError:
                    keep = True  # still visible: keep its content
            if not keep:
                try:
                    _unlink(self.content_path(queue_id))
                except OSError:
                    pass  # an orphan; recover() removes it
            raise

    # --- writing new messages ---------------------------------------------

    def begin(self, queue_id: Optional[str] = None) -> QueueWriter:
        """Start a new message; ``queue_id`` defaults to a fresh one."""
        return QueueWriter(self, queue_id or new_queue_id(self._clock))

    def enqueue_path(self, path: str, envelope: Envelope) -> str:
        """Queue the already-written file ``path`` as a new message; return its id.

        The id is ``envelope.id`` when set (the listener may already have
        logged it), else a fresh one.  The file is fsynced and hard-linked to
        ``data/<id>`` (renamed where links are not possible, copied across
        filesystems), so ``path`` itself is usually left for the caller to
        remove as before.  Sets ``envelope.id`` and ``envelope.size``.
        """
        queue_id = check_id(envelope.id or new_queue_id(self._clock))
        dest = self.content_path(queue_id)
        fd = os.open(path, os.O_RDONLY | O_CLOEXEC)
        try:
            if self.fsync:
                os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        envelope.id = queue_id
        envelope.size = size
        envelope.validate()
        try:
            os.link(path, dest)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                self._copy_in(path, dest)
            elif exc.errno in _NO_HARD_LINKS:
                if os.path.lexists(dest):
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest)
                os.rename(path, dest)
            else:
                raise
        self._publish_new(queue_id, envelope)
        return queue_id

    def _copy_in(self, path: str, dest: str) -> None:
        tmp = dest + ".tmp"
        try:
            with open(path, "rb") as src, open(
                    os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600),
                    "wb") as out:
                shutil.copyfileobj(src, out, 65536)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            if os.path.lexists(dest):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest)
            os.rename(tmp, dest)
        except BaseException:
            _unlink(tmp)
            raise

    # --- reading ------------------------------------------------------------

    def find(self, queue_id: str) -> Optional[str]:
        """The state the message is in now, or None."""
        check_id(queue_id)
        for _ in range(3):  # a message may move while we look
            for state in STATES:
                if os.path.lexists(self.envelope_path(state, queue_id)):
                    return state
        return None

    def read_envelope(self, state: str, queue_id: str) -> Envelope:
        """Parse ``<state>/<id>``: EnvelopeError if invalid (not a regular
        file included), OSError if unreadable now (permissions, I/O)."""
        try:
            with open(self.envelope_path(state, queue_id), "rb") as f:
                data = f.read(1 << 20)  # far beyond any real envelope
        except (IsADirectoryError, NotADirectoryError) as e:
            raise EnvelopeError(f"{state}/{queue_id} is not a file: {e}") from e
        env = Envelope.from_json(data)
        if env.id != queue_id:
            raise EnvelopeError(f"envelope says id {env.id!r}, file is {queue_id!r}")
        return env

    def load(self, queue_id: str) -> Tuple[str, Envelope]:
        """``(state, envelope)``; NotQueued if absent, EnvelopeError if invalid."""
        check_id(queue_id)
        for _ in range(3):
            for state in STATES:
                if state == CORRUPT:
                    continue
                try:
                    return state, self.read_envelope(state, queue_id)
                except FileNotFoundError:
                    continue
        if os.path.lexists(self.envelope_path(CORRUPT, queue_id)):
            raise EnvelopeError(f"{queue_id} is in corrupt/")
        raise NotQueued(queue_id)

    def list(self, state: Optional[str] = None) -> Iterator[Tuple[str, str]]:
        """``(state, id)`` of every queued message (of one state), in id order,
        which is arrival order."""
        for st in (state,) if state else STATES:
            try:
                names = os.listdir(self.state_dir(st))
            except FileNotFoundError:
                continue
            for name in sorted(n for n in names if ID_PATTERN.match(n)):
                yield st, name

    def reason(self, queue_id: str) -> str:
        """Why a message was quarantined ("" if no reason was recorded)."""
        path = self.envelope_path(CORRUPT, queue_id) + _REASON_SUFFIX
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    # --- changing state -----------------------------------------------------

    def save(self, queue_id: str, envelope: Envelope, state: Optional[str] = None) -> str:
        """Atomically replace the envelope in its current state; return the state.

        Only the process that owns the message (holds it in ``active/``) may
        call this: see the module docstring.
        """
        if envelope.id != queue_id:
            raise ValueError(f"envelope id {envelope.id!r} is not {queue_id!r}")
        state = state or self.find(queue_id)
        if state is None:
            raise NotQueued(queue_id)
        final = self.envelope_path(state, queue_id)
        tmp = self._write_tmp(queue_id, envelope.to_json())
        try:
            if not os.path.lexists(final):
                raise NotQueued(queue_id)
            os.rename(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        self._fsync_dir(self.state_dir(state))
        return state

    def move(self, queue_id: str, to_state: str,
             from_states: Optional[Sequence[str]] = None) -> str:
        """Rename the envelope into ``to_state``; return the state it left.

        ``from_states`` are the states it may be taken from, tried in order;
        the default is incoming and deferred for ``active`` (a claim), and
        every other state otherwise.  Raises :class:`AlreadyClaimed` when it is
        in none of them (moved or deleted by someone else).  Both directories
        are fsynced, a claim's included: POSIX makes an entry's removal
        durable only with its directory, and a rename out of ``incoming/``
        that a crash undid after the message was delivered and deleted would
        bring it back.
        """
        check_id(queue_id)
        dest = self.envelope_path(to_state, queue_id)
        if from_states is None:
            from_states = ((INCOMING, DEFERRED) if to_state == ACTIVE
                           else tuple(s for s in STATES if s != to_state))
        for state in from_states:
            if state == to_state:
                continue
            try:
                os.rename(self.envelope_path(state, queue_id), dest)
            except FileNotFoundError:
                continue
            crash_point(f"queue.{to_state}")
            self._fsync_dir(self.state_dir(to_state))
            self._fsync_dir(self.state_dir(state))
            return state
        raise AlreadyClaimed(queue_id, self.find(queue_id))

    def delete(self, queue_id: str, states: Optional[Iterable[str]] = None) -> str:
        """Remove a message, envelope first, then content; return its state.

        ``states`` limits where it may be taken from (the CLI leaves out
        ``active``).  Raises :class:`AlreadyClaimed` when it is in none of them.
        """
        check_id(queue_id)
        for state in STATES if states is None else states:
            if not _unlink(self.envelope_path(state, queue_id)):
                continue
            crash_point("queue.removed")
            self._fsync_dir(self.state_dir(state))
            _unlink(self.content_path(queue_id))
            if state == CORRUPT:
                _unlink(self.envelope_path(CORRUPT, queue_id) + _REASON_SUFFIX)
                _unlink(self.corrupt_content_path(queue_id))
            return state
        raise AlreadyClaimed(queue_id, self.find(queue_id))

    def quarantine(self, queue_id: str, reason: str, state: Optional[str] = None) -> bool:
        """Put the message aside in ``corrupt/`` with ``reason``; never delete it.

        The envelope is moved there from ``state`` (default: wherever it is);
        when there is no envelope to move but the content exists, a stub takes
        its place, so that the content is kept and listed.  Returns False
        (and does nothing) when neither exists: the message was delivered or
        deleted meanwhile.
        """
        check_id(queue_id)
        corrupt = self.state_dir(CORRUPT)
        if self.find(queue_id) is None and not os.path.lexists(self.content_path(queue_id)):
            return False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock()))
        tmp = self._write_tmp(queue_id, f"{stamp} {reason}\n".encode("utf-8", "replace"))
        os.rename(tmp, os.path.join(corrupt, queue_id + _REASON_SUFFIX))
        try:
            self.move(queue_id, CORRUPT, from_states=(state,) if state else None)
        except AlreadyClaimed:
            if not os.path.lexists(os.path.join(corrupt, queue_id)):
                stub = self._write_tmp(queue_id, b"# stub: no envelope could be moved here\n")
                os.rename(stub, os.path.join(corrupt, queue_id))
            self._fsync_dir(corrupt)
        self._quarantine_content(queue_id)
        log.error("{queue_id}: quarantined in corrupt/: {reason}", queue_id=queue_id,
                  reason=reason)
        return True

    def _quarantine_content(self, queue_id: str) -> bool:
        """Move ``data/<id>`` to ``corrupt/<id>.data`` (after the envelope:
        a crash between the two leaves content that :meth:`recover` moves)."""
        dest = self.corrupt_content_path(queue_id)
        if os.path.lexists(dest):
            return False
        try:
            os.rename(self.content_path(queue_id), dest)
        except FileNotFoundError:
            return False
        self._fsync_dir(self.state_dir(CORRUPT))
        self._fsync_dir(self.data_dir)
        return True

    def flush(self, domain: Optional[str] = None) -> list:
        """Move deferred messages (those with a pending recipient in ``domain``,
        if given) to ``incoming/``, touch the flush file; return the ids moved."""
        moved = []
        want = domain.lower().rstrip(".") if domain else None
        for _, queue_id in self.list(DEFERRED):
            if want is not None:
                try:
                    env = self.read_envelope(DEFERRED, queue_id)
                except (OSError, EnvelopeError):
                    continue  # gone, or for recover()/the manager to judge
                if not any(r.domain == want for r in env.pending()):
                    continue
            try:
                self.move(queue_id, INCOMING, from_states=(DEFERRED,))
            except AlreadyClaimed:
                continue
            moved.append(queue_id)
        self.touch_flush()
        return moved

    def touch_flush(self) -> None:
        """Update the mtime of ``<root>/flush``: "scan the queue now"."""
        fd = os.open(self.flush_path, os.O_WRONLY | os.O_CREAT | O_CLOEXEC, 0o600)
        os.close(fd)
        os.utime(self.flush_path, None)

    # --- start-up -----------------------------------------------------------

    def recover(self, orphan_age: float = ORPHAN_AGE) -> RecoveryReport:
        """Repair the spool after a crash; run before anything else uses it."""
        report = RecoveryReport()
        for _, queue_id in list(self.list(ACTIVE)):
            try:
                self.move(queue_id, INCOMING, from_states=(ACTIVE,))
                report.requeued += 1
            except AlreadyClaimed:
                pass
        for name in os.listdir(self.tmp_dir):
            report.tmp_removed += _unlink(os.path.join(self.tmp_dir, name))
        data_names = os.listdir(self.data_dir)
        for name in data_names:
            if name.endswith(".tmp"):
                report.tmp_removed += _unlink(os.path.join(self.data_dir, name))
        known = set()
        for state, queue_id in list(self.list()):
            known.add(queue_id)
            if state == CORRUPT:
                self._quarantine_content(queue_id)  # left in data/ by an older version or a crash
                continue
            try:
                self.read_envelope(state, queue_id)
            except FileNotFoundError:
                continue
            except EnvelopeError as e:
                self.quarantine(queue_id, f"unreadable envelope in {state}/: {e}", state)
                report.quarantined += 1
                continue
            except OSError:
                continue  # cannot read it now (permissions, I/O): left for the manager to retry
            if not os.path.exists(self.content_path(queue_id)):
                self.quarantine(queue_id, f"data file missing (envelope was in {state}/)",
                                state)
                report.quarantined += 1
        cutoff = self._clock() - orphan_age
        for name in data_names:
            if not ID_PATTERN.match(name) or name in known:
                continue
            path = os.path.join(self.data_dir, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    report.orphans_removed += _unlink(path)
            except FileNotFoundError:
                pass
        return report
