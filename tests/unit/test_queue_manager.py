"""The queue manager on a real spool, with scripted delivery targets and a fake clock."""

from __future__ import annotations

import email

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport
from mailserver.queue.manager import QueueManager, Schedule
from mailserver.queue.spool import QueueSpool
from mailserver.queue.outbox import enqueue_copy

TEMP = R.R(451, "4.3.0", "try later")
PERM = R.R(550, "5.1.1", "no such user")


class ScriptedTarget:
    """Answers each recipient from ``script`` (a list of replies per address, used in turn)."""

    def __init__(self, script):
        self.script = {k: list(v) for k, v in script.items()}
        self.calls = []
        self.bounces = []  # (recipients, parsed DSN) of messages from <>
        self.hold = None  # a Deferred to wait on before answering

    async def deliver(self, message):
        if message.sender == "":
            with open(message.content_path, "rb") as f:
                self.bounces.append(([r.address for r in message.recipients],
                                     email.message_from_bytes(f.read())))
        else:
            self.calls.append([r.address for r in message.recipients])
        if self.hold is not None:
            await self.hold
        replies = {}
        for r in message.recipients:
            queue = self.script.get(r.address, [R.OK])
            replies[r.address] = queue.pop(0) if len(queue) > 1 else queue[0]
        return DeliveryReport(replies=replies, remote="mx.example.org[192.0.2.1]:25")


class OneTargetRouter:
    def __init__(self, target):
        self.target = target

    async def group(self, message):
        return [(self.target, message.recipients[0].address.rpartition("@")[2], message)]


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    clock.advance(1_800_000_000)
    spool = QueueSpool(str(tmp_path / "queue"), clock=clock.seconds)
    src = tmp_path / "msg"
    src.write_bytes(b"Subject: test\r\nMessage-ID: <m1@example.test>\r\n\r\nbody\r\n")

    def submit(recipients, sender="alice@example.test", **kw):
        return enqueue_copy(spool, source_path=str(src), prefix=b"", sender=sender,
                            recipients=[(r, f"rfc822;{r}") for r in recipients],
                            arrival=clock.seconds(), **kw)

    return clock, spool, submit


def manager(spool, clock, target, **schedule):
    m = QueueManager(spool, OneTargetRouter(target), clock, hostname="mx.example.test",
                     schedule=Schedule(**schedule))
    m.startService()
    return m


def states(spool):
    return sorted((state, qid) for state, qid in spool.list())


def test_delivered_message_is_removed(env):
    """All recipients accepted: the message leaves the queue, nothing else is sent."""
    clock, spool, submit = env
    submit(["r@example.org"])
    target = ScriptedTarget({})
    m = manager(spool, clock, target)
    clock.advance(0)
    assert target.calls == [["r@example.org"]]
    assert states(spool) == []
    m.stopService()


def test_temporary_failure_backs_off_then_succeeds(env):
    """A 4xx defers with doubling backoff; the retry happens on time and completes."""
    clock, spool, submit = env
    qid = submit(["r@example.org"])
    target = ScriptedTarget({"r@example.org": [TEMP, TEMP, R.OK]})
    m = manager(spool, clock, target, min_backoff=300, max_backoff=3600)
    clock.advance(0)
    assert states(spool) == [("deferred", qid)]
    _s, e = spool.load(qid)
    assert e.next_attempt == clock.seconds() + 300
    assert "451 4.3.0 try later" in e.last_error
    clock.advance(299)
    assert len(target.calls) == 1
    clock.advance(1)
    assert len(target.calls) == 2
    assert spool.load(qid)[1].next_attempt == clock.seconds() + 600
    clock.advance(600)
    assert len(target.calls) == 3
    assert states(spool) == []
    m.stopService()


def test_permanent_failure_bounces_to_sender(env):
    """A 5xx recipient produces an RFC 3464 DSN from <> to the sender; others are delivered."""
    clock, spool, submit = env
    qid = submit(["good@example.org", "bad@example.org"], envid="ENV1")
    target = ScriptedTarget({"bad@example.org": [PERM]})
    m = manager(spool, clock, target)
    clock.advance(0)
    [(to, dsn)] = target.bounces
    assert to == ["alice@example.test"]
    assert dsn.get_content_type() == "multipart/report"
    status = dsn.get_payload()[1].get_payload()
    text = "\n".join(str(p) for p in status)
    assert "Final-Recipient: rfc822; bad@example.org" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in text
    assert qid not in [q for _s, q in spool.list()]
    m.stopService()


def test_never_bounce_a_bounce(env):
    """A failed message from the null sender disappears without a DSN."""
    clock, spool, submit = env
    submit(["bad@example.org"], sender="")
    target = ScriptedTarget({"bad@example.org": [PERM]})
    m = manager(spool, clock, target)
    clock.advance(0)
    assert states(spool) == []
    assert [to for to, _ in target.bounces] == [["bad@example.org"]]  # the original only
    m.stopService()


def test_expiry_bounces_pending_recipients(env):
    """Past the lifetime, still-deferred recipients bounce: Status 4.4.7 (RFC
    3463 delivery time expired) with the last real reply and its host."""
    clock, spool, submit = env
    submit(["slow@example.org"])
    target = ScriptedTarget({"slow@example.org": [TEMP]})
    m = manager(spool, clock, target, min_backoff=3600, max_backoff=3600, lifetime=3 * 3600)
    for _ in range(4):
        clock.advance(3600)
    [(_to, dsn)] = target.bounces
    text = str(dsn.get_payload()[1])
    assert "Action: failed" in text and "Status: 4.4.7" in text
    assert "Diagnostic-Code: smtp; 451 4.3.0 try later" in text
    assert "Remote-MTA: dns; mx.example.org" in text
    assert states(spool) == []
    m.stopService()


def test_notify_never_and_delay_warning(env):
    """NOTIFY=NEVER suppresses the DSN; a delay warning is sent once when enabled."""
    clock, spool, submit = env
    submit(["quiet@example.org"], notify={"quiet@example.org": ("NEVER",)})
    submit(["late@example.org"])
    target = ScriptedTarget({"quiet@example.org": [PERM], "late@example.org": [TEMP]})
    m = manager(spool, clock, target, delay_warning=600, min_backoff=300)
    clock.advance(0)
    assert target.bounces == []
    clock.advance(300)
    clock.advance(600)
    clock.advance(1200)
    delays = target.bounces
    assert len(delays) == 1
    assert "Action: delayed" in str(delays[0][1].get_payload()[1])
    m.stopService()


def test_crashing_target_is_temporary(env):
    """An exception from a target defers the message; it is never lost or bounced."""
    clock, spool, submit = env
    qid = submit(["r@example.org"])

    class Broken:
        async def deliver(self, message):
            raise RuntimeError("boom")

    m = manager(spool, clock, Broken())
    clock.advance(0)
    assert states(spool) == [("deferred", qid)]
    m.stopService()


def test_active_set_is_bounded(env):
    """No more than max_active messages are in delivery at once."""
    clock, spool, submit = env
    for i in range(5):
        submit([f"r{i}@example.org"])
    target = ScriptedTarget({})
    target.hold = defer.Deferred()
    m = manager(spool, clock, target, max_active=2)
    clock.advance(0)
    assert len(target.calls) == 2
    assert sum(1 for s, _ in spool.list() if s == "active") == 2
    d, target.hold = target.hold, None
    d.callback(None)
    clock.advance(0)
    clock.advance(0)
    assert len(target.calls) == 5
    m.stopService()


def test_destination_concurrency_limit(env):
    """Messages to one domain share destination_concurrency slots; the
    bookkeeping for a destination goes once it is idle."""
    clock, spool, submit = env
    for i in range(4):
        submit([f"r{i}@example.org"])
    target = ScriptedTarget({})
    target.hold = defer.Deferred()
    m = manager(spool, clock, target, max_active=4, destination_concurrency=1)
    clock.advance(0)
    assert len(m.active) == 4
    assert len(target.calls) == 1  # the other three wait for the slot
    d, target.hold = target.hold, None
    d.callback(None)
    clock.advance(0)
    assert len(target.calls) == 4
    assert m._semaphores == {}
    assert states(spool) == []
    m.stopService()


def test_recovery_after_crash_redelivers(env):
    """A message left in active/ by a crash is delivered after restart (duplicates allowed)."""
    clock, spool, submit = env
    qid = submit(["r@example.org"])
    spool.move(qid, "active")
    target = ScriptedTarget({})
    m = manager(spool, clock, target)
    clock.advance(0)
    assert target.calls == [["r@example.org"]]
    assert states(spool) == []
    m.stopService()


def test_backoff_never_overflows():
    """Flushes count as attempts, so attempts can grow past 1024."""
    assert Schedule().backoff(5000) == Schedule().max_backoff


def test_failed_save_is_held_and_delivered_recipients_are_not_repeated(env, monkeypatch):
    """A full disk while saving the outcome: the message waits a backoff (no
    hot loop) and the recipient already delivered is not sent again."""
    import errno

    clock, spool, submit = env
    submit(["ok@example.org", "later@example.org"])
    target = ScriptedTarget({"later@example.org": [TEMP, R.OK]})
    real_save = spool.save
    calls = {"n": 0}

    def full_disk(*a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a)

    monkeypatch.setattr(spool, "save", full_disk)
    m = manager(spool, clock, target, min_backoff=300)
    clock.advance(0)
    assert target.calls == [["ok@example.org", "later@example.org"]]
    for _ in range(5):
        clock.advance(1)
    assert len(target.calls) == 1  # held, not retried at once
    clock.advance(300)
    assert target.calls[1:] == [["later@example.org"]]
    assert states(spool) == []
    m.stopService()


def test_failed_scan_is_retried(env, monkeypatch):
    """A listing that fails (EMFILE) does not stop the queue: the next scan
    is still planned."""
    import errno

    clock, spool, submit = env
    submit(["r@example.org"])
    real_list = spool.list
    failures = [OSError(errno.EMFILE, "Too many open files")]

    def flaky(*a):
        if failures:
            raise failures.pop()
        return real_list(*a)

    target = ScriptedTarget({})
    m = manager(spool, clock, target, scan_interval=60)
    monkeypatch.setattr(spool, "list", flaky)
    clock.advance(0)
    assert target.calls == []
    clock.advance(60)
    assert target.calls == [["r@example.org"]]
    m.stopService()


def test_io_error_reading_an_envelope_is_not_corruption(env, monkeypatch):
    """EMFILE/EIO while loading is a reason to wait, never to quarantine."""
    import errno

    clock, spool, submit = env
    qid = submit(["r@example.org"])
    real_load = spool.load
    failures = [OSError(errno.EIO, "Input/output error")]

    def flaky(queue_id):
        if failures:
            raise failures.pop()
        return real_load(queue_id)

    monkeypatch.setattr(spool, "load", flaky)
    target = ScriptedTarget({})
    m = manager(spool, clock, target, min_backoff=300)
    clock.advance(0)
    assert states(spool) == [("deferred", qid)]
    clock.advance(300)
    assert target.calls == [["r@example.org"]]
    assert states(spool) == []
    m.stopService()


def test_no_delivery_starts_after_stop(env):
    """A scan whose claim comes back after stopService starts nothing: the
    claimed message stays in active/ for recover() at the next start."""
    clock, spool, submit = env
    qid = submit(["r@example.org"])
    gate = []

    def io(f, *a):
        if f.__name__ == "_claim_due":
            d = defer.Deferred()
            gate.append((d, f, a))
            return d
        return defer.maybeDeferred(f, *a)

    target = ScriptedTarget({})
    m = QueueManager(spool, OneTargetRouter(target), clock, hostname="mx.example.test", io=io)
    m.startService()
    clock.advance(0)
    [(d, f, a)] = gate
    assert m.stopService() is None  # nothing active yet
    d.callback(f(*a))
    assert target.calls == []
    assert states(spool) == [("active", qid)]


def test_failure_records_of_vanished_messages_are_dropped(env, monkeypatch):
    """A message deleted while held leaves no record behind for long."""
    import errno

    clock, spool, submit = env
    qid = submit(["r@example.org"])
    real_load = spool.load
    monkeypatch.setattr(spool, "load", lambda i: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error")))
    m = manager(spool, clock, ScriptedTarget({}), min_backoff=300, lifetime=3600)
    clock.advance(0)
    assert qid in m._held
    monkeypatch.setattr(spool, "load", real_load)
    spool.delete(qid)
    clock.advance(3600 + 600)
    assert m._held == {} and m._unsaved == {}
    m.stopService()


def test_forwarded_recipient_is_retried_mailbox_only(env):
    """A local target that queued a recipient's forwards but must retry its
    copy: the saved envelope marks it mailbox_only."""
    clock, spool, submit = env
    qid = submit(["both@example.test"])

    class Target:
        async def deliver(self, message):
            return DeliveryReport(replies={"both@example.test": TEMP}, remote="local",
                                  forwarded=frozenset({"both@example.test"}))

    m = manager(spool, clock, Target())
    clock.advance(0)
    _state, env_ = spool.load(qid)
    assert env_.recipients[0].mailbox_only
    m.stopService()


# -- undeliverable bounces reach the postmaster (issue 13, item 9) -----------------------

def pm_manager(spool, clock, target, **schedule):
    m = QueueManager(spool, OneTargetRouter(target), clock, hostname="mx.example.test",
                     schedule=Schedule(**schedule), postmaster="postmaster@example.test")
    m.startService()
    return m


@pytest.fixture
def logged():
    from twisted.logger import globalLogPublisher

    lines = []

    def observer(event):
        from twisted.logger import formatEvent

        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def notices(target):
    return [(to, msg) for to, msg in target.bounces if to == ["postmaster@example.test"]]


@pytest.mark.parametrize("how", ["refused", "expired"])
def test_undeliverable_bounce_notifies_the_postmaster(env, logged, how):
    """A message from <> that fails for good (refused or expired) brings the
    postmaster a short notice from <> with the bounce's header attached."""
    clock, spool, submit = env
    qid = submit(["bad@example.org"], sender="")
    target = ScriptedTarget({"bad@example.org": [PERM if how == "refused" else TEMP]})
    m = pm_manager(spool, clock, target, min_backoff=3600, max_backoff=3600, lifetime=3 * 3600)
    for _ in range(1 if how == "refused" else 4):
        clock.advance(0 if how == "refused" else 3600)
    [(_to, notice)] = notices(target)
    assert notice["Subject"] == "Undeliverable bounce"
    assert notice["From"].endswith("<MAILER-DAEMON@mx.example.test>")
    assert notice["To"] == "postmaster@example.test"
    assert notice["Auto-Submitted"] == "auto-generated"
    text, headers = notice.get_payload()
    assert "<bad@example.org>" in text.get_payload(decode=True).decode()
    assert qid in text.get_payload(decode=True).decode()
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <m1@example.test>" in headers.get_payload(decode=True).decode()
    assert "body" not in headers.get_payload(decode=True).decode()
    assert states(spool) == []
    assert any("undeliverable bounce" in l and "postmaster@example.test" in l for l in logged)
    m.stopService()


def test_postmaster_notice_that_fails_is_dropped_with_a_log_line(env, logged):
    """A notice to the postmaster that fails is dropped and logged, never noticed again."""
    clock, spool, submit = env
    submit(["bad@example.org"], sender="")
    target = ScriptedTarget({"bad@example.org": [PERM], "postmaster@example.test": [PERM]})
    m = pm_manager(spool, clock, target)
    clock.advance(0)
    clock.advance(0)
    assert len(notices(target)) == 1
    assert len(target.bounces) == 2  # the bounce and one notice, nothing more
    assert states(spool) == []
    assert any("postmaster notice" in l and "dropped" in l for l in logged)
    m.stopService()


def test_a_forwarded_copy_of_a_notice_is_never_noticed_again(env, tmp_path):
    """A copy of a notice (marked in its header) that fails is dropped: no notice loops."""
    clock, spool, submit = env
    marked = tmp_path / "notice"
    marked.write_bytes(b"X-Mailserver-Notice: undeliverable-bounce\r\nSubject: x\r\n\r\nhi\r\n")
    enqueue_copy(spool, source_path=str(marked), prefix=b"", sender="",
                 recipients=[("pm@elsewhere.example", None)], arrival=clock.seconds())
    target = ScriptedTarget({"pm@elsewhere.example": [PERM]})
    m = pm_manager(spool, clock, target)
    clock.advance(0)
    assert notices(target) == [] and states(spool) == []
    m.stopService()


def test_an_ordinary_failure_is_not_a_postmaster_notice(env):
    """Only undeliverable bounces go to the postmaster; a sender's own failure bounces to them."""
    clock, spool, submit = env
    submit(["bad@example.org"])
    target = ScriptedTarget({"bad@example.org": [PERM]})
    m = pm_manager(spool, clock, target)
    clock.advance(0)
    assert [to for to, _ in target.bounces] == [["alice@example.test"]]
    m.stopService()
