"""The worker/supervisor channel, the connection gate, restarts and metrics
aggregation, with in-memory transports and a Clock (no processes)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet import defer, protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim

from mailserver import reply as R
from mailserver.protocols.limits import ConnectionLimiter, ConnectionRateLimiter
from mailserver.throttle import LoginThrottle, RateLimiter, RateLimits
from mailserver.workers import metrics as wm
from mailserver.workers.channel import (
    CALL_TIMEOUT, SupervisorChannel, SupervisorState, WorkerChannel,
)
from mailserver.workers.gate import GateFactory, SharedLimits
from mailserver.workers.supervisor import Restarts


def setup(limits=None, clock=None, **kw):
    clock = clock or Clock()
    state = SupervisorState(
        clock, LoginThrottle(clock, base_delay=1.0, max_delay=4.0, max_failures=3, window=60),
        RateLimiter(clock, RateLimits(messages_per_hour=1, messages_per_day=0,
                                      recipients_per_hour=0, recipients_per_day=0)),
        limits if limits is not None else {
            "smtp": (ConnectionLimiter(10, 1), ConnectionRateLimiter(0))}, **kw)
    sup = SupervisorChannel(state)
    worker = WorkerChannel(clock)
    pump = iosim.connect(sup, iosim.makeFakeServer(sup), worker, iosim.makeFakeClient(worker))
    return state, sup, worker, pump, clock


def result(d, pump):
    d = defer.ensureDeferred(d)
    out = []
    d.addBoth(out.append)
    for _ in range(5):
        pump.flush()
    assert out, "no answer"
    return out[0]


def test_login_throttle_is_the_supervisors():
    state, sup, worker, pump, clock = setup()
    t = worker.login_throttle
    assert not result(t.check("1.2.3.4", "alice"), pump).blocked
    assert result(t.failed("1.2.3.4", "alice"), pump).delay == 1.0
    for _ in range(2):
        result(t.check("1.2.3.4", "alice"), pump)
        verdict = result(t.failed("1.2.3.4", "alice"), pump)
    assert verdict.blocked
    assert result(t.check("1.2.3.4", "bob"), pump).blocked  # the client is blocked
    assert result(t.succeeded("5.6.7.8", "carol"), pump) is None


def test_rate_limits_are_the_supervisors():
    state, sup, worker, pump, clock = setup()
    r = worker.rate_limiter
    assert result(r.check("alice", 1), pump) is None
    result(r.record("alice", 1), pump)
    verdict = result(r.check("alice", 1), pump)
    assert (verdict.limit, verdict.value, verdict.current) == ("messages_per_hour", 1, 1)


def test_connection_slots_are_counted_once_and_freed_with_the_worker():
    state, sup, worker, pump, clock = setup()
    from mailserver.workers.channel import ConnectionClose, ConnectionOpen

    def open_():
        return result(worker.call(ConnectionOpen, listener="smtp", key="1.2.3.4",
                                  ip="1.2.3.4"), pump)["refusal"]

    assert open_() == ""
    assert open_() == "client"
    assert result(worker.call(ConnectionOpen, listener="nope", key="k", ip="k"),
                  pump)["refusal"] == "total"
    worker.send(ConnectionClose, listener="smtp", key="1.2.3.4")
    pump.flush()
    assert open_() == ""
    worker.send(ConnectionClose, listener="smtp", key="9.9.9.9")  # never held: ignored
    pump.flush()
    assert state.limits["smtp"][0].total == 1
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    sup.connectionLost(Failure(ConnectionDone()))  # the worker died holding a slot
    assert state.limits["smtp"][0].total == 0


def test_connection_rate_limit_is_the_supervisors():
    state, sup, worker, pump, clock = setup(
        limits={"smtp": (ConnectionLimiter(10, 10), ConnectionRateLimiter(1))})
    from mailserver.workers.channel import ConnectionOpen

    answers = [result(worker.call(ConnectionOpen, listener="smtp", key="1.2.3.4",
                                  ip="1.2.3.4"), pump)["refusal"] for _ in range(2)]
    assert answers == ["", "rate"]


def test_wake_ready_and_metrics_reach_the_supervisor():
    woken, ready = [], []
    registry = CollectorRegistry()
    aggregate = wm.Aggregate(registry)
    state, sup, worker, pump, clock = setup(wake=lambda: woken.append(1),
                                            ready=lambda w, pid: ready.append(pid),
                                            metrics=aggregate)
    from mailserver.workers.channel import Ready

    worker.wake()
    result(worker.call(Ready, pid=42), pump)
    worker.send(wm.MetricsReport, samples=wm.encode({("f", "f_total", ()): 2.0}))
    pump.flush()
    assert woken == [1] and ready == [42]
    assert aggregate.live[None] == {("f", "f_total", ()): 2.0}


def test_worker_fails_safe_when_the_channel_is_down():
    clock = Clock()
    worker = WorkerChannel(clock)  # never connected
    assert result(worker.login_throttle.check("c", "a"), _NoPump()).blocked
    assert result(worker.login_throttle.failed("c", "a"), _NoPump()).blocked
    verdict = result(worker.rate_limiter.check("alice", 1), _NoPump())
    assert verdict is not None and verdict.retry_after > 0
    worker.wake()  # dropped quietly: the queue's own scan finds the message


def test_worker_fails_safe_when_the_supervisor_does_not_answer():
    clock = Clock()
    worker = WorkerChannel(clock)
    worker.makeConnection(StringTransport())  # nobody answers
    out = []
    defer.ensureDeferred(worker.login_throttle.check("c", "a")).addBoth(out.append)
    assert out == []
    clock.advance(CALL_TIMEOUT)
    assert out[0].blocked


class _NoPump:
    def flush(self):
        pass


class _Inner(protocol.Protocol):
    """Reads the limits at connectionMade as the SMTP and POP3 adapters do."""

    def __init__(self, limits):
        self.limits = limits
        self.seen = None
        self.data = b""

    def connectionMade(self):
        self.seen = (self.limits.allow("k", 0.0, "1.2.3.4"), self.limits.acquire("k"))

    def dataReceived(self, data):
        self.data += data


class _Factory(protocol.Factory):
    def __init__(self, limits):
        self.limits = limits
        self.ctx = "context"

    def buildProtocol(self, addr):
        return _Inner(self.limits)


class _FakeChannel:
    def __init__(self):
        self.calls, self.sent = [], []
        self.answer = defer.Deferred()

    def call(self, command, late=None, **kw):
        self.calls.append(kw)
        self.late = late
        return self.answer

    def send(self, command, **kw):
        self.sent.append(kw)


def _gated(answer):
    channel = _FakeChannel()
    limits = SharedLimits(channel, "smtp")
    factory = GateFactory(_Factory(limits), channel, limits)
    assert factory.ctx == "context"  # the listener service reads it through the gate
    gate = factory.buildProtocol(None)
    transport = StringTransport(peerAddress=_Peer("1.2.3.4"))
    transport.protocol = gate
    gate.makeConnection(transport)
    gate.dataReceived(b"EHLO early\r\n")
    assert gate.inner.seen is None  # waits for the supervisor
    if isinstance(answer, Exception):
        channel.answer.errback(answer)
    else:
        channel.answer.callback({"refusal": answer})
    return gate, transport, channel, limits


class _Peer:
    def __init__(self, host):
        self.host = host


def test_gate_hands_over_an_allowed_connection():
    gate, transport, channel, limits = _gated("")
    assert channel.calls == [{"listener": "smtp", "key": "1.2.3.4", "ip": "1.2.3.4"}]
    assert gate.inner.seen == (True, None)
    assert transport.protocol is gate.inner  # the gate stepped out
    assert gate.inner.data == b"EHLO early\r\n"
    limits.release("1.2.3.4")
    assert channel.sent == [{"listener": "smtp", "key": "1.2.3.4"}]


def test_gate_passes_refusals_on():
    assert _gated("client")[0].inner.seen == (True, R.TOO_MANY_FROM_CLIENT)
    assert _gated("total")[0].inner.seen == (True, R.TOO_MANY_CONNECTIONS)
    assert _gated("rate")[0].inner.seen[0] is False
    assert _gated(ConnectionError("down"))[0].inner.seen == (True, R.SERVICE_UNAVAILABLE)


def test_a_slot_counted_after_the_timeout_is_given_back():
    state, sup, worker, pump, clock = setup()
    from mailserver.workers.channel import ConnectionOpen

    late = []
    d = defer.ensureDeferred(worker.call(ConnectionOpen, late=late.append, listener="smtp",
                                         key="1.2.3.4", ip="1.2.3.4"))
    out = []
    d.addErrback(out.append)
    clock.advance(CALL_TIMEOUT)  # the supervisor has not read it yet
    assert out and out[0].check(TimeoutError)
    pump.flush()
    pump.flush()
    assert late == [{"refusal": ""}]
    gate = _gated(ConnectionError("slow"))[0]
    gate._late({"refusal": ""})
    assert gate.gate_factory.channel.sent == [{"listener": "smtp", "key": "1.2.3.4"}]


def test_gate_releases_a_slot_when_the_client_left_while_waiting():
    channel = _FakeChannel()
    limits = SharedLimits(channel, "smtp")
    gate = GateFactory(_Factory(limits), channel, limits).buildProtocol(None)
    gate.makeConnection(StringTransport(peerAddress=_Peer("1.2.3.4")))
    gate.connectionLost(None)
    channel.answer.callback({"refusal": ""})
    assert gate.inner.seen is None
    assert channel.sent == [{"listener": "smtp", "key": "1.2.3.4"}]


def test_restarts_back_off_while_a_worker_keeps_dying():
    r = Restarts(stable=30.0, max_delay=8.0)
    assert [r.delay(0.0, 1.0) for _ in range(6)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert r.delay(100.0, 200.0) == 0.0  # lived long enough: a first death again


def test_aggregate_adds_workers_and_keeps_counters_of_the_dead():
    own = CollectorRegistry()
    c = Counter("mailserver_things", "Things.", ["listener"], registry=own)
    Gauge("mailserver_open", "Open.", ["listener"], registry=own)
    c.labels("smtp").inc(1)
    worker = CollectorRegistry()
    wc = Counter("mailserver_things", "Things.", ["listener"], registry=worker)
    wg = Gauge("mailserver_open", "Open.", ["listener"], registry=worker)
    wc.labels("smtp").inc(2)
    wc.labels("pop3").inc(5)
    wg.labels("smtp").set(3)
    aggregate = wm.Aggregate(own)
    aggregate.report("w1", wm.encode(wm.samples(worker)))
    aggregate.report("w2", wm.encode(wm.samples(worker)))

    def value(name, listener):
        for family in aggregate.collect():
            for s in family.samples:
                if s.name == name and s.labels.get("listener") == listener:
                    return s.value
        return None

    assert value("mailserver_things_total", "smtp") == 5.0
    assert value("mailserver_things_total", "pop3") == 10.0
    assert value("mailserver_open", "smtp") == 6.0
    aggregate.gone("w1", wm.gauge_families(own))
    assert value("mailserver_things_total", "smtp") == 5.0  # never backwards
    assert value("mailserver_open", "smtp") == 3.0  # its connections are gone
    from prometheus_client import generate_latest

    assert b'mailserver_things_total{listener="pop3"} 10.0' in generate_latest(aggregate)


# -- the supervisor's pool, on a Clock ---------------------------------------------
class _Control:
    """A zygote's control socket as the pool sees it."""

    def __init__(self, asked):
        self.asked = asked  # (slot, fd), shared by every zygote of a test
        self.closed = False

    def fork(self, worker, fd):
        self.asked.append((worker.slot, fd))

    def close(self):
        self.closed = True


class _Reactor(Clock):
    """A Clock that records spawnProcess (each zygote) and adopts nothing."""

    def __init__(self, fail=False):
        super().__init__()
        self.fail = fail
        self.spawned = []

    def spawnProcess(self, proc, exe, args, env, path, childFDs):
        if self.fail:
            raise OSError("no more processes")
        self.spawned.append((args, childFDs))
        proc.transport = None
        return proc

    def adoptStreamConnection(self, fd, family, factory):
        factory.buildProtocol(None)


def _config(grace=10.0):
    from types import SimpleNamespace

    return SimpleNamespace(server=SimpleNamespace(shutdown_grace=grace), path="x.toml",
                           relay=SimpleNamespace(trusted_networks=[]), listeners=[])


class _Pool:
    """A WorkerPool on a Clock: its zygotes' control sockets are _Controls
    (``asked`` lists every fork request), ``fork_all()`` answers them with
    pids 1000, 1001..., ``signals`` has what each pid was sent and
    ``exits`` what waitpid finds (pid -> status), as for our children."""

    def __init__(self, count=2, grace=10.0, fail=False):
        from twisted.internet.error import ProcessDone
        from twisted.python.failure import Failure

        from mailserver.workers.supervisor import WorkerPool

        self.reactor = _Reactor(fail)
        self.pool = WorkerPool(_config(grace), self.reactor, count, None, None, None)
        self.asked, self.controls = [], []
        self.signals, self.exits = {}, {}
        self.next_pid = 1000

        def control(pool):
            c = _Control(self.asked)

            def exits():  # as the zygote does when its control socket closes
                c.closed = True
                pool.zygote_ended(pool.zygote, Failure(ProcessDone(0)))

            c.close = exits
            self.controls.append(c)
            return c

        def waitpid(pid, options):
            if pid in self.exits:
                return pid, self.exits.pop(pid)
            return 0, 0

        self.pool.control_factory = control
        self.pool.waitpid = waitpid

    def fork_all(self):
        for w in list(self.pool.workers.values()):
            if w.pid is None:
                self.pool.forked(w.slot, self.next_pid)
                self.next_pid += 1

    def die(self, pid, status=9):
        """``pid`` ends (killed by ``status`` when it is a signal number)."""
        self.exits[pid] = status
        worker = next(w for w in self.pool.workers.values() if w.pid == pid)
        worker.channel_lost()


@pytest.fixture
def harness(monkeypatch):
    from mailserver.workers.supervisor import Worker

    made = []

    def send(worker, signum):
        if worker.pid is None:
            worker.owed.append(signum)
        else:
            made[-1].signals.setdefault(worker.pid, []).append(signum)

    monkeypatch.setattr(Worker, "send", send)

    def make(**kw):
        h = _Pool(**kw)
        made.append(h)
        h.pool.startService = lambda: h.pool._start_zygote()
        h.pool.startService()
        return h

    return make


def test_the_zygote_forks_every_worker_then_is_let_go(harness):
    h = harness()
    args, fds = h.reactor.spawned[0]
    assert args[1:4] == ["-m", "mailserver.workers.zygote", "--control"]
    assert [slot for slot, _fd in h.asked] == [0, 1]
    assert not h.controls[0].closed
    h.pool.forked(0, 1000)
    assert not h.controls[0].closed  # one still to come
    h.pool.forked(1, 1001)
    assert h.controls[0].closed and h.pool.control is None  # it exits: nothing to share
    assert {w.pid for w in h.pool.workers.values()} == {1000, 1001}
    assert all(w.handed is None for w in h.pool.workers.values())  # our copies closed


def test_a_dead_worker_is_forked_again_with_a_growing_delay(harness):
    h = harness()
    h.fork_all()
    h.die(1000)
    assert 0 not in h.pool.workers
    h.reactor.advance(0)
    assert len(h.reactor.spawned) == 2 and [s for s, _ in h.asked] == [0, 1, 0]
    h.fork_all()
    h.die(1002)  # again, at once: wait a second
    h.reactor.advance(0.5)
    assert len(h.asked) == 3
    h.reactor.advance(0.5)
    assert len(h.asked) == 4


def test_how_a_worker_ended_is_logged(harness):
    from twisted.logger import globalLogPublisher, formatEvent

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        h = harness()
        h.pool.pid_ended(4242, "exit 0")  # not one of ours: nothing happens
        h.pool.forked(0, 1000)
        h.pool.pid_ended(1000, "signal 9")  # the zygote's report, while it lives
        h.pool.forked(1, 1001)
        h.exits[1001] = 256 * 3  # exit 3, found by waitpid once it is our child
        h.pool.workers[1].channel_lost()
    finally:
        globalLogPublisher.removeObserver(seen.append)
    text = [formatEvent(e) for e in seen]
    assert any("worker 1000 ended (signal 9)" in t for t in text), text
    assert any("worker 1001 ended (exit 3)" in t for t in text), text


def test_a_channel_lost_waits_for_the_exit_status(harness):
    """The channel closes as the process exits: waitpid may find it a moment
    later (our child), or its zygote reports it; else it is unknown."""
    h = harness()
    h.pool.forked(0, 1000)
    w0 = h.pool.workers[0]
    w0.channel_lost()  # zygote alive: its report is awaited
    assert not w0.ended
    h.pool.pid_ended(1000, "exit 0")
    assert w0.ended
    h.pool.forked(1, 1001)  # the zygote is let go
    w1 = h.pool.workers[1]
    w1.channel_lost()
    h.reactor.advance(0.05)
    assert not w1.ended
    h.exits[1001] = 9
    h.reactor.advance(0.05)
    assert w1.ended and h.pool.workers.get(1) is not w1  # (and its slot is filled again)


def test_a_fork_that_failed_is_tried_again(harness):
    h = harness(count=1)
    h.pool.fork_failed(0, "Resource temporarily unavailable")
    assert 0 not in h.pool.workers and h.controls[0].closed
    h.reactor.advance(0)  # the first failure: at once, from a new zygote
    assert len(h.reactor.spawned) == 2 and len(h.asked) == 2
    h.pool.fork_failed(0, "Resource temporarily unavailable")
    h.reactor.advance(0.5)
    assert len(h.asked) == 2
    h.reactor.advance(0.5)  # the second in a row waits a second
    assert len(h.asked) == 3


def test_a_zygote_that_dies_before_forking_is_replaced(harness):
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    h = harness(count=1)
    h.pool.zygote_ended(h.pool.zygote, Failure(ProcessTerminated(signal=9)))
    assert h.pool.control is None
    h.pool.workers[0].channel_lost()  # its channel end was never used
    assert 0 not in h.pool.workers
    h.reactor.advance(0)
    assert len(h.reactor.spawned) == 2 and len(h.asked) == 2


def test_stop_passes_sigterm_on_waits_and_kills_stragglers(harness):
    h = harness(grace=10.0)
    h.fork_all()
    done = []
    h.pool.stopService().addCallback(done.append)
    assert h.signals == {1000: [15], 1001: [15]}
    h.die(1000, 0)
    assert not done
    h.reactor.advance(10.0 + 5.0)  # shutdown_grace, then the margin: SIGKILL
    assert h.signals[1001] == [15, 9]
    h.die(1001)
    assert done and not h.pool.pending  # and nobody is started again
    h.reactor.advance(100)
    assert len(h.asked) == 2 and len(h.reactor.spawned) == 1


def test_a_sigterm_before_the_fork_is_answered_goes_once_it_is(harness):
    h = harness(count=1)
    done = []
    h.pool.stopService().addCallback(done.append)
    assert h.signals == {} and not h.controls[0].closed  # its answer is awaited
    h.pool.forked(0, 1000)
    assert h.signals[1000] == [15] and h.controls[0].closed
    h.die(1000, 0)
    assert done


def test_a_restart_pending_at_stop_is_cancelled(harness):
    h = harness(count=1)
    h.fork_all()
    h.die(1000)
    done = []
    h.pool.stopService().addCallback(done.append)
    assert done
    h.reactor.advance(100)
    assert len(h.asked) == 1


def test_a_ready_before_the_forked_line_lets_the_zygote_go(harness):
    h = harness(count=1)
    h.pool.announced = True
    h.pool._ready(h.pool.workers[0], 1000)
    assert h.controls[0].closed and h.pool.workers[0].pid == 1000
    h.pool.forked(0, 1000)  # late: nothing more to do
    assert h.pool.workers[0].pid == 1000


def test_no_descriptor_for_a_workers_channel_is_tried_again(harness):
    h = harness(count=1)
    h.fork_all()
    h.reactor.adoptStreamConnection = lambda *a: (_ for _ in ()).throw(OSError("EMFILE"))
    h.die(1000)
    h.reactor.advance(0)  # a new zygote: adopting its control socket fails too
    assert h.pool.zygote is None and h.pool.zygote_pending is not None
    del h.reactor.adoptStreamConnection  # descriptors again
    h.reactor.advance(1)
    assert [s for s, _ in h.asked] == [0, 0] and 0 in h.pool.workers


def test_a_worker_that_outlives_its_channel_is_reaped_later(harness):
    h = harness(count=1)
    h.fork_all()
    h.pool.workers[0].channel_lost()
    h.reactor.pump([0.05] * 20)  # 20 tries: still running (draining, say)
    assert h.pool.workers.get(0) is None or h.pool.workers[0].pid != 1000
    assert h.pool.unreaped == {1000}
    h.reactor.advance(1.0)
    assert h.pool.unreaped == {1000}
    h.exits[1000] = 0
    h.reactor.advance(1.0)
    assert h.pool.unreaped == set() and h.pool.reaping is None


def test_the_zygote_that_cannot_be_started_is_tried_again(harness):
    h = harness(count=1, fail=True)
    assert h.pool.zygote is None and h.pool.zygote_pending is not None and not h.pool.workers
    h.reactor.fail = False
    h.reactor.advance(0)
    assert len(h.reactor.spawned) == 1 and [s for s, _ in h.asked] == [0]


def test_sigusr1_and_sighup_wait_until_a_worker_serves(harness):
    """SIGUSR1 and SIGHUP reach a worker once it says Ready, once each;
    SIGTERM at once."""
    import signal

    h = harness()
    h.fork_all()
    p = h.pool
    p.announced = True  # no service to announce to here
    w0, w1 = p.workers[0], p.workers[1]
    p._ready(w0, w0.pid)
    p.signal(signal.SIGUSR1)
    p.signal(signal.SIGUSR1)
    p.signal(signal.SIGHUP)
    assert h.signals[1000] == [signal.SIGUSR1, signal.SIGUSR1, signal.SIGHUP]
    assert 1001 not in h.signals
    p._ready(w1, w1.pid)
    assert h.signals[1001] == [signal.SIGUSR1, signal.SIGHUP]
    p.signal(signal.SIGUSR1)
    assert h.signals[1001][-1] == signal.SIGUSR1


def test_the_zygote_is_given_the_supervisors_log_descriptor(tmp_path):
    """With [log] file (or twistd -n's standard output) the zygote's (and so
    the workers') standard output is that descriptor and the workers are
    told --log fd; with twistd's rotating log it is a pipe and --log relay."""
    from types import SimpleNamespace

    from mailserver.config import LogConfig
    from mailserver.logs import build_observer
    from mailserver.workers.supervisor import WorkerPool

    observer = build_observer(LogConfig(file=str(tmp_path / "mail.log")))
    for top, how, stdout in (
            (SimpleNamespace(log_observer=observer), "fd", observer.destinations[0].fd),
            (None, "relay", "r")):
        reactor = _Reactor()
        p = WorkerPool(_config(1.0), reactor, 0, top, None, None)
        p._start_zygote()
        args, fds = reactor.spawned[0]
        assert args[args.index("--log") + 1] == how and fds[1] == stdout and fds[2] == "r"


def test_worker_log_lines_are_logged_again_with_the_pid():
    import json

    from twisted.logger import globalLogPublisher

    from mailserver.workers.supervisor import relog

    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        relog(json.dumps({"t": 5.0, "l": "warn", "n": "mailserver.smtpd",
                          "x": "smtp: odd {braces}", "f": {"client": "1.2.3.4"}}).encode(), 77)
        relog(b"not json", 78)
    finally:
        globalLogPublisher.removeObserver(seen.append)
    from twisted.logger import LogLevel, formatEvent

    first, second = [e for e in seen if e.get("worker") in (77, 78)]
    assert formatEvent(first) == "smtp: odd {braces}"
    assert (first["log_level"], first["client"], first["log_time"]) == (LogLevel.warn,
                                                                         "1.2.3.4", 5.0)
    assert first["log_system"] == "mailserver.smtpd#warn worker 77"
    assert formatEvent(second) == "not json"
