"""The POP3 Twisted adapter, over an in-memory transport with a fake clock,
a real maildir and the real maildrop."""

import os

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mailserver.directory.cred import DirectoryChecker
from mailserver.directory.interfaces import Mailbox
from mailserver.pipeline.auth import Authenticator
from mailserver.protocols.limits import ConnectionLimiter
from mailserver.protocols.pop3 import POP3Context, POP3Factory
from mailserver.store.maildir import MaildirStore
from mailserver.store.maildrop import Maildrop
from mailserver.testing import FakeDirectory
from mailserver.throttle import LoginThrottle

ALICE = Mailbox(address="alice@example.test", login="alice@example.test")


class Harness:
    def __init__(self, tmp_path, **ctx):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
        self.directory = FakeDirectory(passwords={"alice@example.test": "secret"})
        self.opened = []
        self.updates = []

        def open_maildrop(path):
            drop = Maildrop.open(path)
            self.opened.append(drop)
            real_update = drop.update

            def update(deleted, retrieved):
                self.updates.append((tuple(deleted), tuple(retrieved)))
                return real_update(deleted, retrieved)

            drop.update = update
            return drop

        self.ctx = POP3Context(
            name="pop3", hostname="mx.example.test", clock=self.clock,
            limiter=ConnectionLimiter(10, 10),
            authenticator=Authenticator(DirectoryChecker(self.directory),
                                        LoginThrottle(self.clock), self.directory, self.clock),
            store=self.store, io=lambda f, *a: defer.maybeDeferred(f, *a),
            open_maildrop=open_maildrop, plaintext_auth=True, **ctx)
        self.factory = POP3Factory(self.ctx)

    def deliver(self, body: bytes) -> str:
        src = self.store.root + ".src"
        with open(src, "wb") as f:
            f.write(body)
        return self.store.deliver(ALICE, sender="x@example.org", source_path=src)

    def connect(self):
        proto = self.factory.buildProtocol(None)
        t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4321))
        proto.makeConnection(t)
        return proto, t

    def maildir(self):
        return self.store.maildir_for(ALICE)


def lines(t):
    """Responses so far (a pull producer registered for RETR is run dry first), then clear."""
    while t.producer is not None and not t.streaming:
        t.producer.resumeProducing()
    out = t.value().decode().split("\r\n")
    t.clear()
    return out


@pytest.fixture
def h(tmp_path):
    return Harness(tmp_path)


def login(p, t):
    p.dataReceived(b"USER alice@example.test\r\nPASS secret\r\n")
    out = lines(t)
    assert out[-2].startswith("+OK"), out
    return out


def test_login_retr_and_quit_apply_deletions(h):
    """RETR streams the stored message dot-stuffed with CRLF; DELE then QUIT removes it."""
    h.deliver(b"Subject: one\r\n\r\n.starts with a dot\r\nend\r\n")
    h.deliver(b"Subject: two\r\n\r\nbody\r\n")
    p, t = h.connect()
    assert lines(t)[0].startswith("+OK")
    login(p, t)
    p.dataReceived(b"RETR 1\r\n")
    out = lines(t)
    assert out[0].startswith("+OK")
    assert "..starts with a dot" in out and out[-2:] == [".", ""]
    p.dataReceived(b"DELE 2\r\nQUIT\r\n")
    out = lines(t)
    assert out[0].startswith("+OK") and out[1].startswith("+OK")
    assert t.disconnecting
    assert h.updates == [((1,), (0,))]
    assert len(os.listdir(os.path.join(h.maildir(), "cur"))) == 1
    assert os.listdir(os.path.join(h.maildir(), "cur"))[0].endswith(":2,S")


def test_dropped_connection_deletes_nothing_and_unlocks(h):
    """A connection lost after DELE applies nothing and releases the lock."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    p.dataReceived(b"DELE 1\r\n")
    p.connectionLost(None)
    assert h.updates == []
    assert len(os.listdir(os.path.join(h.maildir(), "new"))) == 1
    p2, t2 = h.connect()
    login(p2, t2)  # the lock was released


def test_second_session_is_refused_in_use(h):
    """While one session holds the maildrop, another login gets -ERR [IN-USE]."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    p2, t2 = h.connect()
    p2.dataReceived(b"USER alice@example.test\r\nPASS secret\r\n")
    assert lines(t2)[-2].startswith("-ERR [IN-USE]")
    p.dataReceived(b"QUIT\r\n")
    p2.dataReceived(b"USER alice@example.test\r\nPASS secret\r\n")
    assert lines(t2)[-2].startswith("+OK")


def test_wrong_password_waits_then_auth_error(h):
    """A wrong password is -ERR [AUTH] after the throttle's delay, and the session goes on."""
    p, t = h.connect()
    lines(t)
    p.dataReceived(b"USER alice@example.test\r\nPASS wrong\r\n")
    assert not any(line.startswith("-ERR") for line in lines(t))  # not before the delay
    h.clock.advance(2.0)
    out = lines(t)
    assert out[-2].startswith("-ERR [AUTH]")
    p.dataReceived(b"USER nobody@example.test\r\nPASS wrong\r\n")
    h.clock.advance(4.0)
    assert lines(t)[-2] == out[-2]  # unknown user: the same line


def test_directory_outage_is_sys_temp(h):
    """A directory that cannot answer gives -ERR [SYS/TEMP], never [AUTH]."""
    h.directory.down = True
    p, t = h.connect()
    lines(t)
    p.dataReceived(b"USER alice@example.test\r\nPASS secret\r\n")
    assert lines(t)[-2].startswith("-ERR [SYS/TEMP]")


def test_idle_timeout_closes_without_update(h):
    """After the idle timeout the session closes and marked deletions are not applied."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    p.dataReceived(b"DELE 1\r\n")
    h.clock.advance(h.ctx.idle_timeout + 1)
    assert t.disconnecting
    p.connectionLost(None)
    assert h.updates == []
    assert len(os.listdir(os.path.join(h.maildir(), "new"))) == 1


def test_top_sends_headers_and_lines(h):
    """TOP n sends the header, the blank line and n body lines only."""
    h.deliver(b"Subject: one\r\n\r\nl1\r\nl2\r\nl3\r\n")
    p, t = h.connect()
    login(p, t)
    p.dataReceived(b"TOP 1 1\r\n")
    out = lines(t)
    assert out[0].startswith("+OK")
    assert "l1" in out and "l2" not in out
    assert out[-2:] == [".", ""]


def test_pipelined_commands_keep_order_around_retr(h):
    """Commands pipelined behind a RETR are answered after the whole message."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    p.dataReceived(b"RETR 1\r\nNOOP\r\nSTAT\r\n")
    out = lines(t)
    dot = out.index(".")
    assert out[dot + 1].startswith("+OK") and out[dot + 2].startswith("+OK 1 ")


class PullingTransport(StringTransport):
    """Pulls a registered pull producer at once, as a real TCP transport may
    (inside registerProducer)."""

    def registerProducer(self, producer, streaming):
        super().registerProducer(producer, streaming)
        while not streaming and self.producer is producer:
            producer.resumeProducing()


@pytest.mark.parametrize("command", [b"TOP 1 0", b"RETR 1"])
def test_message_sent_inside_register_producer(h, command):
    """A message the transport pulls whole inside registerProducer (TOP n 0,
    a small RETR) is answered and the session goes on."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    proto = h.factory.buildProtocol(None)
    t = PullingTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4321))
    proto.makeConnection(t)
    login(proto, t)
    proto.dataReceived(command + b"\r\nNOOP\r\n")
    out = lines(t)
    assert out[0].startswith("+OK") and "." in out
    assert out[out.index(".") + 1].startswith("+OK")
    assert not t.disconnecting


@pytest.mark.parametrize("transport", [StringTransport, PullingTransport])
def test_large_message_is_streamed_whole(h, transport):
    """A message over one read (200 KiB) is streamed chunk by chunk, dot-stuffed, complete."""
    body = b"".join(b".line %06d " % i + b"x" * 60 + b"\r\n" for i in range(3000))
    h.deliver(b"Subject: big\r\n\r\n" + body)
    proto = h.factory.buildProtocol(None)
    t = transport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4321))
    proto.makeConnection(t)
    login(proto, t)
    proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    out = lines(t)
    assert out.count("..line 002999 " + "x" * 60) == 1
    assert sum(1 for line in out if line.startswith("..line ")) == 3000
    assert out[out.index(".") + 1].startswith("+OK")


def count_io(h):
    """Record the functions sent to the worker threads from now on."""
    sent = []
    real_io = h.ctx.io

    def io(f, *args):
        sent.append(getattr(f, "__name__", f))
        return real_io(f, *args)

    h.ctx.io = io
    return sent


def test_small_message_answered_without_worker_thread(h):
    """A message of one read is read and sent at once; a larger one, or one
    another reader moved, goes through a worker thread, and all arrive whole."""
    h.deliver(b"Subject: one\r\n\r\n.dot\r\nend\r\n")
    h.deliver(b"Subject: big\r\n\r\n" + b"y" * 100 + b"\r\n" * 1000 + b"x" * 70000 + b"\r\n")
    h.deliver(b"Subject: three\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    sent = count_io(h)
    p.dataReceived(b"RETR 1\r\n")
    assert t.value().endswith(b"..dot\r\nend\r\n.\r\n") and sent == []
    lines(t)
    p.dataReceived(b"RETR 2\r\n")
    out = lines(t)
    assert out[-2:] == [".", ""] and "x" * 70000 in out and sent == ["_open_and_read"]
    new = os.path.join(h.maildir(), "new")
    name = sorted(os.listdir(new))[-1]
    os.rename(os.path.join(new, name), os.path.join(h.maildir(), "cur", name + ":2,F"))
    p.dataReceived(b"RETR 3\r\nTOP 1 0\r\n")
    out = lines(t)
    assert "body" in out and out.count(".") == 2 and sent == ["_open_and_read"] * 2


def test_quit_with_nothing_to_change_needs_no_worker_thread(h):
    """QUIT applies its changes in a worker thread, unless there are none
    (everything already in cur/ and seen, nothing deleted)."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    for expected in (["update"], []):
        p, t = h.connect()
        login(p, t)
        sent = count_io(h)
        p.dataReceived(b"RETR 1\r\nQUIT\r\n")
        assert lines(t)[-2] == "+OK Bye" and t.disconnecting
        assert sent == expected
        p.connectionLost(None)
        h.ctx.io = lambda f, *a: defer.maybeDeferred(f, *a)
    assert h.updates == [((), (0,)), ((), (0,))]
    assert os.listdir(os.path.join(h.maildir(), "cur"))[0].endswith(":2,S")


def test_activity_postpones_the_idle_timeout(h):
    """The idle timeout counts from the last command, with one timer per session."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = h.connect()
    login(p, t)
    timers = len(h.clock.getDelayedCalls())
    for _ in range(20):
        h.clock.advance(h.ctx.idle_timeout / 2)
        p.dataReceived(b"STAT\r\n")
    assert len(h.clock.getDelayedCalls()) == timers
    assert not t.disconnecting
    h.clock.advance(h.ctx.idle_timeout - 1)
    assert not t.disconnecting
    h.clock.advance(1)
    assert t.disconnecting and lines(t)[-2].startswith("-ERR [SYS/TEMP] Idle")


def test_idle_timeout_after_a_streamed_message(h):
    """The idle timer runs again once a streamed message has been sent."""
    h.deliver(b"Subject: big\r\n\r\n" + b"x" * 70000 + b"\r\n")
    p, t = h.connect()
    login(p, t)
    p.dataReceived(b"RETR 1\r\n")
    h.clock.advance(h.ctx.idle_timeout * 2)  # the client is not reading
    assert not t.disconnecting
    assert lines(t)[-2] == "."
    h.clock.advance(h.ctx.idle_timeout)
    assert t.disconnecting


def test_full_write_buffer_holds_pipelined_commands(h):
    """While the write buffer is full (the client stops reading), pipelined
    RETRs wait unanswered, reading stops once HOLD_INPUT octets wait, and all
    are answered in order when there is room again."""
    h.deliver(b"Subject: one\r\n\r\nbody\r\n")
    h.deliver(b"Subject: big\r\n\r\n" + b"x" * 70000 + b"\r\n")
    p, t = h.connect()
    login(p, t)
    assert t.producer is p and t.streaming
    p.pauseProducing()  # what Twisted does when the buffer passes its size
    p.dataReceived(b"RETR 1\r\n" * 100)
    assert t.value() == b"" and t.producerState == "producing"
    p.dataReceived(b"STAT\r\n" * (p.HOLD_INPUT // 6))
    assert t.producerState == "paused"
    p.resumeProducing()
    assert t.producerState == "producing"
    out = lines(t)
    assert out.count("body") == 100 and out[-2].startswith("+OK 2 ")
    p.dataReceived(b"RETR 2\r\n")
    assert t.producer is not p  # the long message is pulled
    out = lines(t)
    assert out[-2] == "." and t.producer is p and t.streaming


def test_connection_rate_limit(tmp_path):
    """Past connection_rate_limit connects a minute from one client, POP3 says -ERR [SYS/TEMP] at connect and closes."""
    from mailserver.protocols.limits import ConnectionRateLimiter

    h = Harness(tmp_path, rate_limiter=ConnectionRateLimiter(2))
    for _ in range(2):
        p, t = h.connect()
        assert lines(t)[0].startswith("+OK")
        p.connectionLost(None)
    p, t = h.connect()
    assert lines(t)[0].startswith("-ERR [SYS/TEMP]") and t.disconnecting
    p.connectionLost(None)
    h.clock.advance(61)
    p, t = h.connect()
    assert lines(t)[0].startswith("+OK")


def spy_reads(h, p):
    """The indexes ``read_small`` is asked for, from now on."""
    asked = []
    drop = p.maildrop
    real = drop.read_small

    def read_small(index, limit):
        asked.append(index)
        return real(index, limit)

    drop.read_small = read_small
    return asked


def test_next_message_is_read_ahead_after_a_retr(h):
    """After RETR n the next small message is read and stuffed at once, and
    RETR n+1 sends exactly what RETR would have read; nothing is read past
    the last message, and a second session reads the same octets."""
    bodies = [b"Subject: %d\n\n.dot %d\nend\n" % (i, i) for i in range(3)]
    for body in bodies:
        h.deliver(body.replace(b"\n", b"\r\n"))
    p, t = h.connect()
    login(p, t)
    asked = spy_reads(h, p)
    got = []
    for n in (1, 2, 3):
        p.dataReceived(b"RETR %d\r\n" % n)
        got.append(t.value())
        t.clear()
    assert asked == [0, 1, 2]  # RETR 1 read 0 then 1 ahead, RETR 2 read 2 ahead, RETR 3 none
    for n, out in enumerate(got):
        assert out.startswith(b"+OK ") and out.endswith(b"\r\n..dot %d\r\nend\r\n.\r\n" % n)
    p.dataReceived(b"QUIT\r\n")
    p.connectionLost(None)
    assert sorted(h.updates[0][1]) == [0, 1, 2]
    p, t = h.connect()  # backwards: every message read when asked for, no read-ahead
    login(p, t)
    asked = spy_reads(h, p)
    for n in (3, 2, 1):
        p.dataReceived(b"RETR %d\r\n" % n)
        assert t.value() == got[n - 1]
        t.clear()
    assert asked == [2, 1, 0]


def test_read_ahead_is_not_used_for_other_commands(h):
    """A read-ahead message deleted before its RETR is refused; TOP of it and
    a RETR out of order get their own answers."""
    for i in range(4):
        h.deliver(b"Subject: %d\r\n\r\nline one %d\r\nline two\r\n" % (i, i))
    p, t = h.connect()
    login(p, t)
    asked = spy_reads(h, p)
    p.dataReceived(b"RETR 1\r\nTOP 2 1\r\n")
    out = lines(t)
    assert "line two" not in out[out.index("Subject: 1"):], out
    assert "line one 1" in out
    p.dataReceived(b"DELE 2\r\nRETR 2\r\nRETR 4\r\n")
    out = lines(t)
    assert out[0].startswith("+OK") and out[1].startswith("-ERR"), out
    assert "line one 3" in out and out[-2:] == [".", ""]
    assert asked == [0, 1, 1, 3]  # RETR 1 + ahead, TOP 2 read anew, RETR 4 (last: no ahead)
    p.dataReceived(b"QUIT\r\n")
    assert sorted(h.updates[0][1]) == [0, 3] and h.updates[0][0] == (1,)
