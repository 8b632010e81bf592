"""The queue's local target: mailbox copies and forwards of queued recipients."""

from __future__ import annotations

import mailbox

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.delivery.local import LocalDelivery, LocalTarget
from mailserver.queue.spool import QueueSpool
from mailserver.queue.outbox import Outbox
from mailserver.store.maildir import MaildirStore
from mailserver.testing import (FakeDirectory, ImmediateReactor, RecordingOutbox,
                                SynchronousThreadPool)

USERS = {
    "alice@example.test": ("alice@example.test",),
    "away@example.test": ("far@example.org",),
    "both@example.test": ("alice@example.test", "far@example.org"),
    "mixed@example.test": ("alice@example.test", "bob@example.org", "carol@example.net"),
}


class Harness:
    def __init__(self, tmp_path, outbox="recording", srs=None):
        self.root = tmp_path / "mail"
        self.store = MaildirStore(str(self.root), hostname="mx.example.test")
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.directory = FakeDirectory(USERS)
        if outbox == "recording":
            outbox = RecordingOutbox()
        self.outbox = outbox
        delivery = LocalDelivery(self.store, SynchronousThreadPool(), ImmediateReactor())
        self.target = LocalTarget(self.directory, delivery, outbox=outbox, srs=srs,
                                  clock=self.clock)
        self.content = tmp_path / "content"
        self.content.write_bytes(b"Subject: q\r\n\r\nbody\r\n")

    def deliver(self, *recipients, sender="x@example.net", envid=None, ret=None, arrival=None):
        message = OutboundMessage(
            queue_id="Q1", sender=sender, content_path=str(self.content), size=20,
            recipients=tuple(r if isinstance(r, OutboundRecipient) else OutboundRecipient(r)
                             for r in recipients),
            envid=envid, ret=ret, arrival=arrival,
        )
        d = defer.ensureDeferred(self.target.deliver(message))
        results = []
        d.addBoth(results.append)
        [report] = results
        return report

    def messages(self, local):
        path = self.root / "example.test" / local
        if not path.exists():
            return []
        return list(mailbox.Maildir(str(path), factory=None, create=False))


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_alias_to_outside_is_forwarded_not_unknown(h):
    """A queued recipient that only forwards is queued for its forward, ORCPT naming it."""
    rcpt = OutboundRecipient("away@example.test", notify=("SUCCESS", "FAILURE"),
                             orcpt="rfc822;away@example.test")
    report = h.deliver(rcpt, envid="E1", ret="HDRS")
    assert report.replies["away@example.test"].is_positive
    assert report.remotes["away@example.test"] == "forward"  # no success report from here
    [q] = h.outbox.queued
    assert q["recipients"] == [("far@example.org", "rfc822;away@example.test")]
    assert q["notify"] == {"far@example.org": ("SUCCESS", "FAILURE")}
    assert (q["sender"], q["envid"], q["ret"]) == ("x@example.net", "E1", "HDRS")
    assert q["content"] == b"Subject: q\r\n\r\nbody\r\n"
    assert q["arrival"] == h.clock.seconds()


def test_mailbox_and_forward_get_both_copies(h):
    """A mailbox with a forwarding address gets its copy, and the forward is queued."""
    report = h.deliver("both@example.test")
    assert report.replies["both@example.test"].is_positive
    assert report.remotes["both@example.test"] == "local"  # its mailbox copy arrived
    assert len(h.messages("alice")) == 1
    [q] = h.outbox.queued
    assert q["recipients"] == [("far@example.org", "rfc822;both@example.test")]


def test_group_with_outside_members(h):
    """A group's outside members share one queued copy; its local member gets one too."""
    report = h.deliver("mixed@example.test", "away@example.test")
    assert all(r.is_positive for r in report.replies.values())
    assert len(h.messages("alice")) == 1
    [q] = h.outbox.queued
    assert [a for a, _ in q["recipients"]] == ["bob@example.org", "carol@example.net",
                                               "far@example.org"]


def test_bounce_to_a_forwarding_sender_is_forwarded(h):
    """A DSN (sender <>) to an address that forwards elsewhere follows the forward."""
    report = h.deliver("away@example.test", sender="")
    assert report.replies["away@example.test"].is_positive
    [q] = h.outbox.queued
    assert q["sender"] == ""


def test_unknown_and_disabled_still_bounce(h):
    """Only an address that resolves to nothing is 5.1.1 (5.2.1 when disabled)."""
    h.directory.disabled.add("gone@example.test")
    report = h.deliver("nobody@example.test", "gone@example.test")
    assert report.replies["nobody@example.test"] == R.RCPT_UNKNOWN
    assert report.replies["gone@example.test"] == R.MAILBOX_DISABLED
    assert h.outbox.queued == []


def test_without_an_outbox_forwards_are_temporary(tmp_path):
    """With nothing to queue through, a forward is retried later, never refused or dropped."""
    h = Harness(tmp_path, outbox=None)
    report = h.deliver("away@example.test")
    assert report.replies["away@example.test"] == R.FORWARD_UNAVAILABLE


def test_queue_failure_is_temporary(h):
    """A full queue defers the recipient whose forward could not be queued."""
    h.outbox.fail = OSError(28, "No space left on device")
    report = h.deliver("away@example.test", "both@example.test")
    assert report.replies["away@example.test"] == R.STORAGE_FULL
    assert report.replies["both@example.test"] == R.STORAGE_FULL


def test_failed_local_copy_is_queued_alone(tmp_path):
    """Forward queued, local copy failed for now: the mailbox is queued again
    on its own (mailbox_only), so the retry repeats neither the forward nor
    a copy already made."""
    h = Harness(tmp_path)

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    h.store.deliver = full
    rcpt = OutboundRecipient("both@example.test", notify=("SUCCESS",))
    report = h.deliver(rcpt, arrival=1_700_000_000.0)
    assert report.replies["both@example.test"].is_positive
    assert report.remotes["both@example.test"] == "queued"
    forward, retry = h.outbox.queued
    assert forward["arrival"] == h.clock.seconds()  # a new message
    assert retry["arrival"] == 1_700_000_000.0  # the same delivery: the same lifetime
    assert forward["recipients"] == [("far@example.org", "rfc822;both@example.test")]
    assert retry["recipients"] == [("alice@example.test", "rfc822;both@example.test")]
    assert retry["mailbox_only"] == {"alice@example.test"}
    assert retry["notify"] == {"alice@example.test": ("SUCCESS",)}


def test_mailbox_only_retry_gets_no_forward(h):
    """The retry of a mailbox copy delivers into the mailbox and queues no forward."""
    report = h.deliver(OutboundRecipient("both@example.test", mailbox_only=True))
    assert report.replies["both@example.test"].is_positive
    assert report.remotes["both@example.test"] == "local"
    assert len(h.messages("alice")) == 1
    assert h.outbox.queued == []


def test_failed_forward_makes_no_copy(h):
    """When the forward cannot be queued the recipient waits whole: no local
    copy is made, so the retry cannot give the mailbox a second one."""
    h.outbox.fail = OSError(28, "No space left on device")
    report = h.deliver("both@example.test", "alice@example.test")
    assert report.replies["both@example.test"] == R.STORAGE_FULL
    assert report.replies["alice@example.test"].is_positive
    assert len(h.messages("alice")) == 1  # alice's own copy, not one for both@


def test_only_mailbox_deliveries_are_reported_delivered(h):
    """In one attempt, a forward-only recipient is not "local" (no success
    report from here) while a mailbox recipient is."""
    report = h.deliver("away@example.test", "alice@example.test")
    assert report.remotes == {"away@example.test": "forward", "alice@example.test": "local"}


def test_forwards_take_the_srs_sender(tmp_path):
    """With SRS, a forwarded copy leaves with the rewritten sender, as at DATA time."""
    from mailserver.srs import SRS

    h = Harness(tmp_path, srs=SRS("secret", "example.test", clock=lambda: 1_800_000_000.0))
    h.deliver("away@example.test")
    [q] = h.outbox.queued
    assert q["sender"].startswith("SRS0=") and q["sender"].endswith("@example.test")


def test_forward_is_durable_before_the_report(tmp_path):
    """The forwarded copy is committed to the queue when the recipient is reported done."""
    spool = QueueSpool(str(tmp_path / "queue"))
    woken = []
    outbox = Outbox(spool, SynchronousThreadPool(), ImmediateReactor(),
                    wake=lambda: woken.append(True))
    h = Harness(tmp_path, outbox=outbox)
    report = h.deliver(OutboundRecipient("away@example.test", notify=("NEVER",)))
    assert report.replies["away@example.test"].is_positive
    [(state, queue_id)] = list(spool.list())
    assert state == "incoming" and woken
    _, env = spool.load(queue_id)
    [r] = env.recipients
    assert (r.address, r.orcpt, r.notify) == ("far@example.org", "rfc822;away@example.test",
                                              ("NEVER",))
    assert env.sender == "x@example.net"
    assert f"queued as {queue_id}" in report.replies["away@example.test"].text


class Remote:
    """A remote target that records what reaches it and accepts everything."""

    def __init__(self):
        self.received = []

    async def deliver(self, message):
        from mailserver.delivery.interfaces import DeliveryReport

        self.received.append(message)
        return DeliveryReport(replies={r.address: R.OK for r in message.recipients},
                              remote="mx.example.org[192.0.2.1]:25")


class ByDomain:
    def __init__(self, local, remote):
        self.local, self.remote = local, remote

    async def group(self, message):
        from dataclasses import replace

        out = []
        for target, local in ((self.local, True), (self.remote, False)):
            rcpts = tuple(r for r in message.recipients
                          if r.address.endswith("@example.test") == local)
            if rcpts:
                out.append((target, "nexthop", replace(message, recipients=rcpts)))
        return out


def test_queued_bounce_follows_the_forward_through_the_queue(tmp_path):
    """End to end in the queue: a DSN to a local address that forwards outside leaves
    for the outside address; the original is done and nothing is bounced."""
    from mailserver.queue.manager import QueueManager
    from mailserver.queue.outbox import enqueue_copy

    h = Harness(tmp_path, outbox=None)
    spool = QueueSpool(str(tmp_path / "queue"), clock=h.clock.seconds)
    remote = Remote()
    manager = QueueManager(spool, ByDomain(h.target, remote), h.clock,
                           hostname="mx.example.test")
    h.target.outbox = Outbox(spool, SynchronousThreadPool(), ImmediateReactor(),
                             wake=manager.wake)
    enqueue_copy(spool, source_path=str(h.content), prefix=b"", sender="",
                 recipients=[("away@example.test", None)], arrival=h.clock.seconds())
    manager.startService()
    for _ in range(5):
        h.clock.advance(1)
    [message] = remote.received
    assert message.sender == ""
    assert [(r.address, r.orcpt) for r in message.recipients] == [
        ("far@example.org", "rfc822;away@example.test")]
    assert list(spool.list()) == []
    manager.stopService()


def test_failed_requeue_keeps_the_forward_done(tmp_path):
    """Forward queued, copy failed, and the copy cannot be queued either: the
    recipient waits, and the report says its forward is done (the queue
    then retries it mailbox_only)."""
    h = Harness(tmp_path)

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    h.store.deliver = full
    real = h.outbox.enqueue
    calls = []

    def second_fails(**kw):
        calls.append(kw)
        if len(calls) == 2:
            return defer.fail(OSError(28, "No space left on device"))
        return real(**kw)

    h.outbox.enqueue = second_fails
    report = h.deliver("both@example.test")
    assert report.replies["both@example.test"] == R.STORAGE_FULL
    assert report.forwarded == {"both@example.test"}


def test_permanent_copy_failure_is_not_swallowed(tmp_path):
    """In a group, one member's copy failing for good while another
    succeeds: the failed mailbox is queued alone, where it fails again and
    bounces under its own address, never dropped."""
    from mailserver import errors

    h = Harness(tmp_path)
    real = h.store.deliver

    def refuse_bob(mailbox, **kw):
        if mailbox.login == "bob":
            raise errors.ReplyError(R.R(550, "5.2.1", "mailbox disabled"))
        return real(mailbox, **kw)

    h.directory = FakeDirectory({**USERS, "pair@example.test": ("alice@example.test",
                                                                "bob@example.test")})
    h.target.directory = h.directory
    h.store.deliver = refuse_bob
    report = h.deliver("pair@example.test")
    assert report.replies["pair@example.test"].is_positive
    assert len(h.messages("alice")) == 1
    [q] = h.outbox.queued
    assert q["recipients"] == [("bob@example.test", "rfc822;pair@example.test")]
    assert q["mailbox_only"] == {"bob@example.test"}


def test_mailbox_only_group_requeues_the_failed_member_alone(tmp_path):
    """A group already marked mailbox_only (its forwards went earlier) with
    one copy made and one failed: the failed member goes on alone, so the
    member that got its copy does not get another on the retry."""
    h = Harness(tmp_path)
    real = h.store.deliver

    def bob_full(mailbox, **kw):
        if mailbox.login == "bob":
            raise OSError(28, "No space left on device")
        return real(mailbox, **kw)

    h.directory = FakeDirectory({**USERS, "pair@example.test": ("alice@example.test",
                                                                "bob@example.test")})
    h.target.directory = h.directory
    h.store.deliver = bob_full
    report = h.deliver(OutboundRecipient("pair@example.test", mailbox_only=True))
    assert report.replies["pair@example.test"].is_positive
    assert len(h.messages("alice")) == 1
    [q] = h.outbox.queued
    assert q["recipients"] == [("bob@example.test", "rfc822;pair@example.test")]


def test_delivered_to_this_mailbox_is_refused_as_a_loop_at_queue_time(h):
    """A queued message already carrying Delivered-To for the recipient's mailbox fails for good with 5.4.6 (a bounce), nothing stored."""
    h.content.write_bytes(b"Delivered-To: alice@example.test\r\nSubject: q\r\n\r\nbody\r\n")
    report = h.deliver("alice@example.test")
    reply = report.replies["alice@example.test"]
    assert reply.is_permanent and str(reply).startswith("554 5.4.6")
    assert h.messages("alice") == []
    assert h.outbox.queued == []


def test_forged_trace_headers_for_other_addresses_are_no_loop(h):
    """A forged Delivered-To for another address is delivered (kept), and the sender's Return-Path is dropped."""
    h.content.write_bytes(b"Return-Path: <forged@evil.example>\r\n"
                          b"Delivered-To: bob@example.test\r\nSubject: q\r\n\r\nbody\r\n")
    report = h.deliver("alice@example.test")
    assert report.replies["alice@example.test"].is_positive
    [msg] = h.messages("alice")
    assert msg.get_all("Return-Path") == ["<x@example.net>"]
    assert msg.get_all("Delivered-To") == ["alice@example.test", "bob@example.test"]


def test_queued_forwards_are_signed_and_keep_requiretls(h):
    """Forwards made when the queue delivers keep REQUIRETLS and go through the signer."""
    from dataclasses import replace

    class Signer:
        calls = []

        async def sign_forward(self, message, forwarders):
            self.calls.append(list(forwarders))
            return replace(message, prefix=message.prefix + b"DKIM-Signature: test\r\n")

    h.target.signer = Signer()
    message = OutboundMessage(queue_id="Q1", sender="x@example.net",
                              content_path=str(h.content), size=20,
                              recipients=(OutboundRecipient("both@example.test"),),
                              requiretls=True)
    d = defer.ensureDeferred(h.target.deliver(message))
    report = []
    d.addBoth(report.append)
    assert report[0].replies["both@example.test"].is_positive
    [q] = h.outbox.queued
    assert q["content"].startswith(b"DKIM-Signature: test\r\n")
    assert q["requiretls"] is True
    assert Signer.calls == [["both@example.test"]]
    assert b"DKIM-Signature" not in h.messages("alice")[0].as_bytes()  # mailbox copy as it came
