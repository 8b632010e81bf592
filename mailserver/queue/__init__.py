"""The outbound queue: envelopes, the on-disk spool, DSNs and its admin CLI.

:mod:`~mailserver.queue.envelope` defines what is known about a queued
message; :mod:`~mailserver.queue.spool` keeps messages durably in state
directories; :mod:`~mailserver.queue.bounce` writes RFC 3464 delivery status
notifications; :mod:`~mailserver.queue.cli` is ``mailserverctl queue``.
"""

from mailserver.queue.envelope import ClientInfo, Envelope, EnvelopeError, Recipient
from mailserver.queue.spool import (
    ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, STATES,
    AlreadyClaimed, InvalidQueueId, NotQueued, QueueError, QueueSpool, QueueWriter,
    RecoveryReport,
)

__all__ = [
    "ACTIVE", "CORRUPT", "DEFERRED", "HOLD", "INCOMING", "STATES",
    "AlreadyClaimed", "ClientInfo", "Envelope", "EnvelopeError", "InvalidQueueId",
    "NotQueued", "QueueError", "QueueSpool", "QueueWriter", "Recipient", "RecoveryReport",
]
