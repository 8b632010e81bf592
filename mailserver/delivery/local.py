# -*- test-case-name: tests.unit.test_delivery_local -*-
"""Local delivery: copy a received message into each recipient's maildir.

Every copy is a maildir transaction (see :mod:`mailserver.store.maildir`) run on
the I/O thread pool, so the reactor never waits for fsync.  Copies go out in
parallel, one per distinct mailbox: two recipients that reach the same mailbox
(an alias and its target, a group and one of its members) give one copy.
The result is one reply per mailbox; :mod:`mailserver.delivery.recipients`
turns them into an outcome per recipient for every path that delivers.
"""

from __future__ import annotations

from typing import Optional, Sequence

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailserver import reply as R
from mailserver.errors import ReplyError, is_known, to_reply

log = Logger(namespace="mailserver.local")


class LocalDelivery:
    """Deliver to local mailboxes through ``store`` on ``threadpool``."""

    def __init__(self, store, threadpool, reactor) -> None:
        self.store = store
        self.threadpool = threadpool
        self.reactor = reactor
        self._checked: set = set()  # mailboxes whose path is known to be safe

    def check(self, resolution) -> Optional[R.Reply]:
        """Refuse at RCPT time a recipient whose mailbox cannot be stored, so
        the sender never gets a 5xx after the data for a message that other
        recipients already received."""
        for mailbox in resolution.mailboxes:
            if mailbox in self._checked:
                continue
            try:
                self.store.maildir_for(mailbox)
            except ReplyError as e:
                log.warn("mailbox {mb} cannot be stored: {reason}", mb=mailbox.address,
                         reason=str(e))
                return e.reply
            if len(self._checked) >= 10000:
                self._checked.clear()
            self._checked.add(mailbox)
        return None

    def _copy(self, queue_id: str, mailbox, sender: str, source, prefix: bytes,
              folder: str = ""):
        extra = {"folder": folder} if folder else {}  # a Maildir++ folder (junk)
        if isinstance(source, bytes):  # the content in memory
            d = threads.deferToThreadPool(
                self.reactor, self.threadpool, self.store.deliver_bytes,
                mailbox, sender=sender, data=source, prefix=prefix, **extra,
            )
        else:
            d = threads.deferToThreadPool(
                self.reactor, self.threadpool, self.store.deliver,
                mailbox, sender=sender, source_path=source, prefix=prefix, **extra,
            )

        def ok(path):
            log.info("{id}: to=<{to}>, relay=local, status=sent ({path})",
                     id=queue_id, to=mailbox.address, path=path)
            return R.DELIVERED.with_text(R.DELIVERED.text.format(rcpt=mailbox.address, id=queue_id))

        def failed(failure):
            reply = to_reply(failure.value, queue_id)
            if is_known(failure.value) or isinstance(failure.value, OSError):
                # A symbolic link in the maildir path (451) or a Delivered-To
                # loop (554 5.4.6) among them.
                log.warn("{id}: to=<{to}>, relay=local, status={status} ({reason})",
                         id=queue_id, to=mailbox.address, reason=failure.getErrorMessage(),
                         status="bounced" if reply.is_permanent else "deferred")
            else:
                log.failure("{id}: to=<{to}>, relay=local, status=deferred", failure,
                            id=queue_id, to=mailbox.address)
            return reply

        return d.addCallbacks(ok, failed)

    async def copies(self, queue_id: str, sender: str, source, prefix: bytes,
                     accepted: Sequence[tuple], folder: str = "") -> dict:
        """``{Mailbox: Reply}``: one copy per distinct mailbox of ``accepted``;
        ``source`` is the content's file, or the content itself (bytes)."""
        mailboxes = []
        for _rcpt, resolution in accepted:
            for mb in resolution.mailboxes:
                if mb not in mailboxes:
                    mailboxes.append(mb)
        results = await defer.gatherResults(
            [self._copy(queue_id, mb, sender, source, prefix, folder) for mb in mailboxes]
        )
        return dict(zip(mailboxes, results))


class LocalTarget:
    """The queue's way into local mailboxes (an ``IDeliveryTarget``).

    Each recipient is resolved again (the directory may have changed since the
    message was accepted), then handed to the same per-recipient step the
    listeners use at the end of the data
    (:class:`~mailserver.delivery.recipients.RecipientDelivery`, answering per
    recipient, ``requeue="partial"``), in this order:

    1. its forwards (an alias to outside addresses, a group's outside members,
       a mailbox's forwarding address) are queued through ``outbox`` as one new
       message from the same content: ORCPT names the original recipient,
       NOTIFY, ENVID and RET are kept, the sender is rewritten by ``srs`` when
       given.  If that fails the recipient waits, nothing else done;
    2. its mailboxes get a copy;
    3. when some copies failed while other parts of the recipient are done,
       those mailboxes are queued alone (``mailbox_only``), so the retry
       neither repeats the copies made nor the forwards (a permanent failure
       fails again there and bounces under the mailbox's address).  If even
       that cannot be queued the recipient waits whole; the report's
       ``forwarded`` tells the queue its forwards are done, so they are not
       queued twice.

    A ``mailbox_only`` recipient (such a retry) gets its mailboxes only.  The
    original recipient counts as done once everything is delivered or durably
    queued.  Without an ``outbox`` forwards are a temporary failure
    (``FORWARD_UNAVAILABLE``), never dropped.  An address that no longer
    exists bounces (``550 5.1.1``); an outage is temporary.  Forwards are
    DKIM signed by ``signer`` as at DATA time, and keep the message's
    REQUIRETLS flag (RFC 8689).

    A recipient's ``remote`` in the report is ``"local"`` when its mailbox
    copies were all made here now (a NOTIFY=SUCCESS report is owed, as at
    DATA time); a recipient that only forwards, or whose copy was queued
    again, reports when that copy arrives.
    """

    def __init__(self, directory, delivery: LocalDelivery, outbox=None, srs=None,
                 clock=None, signer=None) -> None:
        self.directory = directory
        self.delivery = delivery
        self.outbox = outbox  # mailserver.queue.outbox.Outbox
        self.srs = srs  # mailserver.srs.SRS
        self.clock = clock  # None: the global reactor, looked up when needed
        self.signer = signer  # mailserver.msgauth.dkim_sign.Signer, for forwards

    async def deliver(self, message):
        from mailserver.delivery.interfaces import DeliveryReport
        from mailserver.delivery.recipients import Message, RecipientDelivery, Target

        replies, remotes = {}, {}
        targets = []
        for rcpt in message.recipients:
            try:
                resolution = await self.directory.resolve(rcpt.address)
            except ReplyError as e:
                replies[rcpt.address] = e.reply
                continue
            if not resolution.found:
                replies[rcpt.address] = (R.MAILBOX_DISABLED if resolution.disabled
                                         else R.RCPT_UNKNOWN)
                continue
            targets.append(Target(rcpt.address, resolution, orcpt=rcpt.orcpt or "",
                                  notify=tuple(rcpt.notify), mailbox_only=rcpt.mailbox_only))
        step = RecipientDelivery(self.delivery, self.outbox, self.srs, self.clock, self.signer)
        content = Message(message.queue_id, message.sender, message.content_path,
                          eight_bit=message.eight_bit, smtputf8=message.smtputf8,
                          envid=message.envid, ret=message.ret, arrival=message.arrival,
                          requiretls=message.requiretls)
        outcomes = await step.deliver(content, targets, requeue="partial")
        forwarded = set()
        for t, outcome in zip(targets, outcomes):
            replies[t.address] = outcome.reply
            if outcome.forwarded:
                forwarded.add(t.address)
            if not outcome.reply.is_positive:
                continue
            if outcome.local:
                remotes[t.address] = "local"  # as at DATA time: its mailbox copies arrived
            elif outcome.queued and t.mailboxes() and not (outcome.forwarded
                                                           and len(outcome.by_mailbox) == 0):
                remotes[t.address] = "queued"
            elif outcome.forwarded:
                remotes[t.address] = "forward"
        return DeliveryReport(replies=replies, remote="local", remotes=remotes,
                              forwarded=frozenset(forwarded))
