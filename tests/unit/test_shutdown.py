"""Graceful stop: the listeners' sessions drain over in-memory transports and a fake clock."""

from __future__ import annotations

import os

import pytest
from twisted.application import service
from twisted.internet import defer

from mailserver.protocols import sessions as S
from mailserver.service import ListenerService, MailService
from tests.unit import test_protocol_pop3 as pop3
from tests.unit import test_protocol_smtp as smtp

GRACE = 30.0


def drop(*protos):
    """The transports close: Twisted calls connectionLost."""
    for p in protos:
        p.connectionLost(None)


@pytest.fixture
def h(tmp_path):
    return smtp.Harness(tmp_path)


def start_data(p, t):
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"DATA\r\nSubject: hi\r\n\r\npart one\r\n")
    assert smtp.replies(t)[-1] == "354 End d"


def test_idle_session_gets_421_at_once(h):
    """An idle SMTP session is answered 421 4.3.2 and closed when draining starts."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\n")
    t.clear()
    done = h.ctx.sessions.drain(GRACE, h.clock)
    assert smtp.replies(t) == ["421 4.3.2"]
    assert t.disconnecting
    assert not done.called
    drop(p)
    assert done.called


def test_no_sessions_drains_at_once(h):
    """A listener without sessions is drained immediately."""
    assert h.ctx.sessions.drain(GRACE, h.clock).called


def test_message_being_received_finishes_then_421(h):
    """DATA in flight completes with its 250 and the mail is stored; 421 follows."""
    p, t = h.connect()
    start_data(p, t)
    done = h.ctx.sessions.drain(GRACE, h.clock)
    assert t.value() == b"" and not t.disconnecting
    p.dataReceived(b"part two\r\n.\r\n")
    assert smtp.replies(t) == ["250 2.0.0", "421 4.3.2"]
    assert t.disconnecting
    assert len(h.messages("alice")) == 1
    drop(p)
    assert done.called


def test_open_transaction_may_reach_its_data(h):
    """A session between MAIL and DATA is in a transaction: it may go on to send its message."""
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\n")
    t.clear()
    h.ctx.sessions.drain(GRACE, h.clock)
    assert not t.disconnecting
    p.dataReceived(b"RCPT TO:<alice@example.test>\r\nDATA\r\nhello\r\n.\r\nQUIT\r\n")
    assert smtp.replies(t) == ["250 2.1.5", "354 End d", "250 2.0.0", "421 4.3.2"]
    assert len(h.messages("alice")) == 1


def test_pending_decision_between_transactions_then_421(h):
    """A session whose RSET came while a lookup was pending gets 421 at its next command."""
    h.directory.slow = True
    p, t = h.connect()
    p.dataReceived(b"EHLO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<alice@example.test>\r\n"
                   b"RSET\r\nNOOP\r\n")
    t.clear()
    h.ctx.sessions.drain(GRACE, h.clock)
    assert not t.disconnecting
    h.directory.release(0)
    assert smtp.replies(t) == ["250 2.1.5", "250 2.0.0", "421 4.3.2"]
    assert t.disconnecting


def test_grace_over_closes_and_removes_scratch_file(h, tmp_path, monkeypatch):
    """A message still arriving when the grace ends gets 421; its scratch file is removed."""
    from mailserver import incoming

    monkeypatch.setattr(incoming, "MEMORY_LIMIT", 0)  # on disk from the first octet
    p, t = h.connect()
    start_data(p, t)
    incoming = tmp_path / "spool" / "incoming"
    assert len(os.listdir(incoming)) == 1
    done = h.ctx.sessions.drain(GRACE, h.clock)
    h.clock.advance(GRACE - 1)
    assert not t.disconnecting
    h.clock.advance(1)
    assert smtp.replies(t) == ["421 4.3.2"] and t.disconnecting
    drop(p)
    assert done.called
    assert os.listdir(incoming) == []
    assert h.messages("alice") == []


def test_stuck_close_still_ends_the_drain(h):
    """A session that never reports its connection lost does not hold the stop for ever."""
    p, t = h.connect()
    start_data(p, t)
    done = h.ctx.sessions.drain(GRACE, h.clock)
    h.clock.advance(GRACE)
    assert not done.called
    h.clock.advance(S.FINAL_WAIT)
    assert done.called


def test_connection_accepted_while_draining_is_refused(h):
    """A connection that slipped in before the port closed gets 421 4.3.2 instead of 220."""
    h.ctx.sessions.drain(GRACE, h.clock)
    p, t = h.connect()
    assert smtp.replies(t) == ["421 4.3.2"]
    assert t.disconnecting
    drop(p)
    assert h.ctx.limiter.total == 0


@pytest.fixture
def hp(tmp_path):
    return pop3.Harness(tmp_path)


def test_pop3_idle_session_gets_err_and_no_update(hp):
    """An idle POP3 session gets -ERR [SYS/TEMP] and its DELE is never applied."""
    hp.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = hp.connect()
    pop3.login(p, t)
    p.dataReceived(b"DELE 1\r\n")
    pop3.lines(t)
    done = hp.ctx.sessions.drain(GRACE, hp.clock)
    assert pop3.lines(t) == ["-ERR [SYS/TEMP] server shutting down", ""]
    assert t.disconnecting
    drop(p)
    assert done.called
    assert hp.updates == []
    assert len(os.listdir(os.path.join(hp.maildir(), "new"))) == 1


def test_pop3_update_in_flight_finishes(hp):
    """A QUIT whose UPDATE is running when draining starts completes it and says +OK."""
    hp.deliver(b"Subject: one\r\n\r\nbody\r\n")
    p, t = hp.connect()
    pop3.login(p, t)
    held = []

    def io(f, *args):
        held.append((f, args, defer.Deferred()))
        return held[-1][2]

    hp.ctx.io = io
    p.dataReceived(b"DELE 1\r\nQUIT\r\n")
    pop3.lines(t)
    hp.ctx.sessions.drain(GRACE, hp.clock)
    assert not t.disconnecting
    f, args, d = held[0]
    d.callback(f(*args))  # the UPDATE, as the worker thread runs it
    out = pop3.lines(t)
    assert out[0].startswith("+OK") and "-ERR [SYS/TEMP] server shutting down" not in out
    assert t.disconnecting
    assert hp.updates == [((0,), ())]


def test_pop3_retr_in_flight_finishes_then_err(hp):
    """A RETR being streamed finishes whole; the next command gets -ERR [SYS/TEMP]."""
    hp.deliver(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 2000 + b"y" * 100000 + b"\r\n")
    p, t = hp.connect()
    pop3.login(p, t)
    p.dataReceived(b"RETR 1\r\n")
    assert t.producer is not None  # streaming
    hp.ctx.sessions.drain(GRACE, hp.clock)
    assert not t.disconnecting
    p.dataReceived(b"NOOP\r\n")
    out = pop3.lines(t)
    assert out[-3:] == [".", "-ERR [SYS/TEMP] server shutting down", ""]
    assert t.disconnecting


class _Listener(ListenerService):
    """A listener whose drain the test ends by hand."""

    def __init__(self, events):
        self.events = events
        self.drained = defer.Deferred()
        self.grace = GRACE

    def startService(self):
        service.Service.startService(self)  # no port

    def stopService(self):
        service.Service.stopService(self)
        self.events.append("listener stopping")
        return self.drained


class _Other(service.Service):
    def __init__(self, events):
        self.events = events

    def stopService(self):
        service.Service.stopService(self)
        self.events.append("other stopped")


def test_listeners_drain_before_the_rest_stops():
    """The directory, queue and pools stop only once every listener has drained."""
    events = []
    top = MailService(config=None, tls=None)
    _Other(events).setServiceParent(top)
    listener = _Listener(events)
    listener.setServiceParent(top)
    service.MultiService.startService(top)
    done = top.stopService()
    assert events == ["listener stopping"]
    listener.drained.callback(None)
    assert events == ["listener stopping", "other stopped"]
    assert done.called


def test_a_second_sigterm_is_harmless():
    """Stopping a reactor that is already stopping raises nothing."""
    from twisted.internet.error import ReactorNotRunning

    from mailserver.service import _stop_reactor

    class Reactor:
        calls = 0

        def stop(self):
            self.calls += 1
            if self.calls > 1:
                raise ReactorNotRunning()

    r = Reactor()
    _stop_reactor(r)
    _stop_reactor(r)
    assert r.calls == 2
