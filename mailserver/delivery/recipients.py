# -*- test-case-name: tests.unit.test_delivery_local -*-
"""The one per-recipient delivery step: mailboxes, the queue and forwards.

Every path that takes responsibility for a message ends here: the SMTP,
submission and LMTP listeners at the end of the data, and the queue when it
delivers a queued local recipient.  Each accepted recipient is a
:class:`Target`: a local address with its directory :class:`Resolution`
(mailboxes and forwards), or an address the queue routes (``resolution`` is
None: relayed mail, the original sender behind an SRS address).

The order is the same for everyone, chosen so that a failure never leaves
half of a recipient done *and* forgotten:

1. the outside addresses (relayed recipients, forwards) are queued first; a
   recipient whose outside part cannot be queued gets the failure and nothing
   else is done for it (so a retry repeats nothing).  Forwards leave with the
   SRS sender when SRS is on, as a message of their own;
2. the mailboxes of the remaining recipients get one copy each (two
   recipients reaching one mailbox give one copy), in parallel;
3. mailboxes whose copy failed are queued alone (``mailbox_only``: their
   forwards are done) when ``requeue`` says so: ``"always"`` (SMTP and
   submission, whose single 250 must cover every recipient) or ``"partial"``
   (LMTP and the queue, which answer per recipient: only when something else
   of that recipient is already done; otherwise its own failure is its
   answer and the whole recipient is retried).

The result is one :class:`Outcome` per target, in order.  Nothing here knows
about sockets: the callers turn outcomes into replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from twisted.logger import Logger

from mailserver import reply as R
from mailserver.errors import is_known, to_reply

log = Logger(namespace="mailserver.delivery")


@dataclass(frozen=True)
class Target:
    """One accepted recipient and where its mail goes."""

    address: str
    resolution: object = None  # directory Resolution; None: the queue routes it
    orcpt: str = ""
    notify: tuple = ()
    mailbox_only: bool = False  # a queued retry of its mailboxes alone

    @property
    def orig(self) -> str:
        return self.orcpt or f"rfc822;{self.address}"

    def outside(self) -> tuple:
        """Addresses that leave through the queue."""
        return self.relayed() + self.forwards()

    def relayed(self) -> tuple:
        """Addresses queued with the original sender: the recipient itself
        when the queue routes it, or the relay-domain mailboxes it reaches."""
        if self.resolution is None:
            return (self.address,)
        if self.mailbox_only and self.resolution.mailboxes:
            return ()
        return tuple(getattr(self.resolution, "relayed", ()))

    def forwards(self) -> tuple:
        """Forwards to outside addresses (SRS applies to these)."""
        if self.resolution is None or (self.mailbox_only and self.resolution.mailboxes):
            return ()
        return tuple(self.resolution.forwards)

    def mailboxes(self) -> tuple:
        return () if self.resolution is None else tuple(self.resolution.mailboxes)


@dataclass(frozen=True)
class Message:
    """The content and envelope facts the queue needs to carry a copy."""

    queue_id: str
    sender: str
    content_path: str  # "" when ``incoming`` holds the content
    prefix: bytes = b""  # header lines added on the way in (Received, ...)
    eight_bit: bool = False
    smtputf8: bool = False
    envid: Optional[str] = None
    ret: Optional[str] = None
    arrival: Optional[float] = None  # keep this arrival time for queued copies
    reuse_id: bool = False  # the first queued copy takes ``queue_id`` (a listener's)
    folder: str = ""  # Maildir++ folder for the local copies made now ("" = inbox)
    requiretls: bool = False  # RFC 8689: onward only over verified TLS
    incoming: object = None  # a listener's incoming.IncomingMessage (content in memory or not)

    def path(self) -> str:
        """A file with the content (an incoming message in memory makes its file now)."""
        return self.incoming.path if self.incoming is not None else self.content_path

    def source(self):
        """The content for a copy: bytes when in memory, else its file's path."""
        data = self.incoming.data if self.incoming is not None else None
        return data if data is not None else self.path()


@dataclass
class Outcome:
    """What became of one target."""

    reply: R.Reply
    local: bool = False  # every mailbox copy was made now (a SUCCESS report is owed here)
    forwarded: bool = False  # its forwards are durably queued
    queued: bool = False  # some of it waits in the queue
    by_mailbox: dict = field(default_factory=dict)  # Mailbox -> Reply of its copy


class RecipientDelivery:
    """Delivers a message to its targets; see the module docstring."""

    def __init__(self, local, outbox=None, srs=None, clock=None, signer=None) -> None:
        self.local = local  # mailserver.delivery.local.LocalDelivery
        self.outbox = outbox  # mailserver.queue.outbox.Outbox
        self.srs = srs
        self.clock = clock
        self.signer = signer  # mailserver.msgauth.dkim_sign.Signer: forwarded copies signed

    def _now(self) -> float:
        clock = self.clock
        if clock is None:
            from twisted.internet import reactor as clock
        return clock.seconds()

    async def deliver(self, message: Message, targets: Sequence[Target], *,
                      requeue: str = "partial") -> list:
        outcomes: list = [None] * len(targets)
        ids = iter([message.queue_id] if message.reuse_id else [])

        # 1. Outside addresses first: relayed ones (the recipient itself, or
        # relay-domain mailboxes) with the sender, forwards with SRS's.
        relayed = [(i, t, t.relayed()) for i, t in enumerate(targets) if t.relayed()]
        forwarding = [(i, t, t.forwards()) for i, t in enumerate(targets) if t.forwards()]
        srs_sender = None
        if forwarding and self.srs is not None:
            srs_sender = self.srs.forward(message.sender)
        groups = []  # (sender, [(i, target, addresses)], status)
        if srs_sender is not None and srs_sender != message.sender:
            groups = [(message.sender, relayed, "queued"), (srs_sender, forwarding, "forwarded")]
        else:
            both = {}
            for i, t, addresses in relayed + forwarding:
                both[i] = (i, t, both[i][2] + addresses if i in both else addresses)
            groups = [(message.sender, list(both.values()), "queued")]
        for sender, members, status in groups:
            if not members:
                continue
            recipients = [(a, t.orig, t.notify) for _i, t, addresses in members
                          for a in addresses]
            copy = message
            forwarders = [t.address for _i, t, _a in members if t.forwards()]
            if forwarders and self.signer is not None:  # DKIM for the forwarding domain
                copy = await self.signer.sign_forward(message, forwarders)
            reply = await self._enqueue(copy, recipients, sender, (), status,
                                        queue_id=next(ids, None))
            for i, t, _a in members:
                if outcomes[i] is not None and not outcomes[i].reply.is_positive:
                    continue  # its other outside part failed: that is its answer
                outcomes[i] = Outcome(reply, queued=reply.is_positive,
                                      forwarded=reply.is_positive and t.resolution is not None)
            if not reply.is_positive and requeue == "always":
                return [Outcome(reply) for _ in targets]

        # 2. One copy per mailbox of the targets still going.
        going = [(i, t) for i, t in enumerate(targets)
                 if t.mailboxes() and (outcomes[i] is None or outcomes[i].reply.is_positive)]
        by_mailbox: dict = {}
        if going:
            extra = {"folder": message.folder} if message.folder else {}
            by_mailbox = await self.local.copies(
                message.queue_id, message.sender, message.source(), message.prefix,
                [(t.address, t.resolution) for _i, t in going], **extra)

        # 3. Failed copies: queued alone, or the recipient's own answer.
        retry = []  # (i, target, failed mailboxes, results)
        alone = []  # failed, nothing else of theirs done: their own answer, unless covered
        requeued = set()  # mailboxes whose copy is queued again
        for i, t in going:
            results = {mb: by_mailbox[mb] for mb in t.mailboxes()}
            failed = [mb for mb, r in results.items() if not r.is_positive]
            done_before = outcomes[i]
            if not failed:
                reply = done_before.reply if done_before is not None else R.DELIVERED.with_text(
                    R.DELIVERED.text.format(rcpt=t.address, id=message.queue_id))
                outcomes[i] = Outcome(reply, local=True, by_mailbox=results,
                                      forwarded=bool(done_before and done_before.forwarded),
                                      queued=bool(done_before and done_before.queued))
                continue
            partly_done = done_before is not None or len(failed) < len(results)
            if self.outbox is not None and (requeue == "always" or partly_done):
                retry.append((i, t, failed, results))
                requeued.update(failed)
            else:
                alone.append((i, t, failed, results))
        for i, t, failed, results in alone:
            if requeued.issuperset(failed):  # another recipient's retry carries them
                retry.append((i, t, failed, results))
            else:
                outcomes[i] = Outcome(results[failed[0]], by_mailbox=results)
        if retry:
            recipients, seen = [], set()
            for _i, t, failed, _r in retry:
                for mb in failed:
                    if mb.address not in seen:
                        seen.add(mb.address)
                        recipients.append((mb.address, t.orig, t.notify))
            reply = await self._enqueue(message, recipients, message.sender, seen,
                                        "local copy queued again", queue_id=next(ids, None),
                                        arrival=message.arrival)
            if not reply.is_positive and requeue == "always":
                return [Outcome(reply) for _ in targets]
            for i, t, failed, results in retry:
                before = outcomes[i]
                if reply.is_positive:
                    first = before.reply if before is not None else reply
                    outcomes[i] = Outcome(first, queued=True, by_mailbox=results,
                                          forwarded=bool(before and before.forwarded))
                else:
                    outcomes[i] = Outcome(reply, by_mailbox=results,
                                          forwarded=bool(before and before.forwarded))
        for i, t in enumerate(targets):
            if outcomes[i] is None:  # a local address with nothing to deliver to
                outcomes[i] = Outcome(R.RCPT_UNKNOWN)
        return outcomes

    async def _enqueue(self, message: Message, recipients, sender: str, mailbox_only,
                       status: str, *, queue_id: Optional[str] = None,
                       arrival: Optional[float] = None) -> R.Reply:
        """Queue the content for ``recipients`` (``(address, orcpt, notify)``);
        QUEUED with the new id once durable, else the reply for the failure."""
        if self.outbox is None:
            log.warn("{id}: cannot queue for {to}: no queue", id=message.queue_id,
                     to=", ".join(a for a, _o, _n in recipients))
            return R.FORWARD_UNAVAILABLE
        unique, notify = [], {}
        for address, orcpt, n in recipients:
            if address not in notify:
                unique.append((address, orcpt))
                notify[address] = n
        try:
            new_id = await self.outbox.enqueue(
                queue_id=queue_id, source_path=message.path(), prefix=message.prefix,
                sender=sender, recipients=unique, notify=notify, mailbox_only=mailbox_only,
                arrival=self._now() if arrival is None else arrival,
                eight_bit=message.eight_bit, smtputf8=message.smtputf8,
                envid=message.envid, ret=message.ret, **_requiretls(message))
        except Exception as e:
            if not is_known(e) and not isinstance(e, OSError):
                log.failure("{id}: could not queue a copy", id=message.queue_id)
            else:
                log.warn("{id}: could not queue a copy: {reason}", id=message.queue_id,
                         reason=str(e))
            return to_reply(e, message.queue_id)
        if status == "queued":  # relayed: the queue logs each delivery
            log.info("{id}: queued from=<{sender}> for {n} recipient(s) as {new}",
                     id=message.queue_id, sender=sender, n=len(unique), new=new_id)
            return R.QUEUED.with_text(R.QUEUED.text.format(id=new_id))
        for address, orcpt in unique:
            log.info("{id}: to=<{to}>, orig_to=<{orig}>, relay=local, status={status} as {new}",
                     id=message.queue_id, to=address, orig=orcpt.partition(";")[2],
                     status=status, new=new_id)
        return R.QUEUED.with_text(R.QUEUED.text.format(id=new_id))


def _requiretls(message: Message) -> dict:
    """The outbox's ``requiretls`` argument, only when set (RFC 8689)."""
    return {"requiretls": True} if message.requiretls else {}
