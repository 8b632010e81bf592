"""The acceptance pipeline's Check hooks, and the per-recipient delivery step."""

from __future__ import annotations

import mailbox

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailserver import reply as R
from mailserver.delivery.local import LocalDelivery
from mailserver.delivery.recipients import Message, RecipientDelivery, Target
from mailserver.directory.interfaces import Mailbox, Resolution
from mailserver.pipeline.acceptance import Check
from mailserver.srs import SRS
from mailserver.store.maildir import MaildirStore
from mailserver.testing import ImmediateReactor, RecordingOutbox, SynchronousThreadPool

from tests.unit.test_protocol_smtp import Harness, replies

REFUSED = R.Reply(554, (5, 7, 1), "Go away")
LATER = R.Reply(450, (4, 7, 1), "Not now")


class Recorder(Check):
    """A check that records every hook it sees and answers ``answers[hook]``."""

    def __init__(self, name="rec", log=None, **answers):
        self.name = name
        self.answers = answers
        self.log = [] if log is None else log
        self.accepted_count = 0

    def _hook(self, hook):
        self.log.append((self.name, hook))
        return self.answers.get(hook)

    async def on_connect(self, session):
        return self._hook("connect")

    async def on_helo(self, session):
        return self._hook("helo")

    async def on_mail(self, session, txn):
        return self._hook("mail")

    async def on_rcpt(self, session, txn, target):
        return self._hook("rcpt")

    async def on_data(self, session, txn):
        return self._hook("data")

    async def accepted(self, session, txn):
        self.accepted_count += 1
        self.log.append((self.name, "accepted"))


class AddHeader(Check):
    """Adds one header line at the end of the data."""

    async def on_data(self, session, txn):
        txn.add_header("X-Checked", "yes")
        return None


EXCHANGE = (b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
            b"DATA\r\nSubject: hi\r\n\r\nhello\r\n.\r\n")


# -- Check hooks through the adapter ------------------------------------------------

def test_refused_at_connect(tmp_path):
    """A check refusing at connect makes the greeting its 554, and the connection closes."""
    h = Harness(tmp_path, checks=[Recorder(connect=REFUSED)])
    p, t = h.connect()
    assert replies(t) == ["554 5.7.1"]
    assert t.disconnecting
    p.dataReceived(b"EHLO c\r\n")
    assert t.value() == b""


def test_positive_connect_answer_is_the_usual_greeting(tmp_path):
    """A check answering positively at connect leaves the usual 220 greeting."""
    h = Harness(tmp_path, checks=[Recorder(connect=R.Reply(250, None, "fine"))])
    p, t = h.connect()
    assert t.value().startswith(b"220 mx.example.test ESMTP")
    assert not t.disconnecting


def test_refused_at_helo(tmp_path):
    """A check refusing at HELO closes the session with 421 after the HELO reply."""
    check = Recorder(helo=REFUSED)
    h = Harness(tmp_path, checks=[check])
    p, t = h.connect()
    t.clear()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    out = replies(t)
    assert out[-1] == "421 4.3.2"
    assert "250 2.1.0" not in out
    assert t.disconnecting
    assert ("rec", "mail") not in check.log


def test_421_at_helo_is_passed_on(tmp_path):
    """A check's own 421 at HELO is the closing reply."""
    busy = R.Reply(421, (4, 7, 0), "Busy")
    h = Harness(tmp_path, checks=[Recorder(helo=busy)])
    p, t = h.connect()
    t.clear()
    p.dataReceived(b"EHLO c\r\n")
    assert replies(t)[-1] == "421 4.7.0"
    assert t.disconnecting


def test_refused_at_mail(tmp_path):
    """A check refusing at MAIL gives its reply, and RCPT then needs a MAIL."""
    h = Harness(tmp_path, checks=[Recorder(mail=LATER)])
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n")
    out = replies(t)
    assert out[-2] == "450 4.7.1"
    assert out[-1].startswith("503")


def test_refused_at_rcpt(tmp_path):
    """A check refusing at RCPT gives its reply; the recipient is not accepted."""
    check = Recorder(rcpt=REFUSED)
    h = Harness(tmp_path, checks=[check])
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\n")
    assert replies(t)[-2:] == ["554 5.7.1", "554 5.5.1"]


def test_rcpt_check_runs_after_the_recipient_policy(tmp_path):
    """A recipient the policy refuses never reaches the checks' on_rcpt."""
    check = Recorder()
    h = Harness(tmp_path, checks=[check])
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<nobody@example.test>\r\n")
    assert replies(t)[-1] == "550 5.1.1"
    assert ("rec", "rcpt") not in check.log


def test_refused_at_end_of_data(tmp_path):
    """A check refusing at the end of the data gives its reply and nothing is stored."""
    check = Recorder(data=REFUSED)
    h = Harness(tmp_path, checks=[check])
    p, t = h.connect()
    p.dataReceived(EXCHANGE)
    assert replies(t)[-1] == "554 5.7.1"
    assert h.messages("alice") == []
    assert check.accepted_count == 0
    assert [f for f in (tmp_path / "spool").rglob("*") if f.is_file()] == []  # discarded


def test_header_added_at_data_goes_below_received(tmp_path):
    """A header a check adds at the end of the data is stored right below our Received line."""
    h = Harness(tmp_path, checks=[AddHeader()])
    p, t = h.connect()
    p.dataReceived(EXCHANGE)
    assert replies(t)[-1] == "250 2.0.0"
    [msg] = h.messages("alice")
    keys = [k.lower() for k in msg.keys()]
    assert msg["X-Checked"] == "yes"
    assert keys.index("received") + 1 == keys.index("x-checked")
    assert keys.index("x-checked") < keys.index("subject")


def test_checks_run_in_order_first_reply_wins(tmp_path):
    """Checks run in their listed order and the first one to answer decides; later ones are not asked."""
    log = []
    first = Recorder("first", log)
    second = Recorder("second", log, mail=LATER)
    third = Recorder("third", log, mail=REFUSED)
    h = Harness(tmp_path, checks=[first, second, third])
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    assert replies(t)[-1] == "450 4.7.1"
    assert log == [("first", "connect"), ("second", "connect"), ("third", "connect"),
                   ("first", "helo"), ("second", "helo"), ("third", "helo"),
                   ("first", "mail"), ("second", "mail")]


def test_accepted_called_once_per_accepted_message(tmp_path):
    """accepted() is called once for each message taken in, and not for a refused one."""
    class RefuseSecondData(Recorder):
        async def on_data(self, session, txn):
            self.log.append((self.name, "data"))
            n = sum(1 for _name, hook in self.log if hook == "data")
            return REFUSED if n == 2 else None

    check = RefuseSecondData()
    other = Recorder("other")
    h = Harness(tmp_path, checks=[check, other])
    p, t = h.connect()
    p.dataReceived(EXCHANGE)
    assert replies(t)[-1] == "250 2.0.0"
    assert (check.accepted_count, other.accepted_count) == (1, 1)
    p.dataReceived(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\nSubject: 2\r\n\r\nx\r\n.\r\n")
    assert replies(t)[-1] == "554 5.7.1"
    assert (check.accepted_count, other.accepted_count) == (1, 1)
    p.dataReceived(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: 3\r\n\r\nx\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    assert (check.accepted_count, other.accepted_count) == (2, 2)
    assert len(h.messages("alice")) == 2


def test_accepted_not_called_when_delivery_fails(tmp_path):
    """A message the delivery step cannot take (no 250) is not reported accepted."""
    from tests.unit.test_protocol_smtp import BrokenStore

    check = Recorder()
    h = Harness(tmp_path, checks=[check],
                store=lambda s: BrokenStore(s, "alice@example.test", OSError(28, "No space")))
    p, t = h.connect()
    p.dataReceived(EXCHANGE)
    assert replies(t)[-1] == "452 4.3.1"
    assert check.accepted_count == 0


# -- RecipientDelivery directly -----------------------------------------------------

def mb(local):
    return Mailbox(address=f"{local}@example.test", login=local)


def res(address, mailboxes=(), forwards=()):
    return Resolution(address=address, mailboxes=tuple(mb(m) for m in mailboxes),
                      forwards=tuple(forwards))


ALICE = res("alice@example.test", ["alice"])
TEAM = res("team@example.test", ["alice", "bob"])
BOTH = res("both@example.test", ["alice"], ["far@example.org"])
AWAY = res("away@example.test", [], ["far@example.org"])


class EventStore:
    """A maildir store that logs each copy in ``events`` and fails for ``bad`` mailboxes."""

    def __init__(self, store, events, bad=(), error=OSError(28, "No space left on device")):
        self.store, self.events, self.bad, self.error = store, events, set(bad), error

    def maildir_for(self, mailbox_):
        return self.store.maildir_for(mailbox_)

    def deliver(self, mailbox_, **kw):
        self.events.append(("copy", mailbox_.address))
        if mailbox_.address in self.bad:
            raise self.error
        return self.store.deliver(mailbox_, **kw)

    def deliver_bytes(self, mailbox_, **kw):
        self.events.append(("copy", mailbox_.address))
        if mailbox_.address in self.bad:
            raise self.error
        return self.store.deliver_bytes(mailbox_, **kw)


class EventOutbox(RecordingOutbox):
    """A recording outbox that logs in ``events`` and can fail only for some calls."""

    def __init__(self, events):
        super().__init__()
        self.events = events
        self.fail_when = None  # predicate over the enqueue keywords

    def enqueue(self, **kw):
        self.events.append(("enqueue", tuple(a for a, _o in kw["recipients"])))
        if self.fail_when is not None and self.fail_when(kw):
            return defer.fail(OSError(28, "No space left on device"))
        return super().enqueue(**kw)


class DeliverySetup:
    def __init__(self, tmp_path, bad=(), srs=None, outbox=True):
        self.events = []
        self.root = tmp_path / "mail"
        self.store = EventStore(MaildirStore(str(self.root), hostname="mx.example.test"),
                                self.events, bad)
        self.local = LocalDelivery(self.store, SynchronousThreadPool(), ImmediateReactor())
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = EventOutbox(self.events) if outbox else None
        self.delivery = RecipientDelivery(self.local, self.outbox, srs, self.clock)
        self.content = tmp_path / "content"
        self.content.write_bytes(b"Subject: q\r\n\r\nbody\r\n")

    def deliver(self, *targets, requeue="partial", sender="x@example.net", reuse_id=False):
        message = Message("Q1", sender, str(self.content), b"X-Prefix: 1\r\n",
                          reuse_id=reuse_id)
        d = defer.ensureDeferred(self.delivery.deliver(message, list(targets), requeue=requeue))
        out = []
        d.addBoth(out.append)
        assert out, "delivery did not finish"
        if isinstance(out[0], Failure):
            out[0].raiseException()
        return out[0]

    def messages(self, local):
        path = self.root / "example.test" / local
        if not path.exists():
            return []
        return list(mailbox.Maildir(str(path), factory=None, create=False))


@pytest.fixture
def d(tmp_path):
    return DeliverySetup(tmp_path)


def test_relay_target_is_queued(d):
    """A target without a resolution goes to the queue with its ORCPT and NOTIFY."""
    [o] = d.deliver(Target("r@example.org", notify=("FAILURE",)), reuse_id=True)
    assert o.reply.is_positive and o.queued and not o.local and not o.forwarded
    [q] = d.outbox.queued
    assert q["queue_id"] == "Q1"  # the listener's id is reused for the first copy
    assert q["recipients"] == [("r@example.org", "rfc822;r@example.org")]
    assert q["notify"] == {"r@example.org": ("FAILURE",)}
    assert q["sender"] == "x@example.net"
    assert q["content"] == b"X-Prefix: 1\r\nSubject: q\r\n\r\nbody\r\n"
    assert q["arrival"] == d.clock.seconds()


def test_mailbox_copy_made(d):
    """A local target's mailbox gets its copy, with the prefix, and the outcome is local."""
    [o] = d.deliver(Target("alice@example.test", ALICE))
    assert o.reply.code == 250 and o.local and not o.queued
    assert o.by_mailbox == {mb("alice"): o.by_mailbox[mb("alice")]}
    [msg] = d.messages("alice")
    assert msg["X-Prefix"] == "1"
    assert d.outbox.queued == []


def test_forwards_are_queued_before_copies(d):
    """A target's forwards are durably queued before any mailbox copy is made."""
    [o] = d.deliver(Target("both@example.test", BOTH))
    assert o.reply.is_positive and o.forwarded and o.local
    assert d.events == [("enqueue", ("far@example.org",)), ("copy", "alice@example.test")]
    [q] = d.outbox.queued
    assert q["recipients"] == [("far@example.org", "rfc822;both@example.test")]


def test_failed_forward_makes_no_copy_for_that_recipient(d):
    """When a recipient's forward cannot be queued it gets the failure and no copy; others still get theirs."""
    d.outbox.fail_when = lambda kw: True
    both, alice = d.deliver(Target("both@example.test", BOTH), Target("alice@example.test", ALICE))
    assert both.reply == R.STORAGE_FULL and not both.local and not both.forwarded
    assert alice.reply.is_positive and alice.local
    assert d.events.count(("copy", "alice@example.test")) == 1  # alice's own, not both@'s
    assert len(d.messages("alice")) == 1


def test_failed_forward_with_requeue_always_fails_everything(d):
    """With requeue="always" a forward that cannot be queued fails every target and no copy is made."""
    d.outbox.fail_when = lambda kw: True
    outcomes = d.deliver(Target("both@example.test", BOTH), Target("alice@example.test", ALICE),
                         requeue="always")
    assert [o.reply for o in outcomes] == [R.STORAGE_FULL, R.STORAGE_FULL]
    assert d.messages("alice") == []
    assert not any(e[0] == "copy" for e in d.events)


def test_requeue_always_queues_a_failed_copy(tmp_path):
    """With requeue="always" a failed copy is queued alone (mailbox_only) and the answer is positive."""
    d = DeliverySetup(tmp_path, bad={"alice@example.test"})
    [o] = d.deliver(Target("alice@example.test", ALICE, notify=("SUCCESS",)), requeue="always")
    assert o.reply.is_positive and o.queued and not o.local
    assert o.by_mailbox[mb("alice")] == R.STORAGE_FULL
    [q] = d.outbox.queued
    assert q["recipients"] == [("alice@example.test", "rfc822;alice@example.test")]
    assert q["mailbox_only"] == {"alice@example.test"}
    assert q["notify"] == {"alice@example.test": ("SUCCESS",)}


def test_requeue_always_failed_requeue_is_the_answer(tmp_path):
    """With requeue="always", when even the failed copy cannot be queued every target gets that failure."""
    d = DeliverySetup(tmp_path, bad={"bob@example.test"})
    d.outbox.fail_when = lambda kw: True
    outcomes = d.deliver(Target("team@example.test", TEAM), Target("alice@example.test", ALICE),
                         requeue="always")
    assert [o.reply for o in outcomes] == [R.STORAGE_FULL, R.STORAGE_FULL]


def test_requeue_partial_alone_gives_the_copys_own_failure(tmp_path):
    """With requeue="partial" and nothing else done for the recipient, its answer is the copy's failure and nothing is queued."""
    d = DeliverySetup(tmp_path, bad={"alice@example.test"})
    [o] = d.deliver(Target("alice@example.test", ALICE), requeue="partial")
    assert o.reply == R.STORAGE_FULL
    assert not o.queued and not o.local
    assert d.outbox.queued == []


def test_requeue_partial_when_part_is_done(tmp_path):
    """With requeue="partial" a failed copy is queued alone when another mailbox of the recipient got its copy."""
    d = DeliverySetup(tmp_path, bad={"bob@example.test"})
    [o] = d.deliver(Target("team@example.test", TEAM), requeue="partial")
    assert o.reply.is_positive and o.queued
    [q] = d.outbox.queued
    assert q["recipients"] == [("bob@example.test", "rfc822;team@example.test")]
    assert q["mailbox_only"] == {"bob@example.test"}
    assert len(d.messages("alice")) == 1


def test_requeue_partial_after_forward_keeps_forwarded(tmp_path):
    """With requeue="partial" a failed copy after a queued forward is queued alone and the outcome still says forwarded."""
    d = DeliverySetup(tmp_path, bad={"alice@example.test"})
    [o] = d.deliver(Target("both@example.test", BOTH), requeue="partial")
    assert o.reply.is_positive and o.forwarded and o.queued
    forward, retry = d.outbox.queued
    assert forward["recipients"][0][0] == "far@example.org"
    assert retry["mailbox_only"] == {"alice@example.test"}


def test_two_recipients_one_mailbox_one_copy(d):
    """Two recipients reaching the same mailbox make one copy there."""
    team, alice = d.deliver(Target("team@example.test", TEAM), Target("alice@example.test", ALICE))
    assert team.reply.is_positive and alice.reply.is_positive
    assert d.events.count(("copy", "alice@example.test")) == 1
    assert len(d.messages("alice")) == 1
    assert len(d.messages("bob")) == 1


def test_two_recipients_one_failed_mailbox_queued_once(tmp_path):
    """With requeue="always", a failed mailbox reached by two recipients is queued once."""
    d = DeliverySetup(tmp_path, bad={"alice@example.test"})
    team, alice = d.deliver(Target("team@example.test", TEAM), Target("alice@example.test", ALICE),
                            requeue="always")
    assert team.reply.is_positive and alice.reply.is_positive
    [q] = d.outbox.queued
    assert [a for a, _o in q["recipients"]] == ["alice@example.test"]


def test_partial_shared_failed_mailbox_is_not_answered_twice(tmp_path):
    """With requeue="partial", a failed mailbox queued again for one recipient is not also left for another recipient's retry."""
    d = DeliverySetup(tmp_path, bad={"alice@example.test"})
    team, alice = d.deliver(Target("team@example.test", TEAM), Target("alice@example.test", ALICE),
                            requeue="partial")
    queued = {a for q in d.outbox.queued for a, _o in q["recipients"]}
    assert "alice@example.test" in queued  # the mailbox will get its copy from the queue
    assert alice.reply.is_positive  # so alice@ must not be retried by the client as well


def test_srs_sender_for_forwards_in_its_own_entry(tmp_path):
    """With SRS, forwards leave in a queue entry of their own with the rewritten sender; relayed mail keeps the original."""
    srs = SRS("secret", "example.test", clock=lambda: 1_800_000_000.0)
    d = DeliverySetup(tmp_path, srs=srs)
    relay, away = d.deliver(Target("r@example.org"), Target("away@example.test", AWAY),
                            reuse_id=True)
    assert relay.reply.is_positive and relay.queued and not relay.forwarded
    assert away.reply.is_positive and away.forwarded
    first, second = d.outbox.queued
    assert (first["sender"], first["queue_id"]) == ("x@example.net", "Q1")
    assert [a for a, _o in first["recipients"]] == ["r@example.org"]
    assert second["sender"].startswith("SRS0=") and second["sender"].endswith("@example.test")
    assert second["queue_id"] is None  # a new id for the second entry
    assert second["recipients"] == [("far@example.org", "rfc822;away@example.test")]
    assert srs.reverse(second["sender"]) == "x@example.net"


def test_srs_not_used_for_null_sender(tmp_path):
    """A bounce (null sender) is forwarded with the null sender, in one entry with relayed mail."""
    srs = SRS("secret", "example.test", clock=lambda: 1_800_000_000.0)
    d = DeliverySetup(tmp_path, srs=srs)
    d.deliver(Target("r@example.org"), Target("away@example.test", AWAY), sender="")
    [q] = d.outbox.queued
    assert q["sender"] == ""
    assert [a for a, _o in q["recipients"]] == ["r@example.org", "far@example.org"]


def test_without_outbox_forward_is_temporary(tmp_path):
    """Without a queue a forward is a temporary failure and the recipient gets no copy."""
    d = DeliverySetup(tmp_path, outbox=False)
    [o] = d.deliver(Target("both@example.test", BOTH))
    assert o.reply == R.FORWARD_UNAVAILABLE
    assert d.messages("alice") == []


def test_target_with_nothing_to_deliver_is_unknown(d):
    """A local target whose resolution has neither mailboxes nor forwards is 550 5.1.1."""
    [o] = d.deliver(Target("ghost@example.test", res("ghost@example.test")))
    assert o.reply == R.RCPT_UNKNOWN


def test_delivered_to_loop_at_data_time_is_that_recipients_554(d):
    """At the end of the data (LMTP: requeue="partial"), a Delivered-To naming a recipient's mailbox is a 554 5.4.6 for that recipient only."""
    d.content.write_bytes(b"Delivered-To: alice@example.test\r\nSubject: q\r\n\r\nbody\r\n")
    bob = res("bob@example.test", ["bob"])
    loop, ok = d.deliver(Target("alice@example.test", ALICE), Target("bob@example.test", bob))
    assert str(loop.reply).startswith("554 5.4.6") and not loop.queued
    assert ok.reply.is_positive and ok.local
    assert d.messages("alice") == []
    [msg] = d.messages("bob")
    assert msg.get_all("Delivered-To") == ["bob@example.test", "alice@example.test"]
