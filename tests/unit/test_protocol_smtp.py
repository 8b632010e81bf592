"""The SMTP/LMTP Twisted adapter, over an in-memory transport with a fake clock."""

import mailbox

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserver.delivery.local import LocalDelivery
from mailserver.delivery.recipients import RecipientDelivery
from mailserver.pipeline.acceptance import Acceptance
from mailserver.policy import RecipientPolicy
from mailserver.sansio.smtp_server import Limits, Mode
from mailserver.protocols.limits import ConnectionLimiter
from mailserver.protocols.smtp import ListenerContext, SMTPFactory
from mailserver.incoming import prepare_spool
from mailserver.store.maildir import MaildirStore
from mailserver.testing import FakeDirectory, ImmediateReactor, SynchronousThreadPool

USERS = {
    "alice@example.test": ("alice@example.test",),
    "bob@example.test": ("bob@example.test",),
    "team@example.test": ("alice@example.test", "bob@example.test"),
    "postmaster@example.test": ("alice@example.test",),
}


class BrokenStore:
    """A store whose deliveries to ``bad`` fail with ``error``."""

    def __init__(self, store, bad, error):
        self.store, self.bad, self.error = store, bad, error

    def maildir_for(self, mb):
        return self.store.maildir_for(mb)

    def deliver(self, mb, **kw):
        if mb.address == self.bad:
            raise self.error
        return self.store.deliver(mb, **kw)

    def deliver_bytes(self, mb, **kw):
        if mb.address == self.bad:
            raise self.error
        return self.store.deliver_bytes(mb, **kw)


class Harness:
    def __init__(self, tmp_path, mode=Mode.MX, limiter=None, store=None, outbox=None,
                 srs=None, etrn=False, checks=(), authenticator=None, **ctx):
        self.clock = Clock()
        self.directory = FakeDirectory(USERS)
        self.root = tmp_path / "mail"
        spool = tmp_path / "spool"
        prepare_spool(str(spool))
        self.store = MaildirStore(str(self.root), hostname="mx.example.test")
        delivery = LocalDelivery(store(self.store) if store else self.store,
                                 SynchronousThreadPool(), ImmediateReactor())
        self.outbox = outbox
        self.policy = RecipientPolicy(self.directory, ["example.test"], lmtp=mode is Mode.LMTP)
        kind = {Mode.MX: "smtp", Mode.LMTP: "lmtp", Mode.SUBMISSION: "submission"}[mode]
        self.pipeline = Acceptance(
            kind=kind, hostname="mx.example.test", recipients=self.policy, local=delivery,
            delivery=RecipientDelivery(delivery, outbox, srs, self.clock),
            spool_dir=str(spool), clock=self.clock, checks=checks, outbox=outbox, etrn=etrn,
            authenticator=authenticator)
        self.ctx = ListenerContext(
            mode=mode, kind=kind, hostname="mx.example.test", limits=Limits(max_recipients=5),
            pipeline=self.pipeline, clock=self.clock, dsn=outbox is not None,
            limiter=limiter or ConnectionLimiter(10, 10), **ctx,
        )
        self.factory = SMTPFactory(self.ctx)

    def connect(self, peer="192.0.2.7"):
        from twisted.internet.address import IPv4Address

        proto = self.factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", peer, 4321))
        proto.makeConnection(t)
        return proto, t

    def messages(self, local):
        path = self.root / "example.test" / local
        if not path.exists():
            return []
        return list(mailbox.Maildir(str(path), factory=None, create=False))


def replies(t):
    """Reply codes written so far, one per final reply line, then clear."""
    lines = t.value().decode().split("\r\n")
    t.clear()
    return [line[:3] + " " + line[4:9] for line in lines if len(line) > 3 and line[3] == " "]


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def test_message_delivered_before_250(h):
    """A message is in the maildir, with its trace headers, when 250 is sent."""
    p, t = h.connect()
    p.dataReceived(b"EHLO client.example\r\nMAIL FROM:<x@example.org>\r\n"
                   b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert replies(t)[-3:] == ["250 2.1.0", "250 2.1.5", "354 End d"]
    p.dataReceived(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
    out = t.value().decode()
    assert "250 2.0.0 Ok: queued as " in out
    [msg] = h.messages("alice")
    assert msg["Return-Path"] == "<x@example.org>"
    assert msg["Delivered-To"] == "alice@example.test"
    assert "by mx.example.test (mailserver) with ESMTP id" in msg["Received"]
    assert msg.get_payload() == "hello\n"


def test_pipelined_rcpts_wait_for_slow_lookups(h):
    """Replies keep command order while lookups are pending; input is paused."""
    h.directory.slow = True
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\n")
    t.clear()
    p.dataReceived(b"MAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nNOOP\r\n")
    assert replies(t) == ["250 2.1.0"]
    assert t.producerState == "paused"
    assert len(h.directory.pending) == 1
    h.directory.release(0)
    assert replies(t) == ["250 2.1.5"]
    assert len(h.directory.pending) == 2
    h.directory.release(1)
    assert replies(t) == ["550 5.1.1"]
    h.directory.release(2)
    assert replies(t) == ["250 2.1.5", "250 2.0.0"]
    assert t.producerState == "producing"


def test_directory_outage_is_temporary(h):
    """When the directory is down RCPT gets 451 4.4.3, and recovery needs no restart."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<>\r\n")
    t.clear()
    h.directory.down = True
    p.dataReceived(b"RCPT TO:<alice@example.test>\r\n")
    assert replies(t) == ["451 4.4.3"]
    h.directory.down = False
    p.dataReceived(b"RCPT TO:<alice@example.test>\r\n")
    assert replies(t) == ["250 2.1.5"]


def test_relay_refused(h):
    """Other domains, IP literals and source routes to them are refused as relaying."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    t.clear()
    for rcpt in (b"<a@example.org>", b"<a@[127.0.0.1]>", b"<@example.test:a@example.org>",
                 b"<a@EXAMPLE.test.example.org>"):
        p.dataReceived(b"RCPT TO:" + rcpt + b"\r\n")
        assert replies(t) == ["554 5.7.1"], rcpt


@pytest.mark.parametrize("rcpt", [b"<a%example.org@example.test>", b"<example.org!a@example.test>",
                                  b'<"a@example.org"@example.test>'])
def test_relay_tricks_are_unknown_users(h, rcpt):
    """Percent hack, bang path and quoted @ in a local domain are just unknown users."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    t.clear()
    p.dataReceived(b"RCPT TO:" + rcpt + b"\r\n")
    assert replies(t) == ["550 5.1.1"]


def test_bare_postmaster_accepted(h):
    """RCPT TO:<postmaster> reaches the first local domain's postmaster."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n")
    assert replies(t)[-1] == "250 2.1.5"


def test_group_delivers_one_copy_per_mailbox(h):
    """A group and one of its members as recipients give each mailbox one copy."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<team@example.test>\r\n"
                   b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    p.dataReceived(b"Subject: team\r\n\r\nhi all\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    assert len(h.messages("alice")) == 1
    assert len(h.messages("bob")) == 1


def test_idle_timeout(h):
    """An idle client gets 421 4.4.2 after the command timeout, measured on the clock."""
    p, t = h.connect()
    h.clock.advance(299)
    assert not t.disconnecting
    h.clock.advance(2)
    assert replies(t)[-1] == "421 4.4.2"
    assert t.disconnecting


def test_connection_limit_per_client(tmp_path):
    """A client over its connection limit gets 421 4.7.0 and is disconnected."""
    h = Harness(tmp_path, limiter=ConnectionLimiter(10, 1))
    p1, t1 = h.connect()
    p2, t2 = h.connect()
    assert replies(t2) == ["421 4.7.0"]
    assert t2.disconnecting
    p2.connectionLost(None)
    p1.connectionLost(None)
    p3, t3 = h.connect()
    assert replies(t3)[0].startswith("220")


def test_mail_loop_refused(h):
    """A message with more Received headers than allowed is refused with 554 5.4.6."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    p.dataReceived(b"Received: from a by b\r\n" * 51 + b"\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "554 5.4.6"
    assert h.messages("alice") == []


def test_lmtp_reply_per_recipient(tmp_path):
    """LMTP answers each recipient with its own delivery result, in RCPT order."""
    h = Harness(tmp_path, mode=Mode.LMTP,
                store=lambda s: BrokenStore(s, "bob@example.test", OSError(28, "No space")))
    p, t = h.connect()
    p.dataReceived(b"LHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<bob@example.test>\r\nRCPT TO:<team@example.test>\r\nDATA\r\n")
    t.clear()
    p.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert replies(t) == ["250 2.0.0", "452 4.3.1", "452 4.3.1"]
    assert len(h.messages("alice")) == 1


def test_internal_error_hides_details(tmp_path):
    """An unexpected exception in delivery is 451 4.3.0 with the queue id, no exception text."""
    h = Harness(tmp_path, store=lambda s: BrokenStore(s, "alice@example.test",
                                                      RuntimeError("secret detail")))
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    out = t.value().decode()
    assert "451 4.3.0 Internal error, try again later (" in out
    assert "secret" not in out


def test_full_write_buffer_stops_command_processing(h):
    """While the transport's buffer is full, pipelined commands wait, and reading
    stops once the unprocessed input passes HOLD_INPUT (not before: under TLS
    the buffer may wait for a handshake that needs reading)."""
    h.ctx.limits = Limits(max_recipients=5, max_junk_commands=0)  # 9000 EHLOs are junk
    p, t = h.connect()
    assert t.producer is p  # registered as the transport's streaming producer
    t.clear()
    p.pauseProducing()  # what Twisted does when the client stops reading
    assert t.producerState == "producing"
    p.dataReceived(b"EHLO c\r\n" * 1000)
    assert t.value() == b""
    p.dataReceived(b"EHLO c\r\n" * (p.HOLD_INPUT // 8))
    assert t.producerState == "paused"
    assert t.value() == b""
    p.resumeProducing()
    assert t.producerState == "producing"
    assert t.value().count(b"250 CHUNKING\r\n") == 1000 + p.HOLD_INPUT // 8


def test_byte_at_a_time_does_not_extend_the_timeout(h):
    """An unfinished command dribbled a byte at a time still times out (slowloris)."""
    p, t = h.connect()
    t.clear()
    for byte in b"NOOP NOOP NOOP":
        p.dataReceived(bytes([byte]))
        h.clock.advance(25)
        if t.disconnecting:
            break
    assert t.disconnecting
    assert replies(t) == ["421 4.4.2"]


def test_completed_commands_do_extend_the_timeout(h):
    """Each completed command restarts the idle timer."""
    p, t = h.connect()
    for _ in range(5):
        h.clock.advance(200)
        p.dataReceived(b"NOOP\r\n")
    assert not t.disconnecting


def test_lmtp_internal_error_answers_every_recipient(tmp_path, monkeypatch):
    """A failure before delivery in LMTP still gives one reply per recipient."""
    from mailserver import incoming

    h = Harness(tmp_path, mode=Mode.LMTP)

    def full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(incoming.IncomingMessage, "finish", full)
    p, t = h.connect()
    p.dataReceived(b"LHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RCPT TO:<bob@example.test>\r\nRCPT TO:<team@example.test>\r\nDATA\r\n")
    t.clear()
    p.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\nNOOP\r\n")
    assert replies(t) == ["452 4.3.1", "452 4.3.1", "452 4.3.1", "250 2.0.0"]


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("::ffff:192.0.2.7", "192.0.2.7"),
    ("unix", "unix"),
])
def test_client_key(ip, key):
    """Per-client limits count IPv4 addresses, IPv6 /64s, and UNIX peers together."""
    from mailserver.protocols.limits import client_key

    assert client_key(ip) == key


def test_unstorable_mailbox_refused_at_rcpt(h):
    """A directory entry whose address cannot map to a maildir is refused at RCPT, not after DATA."""
    h.directory.entries["weird@example.test"] = ("no-at-sign",)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    t.clear()
    p.dataReceived(b"RCPT TO:<weird@example.test>\r\n")
    assert replies(t) == ["550 5.2.0"]


def queue_harness(tmp_path, **kw):
    from mailserver.policy import Networks
    from mailserver.testing import RecordingOutbox

    h = Harness(tmp_path, outbox=RecordingOutbox(), etrn=True, **kw)
    h.policy.trusted = Networks(["192.0.2.0/24"])
    return h


def test_relay_from_trusted_network_is_queued(tmp_path):
    """A trusted client's remote recipients go to the queue, with DSN parameters, before 250."""
    h = queue_harness(tmp_path)
    p, t = h.connect("192.0.2.7")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.test> RET=HDRS ENVID=E1\r\n"
                   b"RCPT TO:<r@example.org> NOTIFY=FAILURE\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\nSubject: out\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [q] = h.outbox.queued
    assert q["recipients"] == [("r@example.org", "rfc822;r@example.org")]
    assert q["notify"] == {"r@example.org": ("FAILURE",)}
    assert (q["sender"], q["ret"], q["envid"]) == ("x@example.test", "HDRS", "E1")
    assert q["content"].startswith(b"Received: from c (unknown [192.0.2.7])")
    assert len(h.messages("alice")) == 1  # local copy delivered directly


def test_untrusted_client_cannot_relay(tmp_path):
    """Outside the trusted networks, remote recipients are still 554 5.7.1."""
    h = queue_harness(tmp_path)
    p, t = h.connect("198.51.100.1")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.test>\r\nRCPT TO:<r@example.org>\r\n")
    assert replies(t)[-1] == "554 5.7.1"


def test_failed_local_copy_is_queued_not_refused(tmp_path):
    """When one of several mailboxes fails now, it is queued and the client gets one 250."""
    h = queue_harness(tmp_path, store=lambda s: BrokenStore(s, "bob@example.test",
                                                           OSError(28, "No space")))
    p, t = h.connect("198.51.100.1")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<team@example.test>\r\n"
                   b"DATA\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [q] = h.outbox.queued
    assert q["recipients"] == [("bob@example.test", "rfc822;team@example.test")]
    assert q["mailbox_only"] == {"bob@example.test"}  # the retry is bob's mailbox alone
    assert len(h.messages("alice")) == 1


def test_queue_failure_is_temporary(tmp_path):
    """If the queue cannot take the message, the client gets a 4xx, never a 250."""
    h = queue_harness(tmp_path)
    h.outbox.fail = OSError(28, "No space")
    p, t = h.connect("192.0.2.7")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.test>\r\nRCPT TO:<r@example.org>\r\n"
                   b"DATA\r\nSubject: out\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "452 4.3.1"


def test_etrn(tmp_path):
    """ETRN from a trusted client flushes the domain; others are refused with 459."""
    h = queue_harness(tmp_path)
    p, t = h.connect("192.0.2.7")
    p.dataReceived(b"EHLO c\r\nETRN example.org\r\nETRN @other.example\r\nETRN #q\r\n")
    assert replies(t)[-3:] == ["250 2.0.0", "251 2.0.0", "458 4.3.0"]
    assert h.outbox.flushed == ["example.org", "other.example"]
    p2, t2 = h.connect("198.51.100.1")
    p2.dataReceived(b"EHLO c\r\nETRN example.org\r\n")
    assert replies(t2)[-1] == "459 4.7.1"


def test_forward_is_queued_with_its_original_recipient(tmp_path):
    """An address that forwards outside is queued for the forward, ORCPT naming the original."""
    h = queue_harness(tmp_path)
    h.directory.entries["fwd@example.test"] = ("alice@example.test", "far@example.org")
    p, t = h.connect("198.51.100.1")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<fwd@example.test>\r\n"
                   b"DATA\r\nSubject: f\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [q] = h.outbox.queued
    assert q["recipients"] == [("far@example.org", "rfc822;fwd@example.test")]
    assert len(h.messages("alice")) == 1


def test_srs_forwarding_and_bounce(tmp_path):
    """Forwarded copies leave with an SRS sender; a bounce to it goes back to the original."""
    from mailserver.srs import SRS

    srs = SRS("secret", "example.test", clock=lambda: 1_800_000_000.0)
    h = queue_harness(tmp_path, srs=srs)
    h.policy.srs = srs
    h.directory.entries["fwd@example.test"] = ("far@example.org",)
    p, t = h.connect("198.51.100.1")
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.net>\r\nRCPT TO:<fwd@example.test>\r\n"
                   b"DATA\r\nSubject: f\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [q] = h.outbox.queued
    assert q["sender"].startswith("SRS0=") and q["recipients"][0][0] == "far@example.org"
    bounce_to = q["sender"]
    p.dataReceived(b"MAIL FROM:<>\r\nRCPT TO:<" + bounce_to.encode() + b">\r\n"
                   b"RCPT TO:<SRS0=fake=AA=example.net=x@example.test>\r\n"
                   b"DATA\r\nSubject: bounce\r\n\r\nbody\r\n.\r\n")
    assert replies(t) == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "354 End d", "250 2.0.0"]
    assert h.outbox.queued[1]["recipients"][0][0] == "x@example.net"
    assert h.outbox.queued[1]["sender"] == ""


def aborted(t):
    return t.disconnected  # only StringTransport.abortConnection sets it


def unread_client(h):
    """A session whose client pipelines and never reads: the write buffer is full."""
    p, t = h.connect()
    p.pauseProducing()  # what Twisted does when the send buffer fills up
    p.dataReceived(b"EHLO c\r\n" * 100)
    return p, t


def test_timeout_aborts_a_client_that_never_reads(h):
    """After the timeout's 421, a connection that does not close within the grace period is
    aborted, so its connection slot is released."""
    p, t = unread_client(h)
    h.clock.advance(h.ctx.command_timeout + 1)
    assert replies(t)[-1] == "421 4.4.2"
    assert t.disconnecting and not aborted(t)
    assert t.producer is None  # a paused producer would be resumed instead of closing
    h.clock.advance(h.ctx.close_grace + 1)
    assert aborted(t)
    p.connectionLost(None)
    assert h.ctx.limiter.total == 0


def test_too_many_errors_aborts_a_client_that_never_reads(h):
    """The 421 for too many errors is followed by an abort when the client does not read."""
    p, t = unread_client(h)
    p.resumeProducing()
    t.clear()
    p.pauseProducing()
    p.dataReceived(b"BOGUS\r\n" * 30)
    p.resumeProducing()
    assert replies(t)[-1] == "421 4.7.0"
    assert t.disconnecting and not aborted(t)
    h.clock.advance(h.ctx.close_grace + 1)
    assert aborted(t)


def test_closed_connection_is_not_aborted(h):
    """A connection that closes normally after QUIT leaves no abort timer behind."""
    p, t = h.connect()
    p.dataReceived(b"QUIT\r\n")
    assert t.disconnecting
    p.connectionLost(None)
    assert h.clock.getDelayedCalls() == []
    assert not aborted(t)


def test_internal_error_reply_comes_after_earlier_replies(h, monkeypatch):
    """A bug while handling a pipelined command gives 421 after the replies already due."""
    from mailserver.sansio import smtp_events as ev
    from mailserver.protocols.smtp import SMTPServerProtocol

    def boom(self, event):
        raise RuntimeError("bug")

    monkeypatch.setitem(SMTPServerProtocol.HANDLERS, ev.MailFrom, boom)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\n")
    t.clear()
    p.dataReceived(b"NOOP\r\nMAIL FROM:<x@example.org>\r\n")
    assert replies(t) == ["250 2.0.0", "421 4.3.2"]
    assert t.disconnecting


def dsn_harness(tmp_path, **kw):
    """A harness queueing into a real spool, as the server does."""
    from mailserver.queue.spool import QueueSpool
    from mailserver.queue.outbox import Outbox

    spool = QueueSpool(str(tmp_path / "queue"))
    h = Harness(tmp_path, outbox=Outbox(spool, SynchronousThreadPool(), ImmediateReactor()),
                **kw)
    h.spool = spool
    return h


def queued_dsns(spool):
    """(envelope, parsed message) of every queued message."""
    import email

    out = []
    for _state, queue_id in spool.list():
        _, env = spool.load(queue_id)
        with open(spool.content_path(queue_id), "rb") as f:
            out.append((env, email.message_from_bytes(f.read())))
    return out


def test_notify_success_reports_delivery_at_data_time(tmp_path):
    """NOTIFY=SUCCESS on a recipient delivered at once queues a "delivered" DSN to the sender."""
    h = dsn_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org> ENVID=E7\r\n"
                   b"RCPT TO:<team@example.test> NOTIFY=SUCCESS,FAILURE\r\n"
                   b"RCPT TO:<bob@example.test>\r\n"
                   b"DATA\r\nSubject: tell me\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    [(env, dsn)] = queued_dsns(h.spool)
    assert env.sender == "" and [r.address for r in env.recipients] == ["x@example.org"]
    assert env.recipients[0].notify == ("NEVER",)
    assert dsn.get_content_type() == "multipart/report"
    status = dsn.get_payload()[1].as_string()
    assert status.count("Action: delivered") == 2  # team's two mailboxes; bob did not ask
    assert "Final-Recipient: rfc822; alice@example.test" in status
    assert status.count("Original-Recipient: rfc822; team@example.test") == 2
    assert "Original-Recipient: rfc822; bob@example.test" not in status
    assert "Original-Envelope-Id: E7" in status
    assert "Subject: tell me" in dsn.get_payload()[2].as_string()


@pytest.mark.parametrize("mail_from, notify", [
    (b"<>", b"NOTIFY=SUCCESS"),
    (b"<x@example.org>", b"NOTIFY=FAILURE,DELAY"),
    (b"<x@example.org>", b""),
])
def test_no_success_report_unless_asked(tmp_path, mail_from, notify):
    """No delivered DSN for a bounce, or when NOTIFY does not ask for SUCCESS."""
    h = dsn_harness(tmp_path)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:" + mail_from + b"\r\nRCPT TO:<alice@example.test> "
                   + notify + b"\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    assert queued_dsns(h.spool) == []


def test_failed_success_report_keeps_the_250(tmp_path, monkeypatch):
    """A DSN that cannot be queued is logged; the message was delivered and the client gets 250."""
    h = dsn_harness(tmp_path)

    def full(**kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h.outbox, "enqueue_dsn", full)
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test> "
                   b"NOTIFY=SUCCESS\r\nDATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n")
    assert replies(t)[-1] == "250 2.0.0"
    assert len(h.messages("alice")) == 1


def test_lmtp_success_report_only_for_delivered_recipients(tmp_path):
    """LMTP reports delivery for the recipients it answered 250, not the failed ones."""
    h = dsn_harness(tmp_path, mode=Mode.LMTP,
                    store=lambda s: BrokenStore(s, "bob@example.test", OSError(28, "No space")))
    p, t = h.connect()
    p.dataReceived(b"LHLO c\r\nMAIL FROM:<x@example.org>\r\n"
                   b"RCPT TO:<alice@example.test> NOTIFY=SUCCESS\r\n"
                   b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS\r\nDATA\r\n")
    t.clear()
    p.dataReceived(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert replies(t) == ["250 2.0.0", "452 4.3.1"]
    [(env, dsn)] = queued_dsns(h.spool)
    status = dsn.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; alice@example.test" in status
    assert "bob@example.test" not in status


@pytest.mark.parametrize("body, verb, eight_bit", [
    (None, "DATA", True),
    (None, "BDAT", True),
    ("7BIT", "DATA", True),
    ("7BIT", "BDAT", True),
    (None, "DATA", False),
    ("8BITMIME", "DATA", True),
])
def test_undeclared_8bit_content_is_queued_as_8bit(tmp_path, body, verb, eight_bit):
    """Content with 8-bit octets is queued as 8-bit whatever BODY= said, 7-bit content as declared."""
    h = queue_harness(tmp_path)
    p, t = h.connect("192.0.2.7")
    param = f" BODY={body}".encode() if body else b""
    text = "Subject: caf\u00e9\r\n\r\nna\u00efve\r\n".encode() if eight_bit \
        else b"Subject: plain\r\n\r\nbody\r\n"
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.test>" + param + b"\r\nRCPT TO:<r@example.org>\r\n")
    if verb == "DATA":
        p.dataReceived(b"DATA\r\n" + text[:20])
        p.dataReceived(text[20:] + b".\r\n")
    else:
        p.dataReceived(b"BDAT %d\r\n" % 20 + text[:20])
        p.dataReceived(b"BDAT %d LAST\r\n" % (len(text) - 20) + text[20:])
    assert replies(t)[-1] == "250 2.0.0"
    [q] = h.outbox.queued
    assert q["eight_bit"] is eight_bit


# --- issue 13 item 2: slow and repetitive clients -----------------------------

def test_noop_every_few_seconds_cannot_hold_a_session(h):
    """A NOOP every 10 seconds is cut off with 421 4.7.0 at the junk command limit."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\n")
    for _ in range(200):
        h.clock.advance(10)
        p.dataReceived(b"NOOP\r\n")
        if t.disconnecting:
            break
    assert t.disconnecting
    assert replies(t)[-1] == "421 4.7.0"


def trickle(h, p, t, rate, seconds):
    """Send message data at ``rate`` octets per second for up to ``seconds``."""
    for _ in range(seconds):
        p.dataReceived(b"x" * (rate - 2) + b"\r\n")
        h.clock.advance(1)
        if t.disconnecting:
            return


def test_slow_data_times_out(h):
    """Ten octets a second after DATA hit the minimum data rate: 421 4.4.2 in bounded time."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    t.clear()
    trickle(h, p, t, 10, 3600)
    assert t.disconnecting
    assert replies(t) == ["421 4.4.2"]
    assert h.clock.seconds() < 200


def test_data_at_the_minimum_rate_is_not_cut_off(h):
    """A client sending faster than min_data_rate keeps going well past data_timeout."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    trickle(h, p, t, 600, 600)
    assert not t.disconnecting
    p.dataReceived(b".\r\n")
    assert replies(t)[-1] == "250 2.0.0"


def test_slow_bdat_times_out(h):
    """The minimum data rate applies across BDAT chunks too."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n")
    t.clear()
    for _ in range(3600):
        p.dataReceived(b"BDAT 10\r\n01234567\r\n")
        h.clock.advance(1)
        if t.disconnecting:
            break
    assert t.disconnecting
    assert replies(t)[-1] == "421 4.4.2"
    assert h.clock.seconds() < 200


def test_connection_rate_limit(tmp_path):
    """Past connection_rate_limit connects a minute from one client: 421 4.7.0 at connect; others and the next minute are served."""
    from mailserver.protocols.limits import ConnectionRateLimiter

    h = Harness(tmp_path, rate_limiter=ConnectionRateLimiter(3))
    for _ in range(3):
        p, t = h.connect()
        assert replies(t)[0].startswith("220")
        p.dataReceived(b"QUIT\r\n")
        p.connectionLost(None)
    p, t = h.connect()
    assert replies(t) == ["421 4.7.0"] and t.disconnecting
    p.connectionLost(None)
    p, t = h.connect("198.51.100.9")
    assert replies(t)[0].startswith("220")
    h.clock.advance(61)
    p, t = h.connect()
    assert replies(t)[0].startswith("220")


def test_connection_rate_limiter_forgets_old_clients():
    """The rate limiter keeps no state for clients whose minute is over."""
    from mailserver.protocols.limits import ConnectionRateLimiter

    rl = ConnectionRateLimiter(2, window=60.0)
    for i in range(1000):
        assert rl.allow(f"10.0.{i // 256}.{i % 256}", now=float(i % 5))
    assert rl.allow("10.9.9.9", now=1000.0)
    assert len(rl) <= 2
    assert ConnectionRateLimiter(0).allow("x", now=0.0)


def test_trusted_networks_are_exempt_from_the_connection_rate_limit(tmp_path):
    """Clients in the exempt networks (relay.trusted_networks) are never rate limited."""
    from mailserver.policy import Networks
    from mailserver.protocols.limits import ConnectionRateLimiter

    h = Harness(tmp_path, rate_limiter=ConnectionRateLimiter(1, exempt=Networks(["192.0.2.0/24"])))
    for _ in range(5):
        p, t = h.connect("192.0.2.7")
        assert replies(t)[0].startswith("220")
        p.connectionLost(None)


def test_unix_socket_peers_are_exempt_from_the_connection_rate_limit():
    """Local processes on a UNIX socket (an LMTP feed) share one key and are never rate limited."""
    from mailserver.protocols.limits import ConnectionRateLimiter

    rl = ConnectionRateLimiter(1)
    assert all(rl.allow("unix", now=0.0, ip="unix") for _ in range(5))


def test_idle_timeout_after_a_slow_check_without_reply(tmp_path):
    """A HELO check that waits (its reply was sent already) leaves the idle
    timeout running once it answers: the client cannot sit there for ever."""
    from twisted.internet.defer import Deferred

    from mailserver.pipeline.acceptance import Check

    pending = []

    class SlowHelo(Check):
        async def on_helo(self, session):
            d = Deferred()
            pending.append(d)
            return await d

    h = Harness(tmp_path, checks=[SlowHelo()])
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\n")
    assert replies(t)[-1] == "250 CHUNK"  # the EHLO reply, before the check answers
    h.clock.advance(10)
    pending[0].callback(None)
    h.clock.advance(299)
    assert not t.disconnecting
    h.clock.advance(2)
    assert replies(t)[-1] == "421 4.4.2"
    assert t.disconnecting
