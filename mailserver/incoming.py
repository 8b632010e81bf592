# -*- test-case-name: tests.unit.test_protocol_smtp -*-
"""Where message data waits while it arrives and until it is delivered.

An :class:`IncomingMessage` is a file under ``<spool>/incoming/`` named after the
message's queue id, created 0600 with O_EXCL, written as the data streams in
(never the whole message in memory).  Local delivery copies it into each
mailbox and fsyncs there, so this file itself is scratch space: it is removed
once the transaction ends, and files left behind by a crash are removed at
start-up (their clients never got a 250).  The outbound queue will make this
directory the first stage of the durable queue.
"""

from __future__ import annotations

import base64
import os
import secrets
import struct
import time


def new_queue_id(clock=time.time) -> str:
    """A unique, sortable id: 6 bytes of time in microseconds + 4 random bytes."""
    micros = int(clock() * 1_000_000)
    raw = struct.pack(">Q", micros)[2:] + secrets.token_bytes(4)
    return base64.b32encode(raw).decode("ascii").rstrip("=")


class IncomingMessage:
    """One message being received: ``write`` chunks, then ``finish`` or ``discard``."""

    def __init__(self, spool_dir: str, queue_id: str) -> None:
        self.queue_id = queue_id
        self.path = os.path.join(spool_dir, "incoming", queue_id)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=65536)
        self.size = 0

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def finish(self) -> None:
        """Flush buffered data to the file (readers in other threads see it all)."""
        self._file.flush()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.path)
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
