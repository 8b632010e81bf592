"""The worker/supervisor channel, the connection gate, restarts and metrics
aggregation, with in-memory transports and a Clock (no processes)."""

from __future__ import annotations

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
class _Proc:
    def __init__(self):
        self.signals = []

    def signalProcess(self, signum):
        self.signals.append(signum)


def _pool(count=2, grace=10.0):
    from types import SimpleNamespace

    from mailserver.workers.supervisor import WorkerPool, WorkerProcess

    config = SimpleNamespace(server=SimpleNamespace(shutdown_grace=grace),
                             relay=SimpleNamespace(trusted_networks=[]), listeners=[])
    clock = Clock()
    pool = WorkerPool(config, clock, count, None, None, None)
    spawned = []

    def spawn(slot):
        pool.pending.pop(slot, None)
        proc = WorkerProcess(pool, slot)
        proc.transport = _Proc()
        proc.pid = 1000 + len(spawned)
        pool.workers[slot] = proc
        spawned.append(proc)

    pool._spawn = spawn
    for slot in range(count):
        spawn(slot)
    return pool, clock, spawned


def _death(sig=9):
    from twisted.internet.error import ProcessTerminated
    from twisted.python.failure import Failure

    return Failure(ProcessTerminated(signal=sig))


def test_a_dead_worker_is_started_again_with_a_growing_delay():
    pool, clock, spawned = _pool()
    pool.ended(spawned[0], _death())
    assert 0 not in pool.workers
    clock.advance(0)
    assert len(spawned) == 3 and pool.workers[0] is spawned[2]
    spawned[2].ended = True
    pool.ended(spawned[2], _death())  # again, at once: wait a second
    clock.advance(0.5)
    assert len(spawned) == 3
    clock.advance(0.5)
    assert len(spawned) == 4


def test_stop_passes_sigterm_on_waits_and_kills_stragglers():
    pool, clock, spawned = _pool(grace=10.0)
    done = []
    pool.stopService().addCallback(done.append)
    assert [p.transport.signals for p in spawned] == [[15], [15]]
    pool.ended(spawned[0], _death(None))
    assert not done
    clock.advance(10.0 + 5.0)  # shutdown_grace, then the margin: SIGKILL
    assert spawned[1].transport.signals == [15, 9]
    pool.ended(spawned[1], _death())
    assert done and not pool.pending  # and nobody is started again
    clock.advance(100)
    assert len(spawned) == 2


def test_a_restart_pending_at_stop_is_cancelled():
    pool, clock, spawned = _pool(count=1)
    pool.ended(spawned[0], _death())
    done = []
    pool.stopService().addCallback(done.append)
    assert done
    clock.advance(100)
    assert len(spawned) == 1


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


def test_a_worker_that_cannot_be_started_is_tried_again():
    from types import SimpleNamespace

    from mailserver.workers.supervisor import WorkerPool

    class Reactor(Clock):
        tries = 0

        def spawnProcess(self, *a, **kw):
            self.tries += 1
            raise OSError("no more processes")

    config = SimpleNamespace(server=SimpleNamespace(shutdown_grace=1.0), path="x.toml",
                             relay=SimpleNamespace(trusted_networks=[]), listeners=[])
    reactor = Reactor()
    pool = WorkerPool(config, reactor, 1, None, None, None)
    pool._spawn(0)
    assert reactor.tries == 1 and 0 in pool.pending and not pool.workers
    reactor.advance(0)
    assert reactor.tries == 2
    reactor.advance(1)  # the second failure in a row waits a second
    assert reactor.tries == 3


def test_sigusr1_and_sighup_wait_until_a_worker_serves():
    """A worker still starting has no handler yet (the signal would end it):
    SIGUSR1 and SIGHUP reach it once it says Ready, once each; SIGTERM at once."""
    import signal

    pool, clock, spawned = _pool()
    pool.announced = True  # no service to announce to here
    pool._ready(spawned[0], spawned[0].pid)
    pool.signal(signal.SIGUSR1)
    pool.signal(signal.SIGUSR1)
    pool.signal(signal.SIGHUP)
    assert spawned[0].transport.signals == [signal.SIGUSR1, signal.SIGUSR1, signal.SIGHUP]
    assert spawned[1].transport.signals == []
    pool._ready(spawned[1], spawned[1].pid)
    assert spawned[1].transport.signals == [signal.SIGUSR1, signal.SIGHUP]
    pool.signal(signal.SIGUSR1)
    assert spawned[1].transport.signals[-1] == signal.SIGUSR1


def test_a_worker_is_given_the_supervisors_log_descriptor(tmp_path):
    """With [log] file (or twistd -n's standard output) the worker's standard
    output is that descriptor and it is told --log fd; with twistd's
    rotating log it gets a pipe and --log relay."""
    from types import SimpleNamespace

    from mailserver.config import LogConfig
    from mailserver.logs import build_observer
    from mailserver.workers.supervisor import WorkerPool

    class Reactor(Clock):
        def spawnProcess(self, proc, exe, args, env, path, childFDs):
            self.spawned = (args, childFDs)
            proc.transport = None
            return proc

        def adoptStreamConnection(self, fd, family, factory):
            pass

    config = SimpleNamespace(server=SimpleNamespace(shutdown_grace=1.0), path="x.toml",
                             relay=SimpleNamespace(trusted_networks=[]), listeners=[])
    observer = build_observer(LogConfig(file=str(tmp_path / "mail.log")))
    for top, how, stdout in (
            (SimpleNamespace(log_observer=observer), "fd", observer.destinations[0].fd),
            (None, "relay", "r")):
        reactor = Reactor()
        WorkerPool(config, reactor, 1, top, None, None)._spawn(0)
        args, fds = reactor.spawned
        assert args[args.index("--log") + 1] == how and fds[1] == stdout and fds[2] == "r"
