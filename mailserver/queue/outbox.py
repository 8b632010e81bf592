# -*- test-case-name: tests.unit.test_queue_manager -*-
"""Putting received mail into the queue.

:func:`enqueue_copy` runs in a worker thread (it writes and fsyncs) and
returns only once the message is durable in ``incoming/``, so a 250 may
follow.  :func:`enqueue_dsn` does the same for a delivery status
notification the listener writes itself (a "delivered" report for mail it
put into maildirs at once).  :class:`Outbox` is how a listener calls them.
"""

from __future__ import annotations

from typing import Collection, Optional, Sequence, Tuple

from mailserver.queue.envelope import ClientInfo, Envelope, Recipient

CHUNK = 1 << 16


def enqueue_copy(spool, *, queue_id: Optional[str] = None, source_path: str, prefix: bytes,
                 sender: str,
                 recipients: Sequence[Tuple[str, Optional[str]]], arrival: float,
                 eight_bit: bool = False, smtputf8: bool = False,
                 envid: Optional[str] = None, ret: Optional[str] = None,
                 notify: Optional[dict] = None, mailbox_only: Collection[str] = (),
                 client: Optional[ClientInfo] = None, requiretls: bool = False) -> str:
    """Queue ``prefix`` + the content of ``source_path`` for ``recipients``
    (``(address, orcpt)`` pairs; ``notify`` maps an address to its NOTIFY;
    addresses in ``mailbox_only`` are local mailboxes to retry, see
    :class:`~mailserver.queue.envelope.Recipient`)."""
    notify = notify or {}
    with spool.begin(queue_id) as writer:
        writer.write(prefix)
        with open(source_path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                writer.write(chunk)
        envelope = Envelope(
            id=writer.queue_id, sender=sender,
            recipients=[Recipient(address=a, orcpt=o, notify=tuple(notify.get(a, ())),
                                  mailbox_only=a in mailbox_only)
                        for a, o in recipients],
            arrival=arrival, eight_bit=eight_bit, smtputf8=smtputf8, envid=envid, ret=ret,
            client=client or ClientInfo(), requiretls=requiretls,
        )
        return writer.commit(envelope)


def enqueue_dsn(spool, *, original: Envelope, recipients: Sequence[Recipient], kind: str,
                reporting_mta: str, original_path: Optional[str], now: float) -> str:
    """Queue a DSN (:func:`~mailserver.queue.bounce.make_dsn`) about
    ``recipients`` of ``original``, from ``<>`` to its sender, as the queue
    manager does for deliveries it makes; the id once it is durable."""
    from mailserver.queue import bounce

    dsn = bounce.make_dsn(original, recipients, reporting_mta=reporting_mta, kind=kind,
                          original_path=original_path, now=now)
    with spool.begin() as writer:
        writer.write(dsn)
        return writer.commit(bounce.bounce_envelope(original, writer.queue_id, now, dsn,
                                                    reporting_mta=reporting_mta))


class Outbox:
    """How a listener queues mail: in a worker thread, then wake the manager."""

    def __init__(self, spool, threadpool, reactor, wake=lambda: None) -> None:
        self.spool = spool
        self.threadpool = threadpool
        self.reactor = reactor
        self.wake = wake

    def enqueue(self, **kw):
        """Deferred firing with the queue id once the message is durable."""
        return self._queue(enqueue_copy, **kw)

    def enqueue_dsn(self, **kw):
        """Deferred firing with the DSN's queue id once it is durable
        (see :func:`enqueue_dsn`)."""
        return self._queue(enqueue_dsn, **kw)

    def _queue(self, write, **kw):
        from twisted.internet import threads

        d = threads.deferToThreadPool(self.reactor, self.threadpool, write, self.spool, **kw)

        def queued(queue_id):
            self.wake()
            return queue_id

        return d.addCallback(queued)

    def flush(self, domain: Optional[str] = None):
        """Deferred firing with the ids moved from deferred/ for ``domain``."""
        from twisted.internet import threads

        d = threads.deferToThreadPool(self.reactor, self.threadpool, self.spool.flush, domain)

        def flushed(ids):
            self.wake()
            return ids

        return d.addCallback(flushed)
