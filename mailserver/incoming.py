# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""Where message data waits while it arrives and until it is delivered.

An :class:`IncomingMessage` holds a message being received.  Up to
:data:`MEMORY_LIMIT` octets it stays in memory; past that, and whenever a
file is asked for (:attr:`IncomingMessage.path`: the queue links or copies
it, a check reads it), it is a file under ``<spool>/incoming/`` named after
the message's queue id, created 0600 with O_EXCL and written as the data
streams in, so a large message is never held whole in memory.  Local
delivery copies it into each mailbox and fsyncs there (from memory, on the
delivery thread, for the usual small message: no file is made, written or
removed on the reactor thread), so the file is scratch space: it is removed
once the transaction ends, and files left behind by a crash are removed at
start-up (their clients never got a 250).
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
import time
from typing import Optional


def new_queue_id(clock=time.time) -> str:
    """A unique, sortable id: 6 bytes of time in microseconds + 4 random bytes."""
    micros = int(clock() * 1_000_000)
    raw = struct.pack(">Q", micros)[2:] + secrets.token_bytes(4)
    return base64.b32encode(raw).decode("ascii").rstrip("=")


#: Octets of a message kept in memory before it goes to its scratch file:
#: at most this much per connection receiving data.
MEMORY_LIMIT = 128 * 1024


class IncomingMessage:
    """One message being received: ``write`` chunks, then ``finish`` or ``discard``."""

    def __init__(self, spool_dir: str, queue_id: str, memory_limit: Optional[int] = None) -> None:
        self.queue_id = queue_id
        self._path = os.path.join(spool_dir, "incoming", queue_id)
        self._memory_limit = MEMORY_LIMIT if memory_limit is None else memory_limit
        self._chunks: list = []  # the content while in memory
        self._file = None  # the scratch file once there is one
        self.size = 0

    @property
    def path(self) -> str:
        """The scratch file with everything written so far (made now if the
        content was in memory)."""
        if self._file is None:
            self._spill()
            self._file.flush()
        return self._path

    @property
    def data(self):
        """The content as bytes while it is in memory, else None (read the file)."""
        if self._file is not None:
            return None
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def _spill(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        try:
            for chunk in self._chunks:
                self._file.write(chunk)
        except BaseException:
            self.discard()
            raise
        self._chunks = []

    def write(self, data: bytes) -> None:
        if self._file is None:
            if self.size + len(data) <= self._memory_limit:
                self._chunks.append(data)
                self.size += len(data)
                return
            self._spill()
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush buffered data to the file (readers in other threads see it all)."""
        if self._file is not None:
            self._file.flush()

    def discard(self) -> None:
        self._chunks = []
        if self._file is None:
            return
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass


def prepare_spool(spool_dir: str) -> int:
    """Create the spool directories; remove leftovers of a crash.  Returns the
    number of leftover files removed."""
    incoming = os.path.join(spool_dir, "incoming")
    os.makedirs(incoming, mode=0o700, exist_ok=True)
    return sweep_incoming(spool_dir)


def sweep_incoming(spool_dir: str) -> int:
    """Remove every scratch file under ``incoming/`` (none of them was ever
    answered 250); the number removed."""
    incoming = os.path.join(spool_dir, "incoming")
    removed = 0
    try:
        names = os.listdir(incoming)
    except OSError:
        return 0
    for name in names:
        try:
            os.unlink(os.path.join(incoming, name))
            removed += 1
        except OSError:
            pass
    return removed
