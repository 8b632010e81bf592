# -*- test-case-name: tests.unit.test_workers -*-
"""The supervisor: the twistd process when ``[server] workers`` is above 1.

:class:`WorkerPool` binds every listener in ``privilegedStartService`` (as
root, before twistd drops privileges; the same endpoints as one process
uses, UNIX-socket locks included) but never accepts on them: it stops
reading at once.  Once running as the service user it starts the zygote
(``python -m mailserver.workers.zygote``, see that module) with every
listening socket, and asks it to fork each worker, handing it by
``SCM_RIGHTS`` one end of a fresh UNIX socket pair for the worker's AMP
channel; the worker adopts the listening sockets it inherited.  Once every
worker asked for is forked the supervisor closes the control socket and the
zygote exits: the workers keep sharing the pages they have not written, and
a zygote kept alive would end up holding a private copy of each page any of
them wrote.  A worker that has to be started again gets a new zygote.  The
supervisor makes itself the workers' subreaper (Linux), so that once their
zygote is gone they become its children and their exit status can be read;
while the zygote lives, it reports them.  The supervisor itself keeps the outbound
queue, the scratch and ``tmp/`` cleaning, the metrics endpoint and the state
in :class:`~mailserver.workers.channel.SupervisorState`.

A worker that dies is started again: at once the first time, then after a
delay doubling up to :data:`MAX_DELAY` while it keeps dying within
:data:`STABLE` seconds of its start (:class:`Restarts`), so a crash loop
does not spin.  SIGHUP, SIGUSR1 and SIGTERM are passed on (SIGHUP and
SIGUSR1 wait until a starting worker serves, as its handlers are in place
only then); on SIGTERM the workers drain (``shutdown_grace``) and the
supervisor waits for them, a few seconds more at most, before it stops the
queue.

Workers write their own log lines to where the supervisor writes its own
(see :mod:`mailserver.logs`): each gets, as its standard output, the
supervisor's standard output or the ``[log]`` file.  Only when that is
twistd's rotating ``twistd.log`` do workers write their events as JSON lines
on a pipe instead, and the supervisor logs each again (:func:`relog`), with
its fields and the worker's pid.  A worker's standard error is logged as
errors (a traceback at start).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Dict, List, Optional

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.protocols import basic
from twisted.logger import Logger, LogLevel, globalLogPublisher

from mailserver.workers.channel import OneProtocol, SupervisorChannel, SupervisorState
from mailserver.workers.zygote import PR_SET_CHILD_SUBREAPER, exit_code_and_signal, prctl

log = Logger(namespace="mailserver")

#: Seconds a worker must live for its next death to count as a first one.
STABLE = 30.0
#: The longest wait before starting a worker again.
MAX_DELAY = 30.0
#: Seconds past ``shutdown_grace`` a worker gets before it is killed.
KILL_MARGIN = 5.0


class Restarts:
    """When to start a worker again after it died.

    The first death after a stable run restarts at once; each death within
    ``stable`` seconds of the last start doubles the wait (1, 2, 4 ... up to
    ``max_delay`` seconds)."""

    def __init__(self, stable: float = STABLE, max_delay: float = MAX_DELAY) -> None:
        self.stable = stable
        self.max_delay = max_delay
        self.quick = 0  # deaths in a row, each soon after its start

    def delay(self, started: float, died: float) -> float:
        if died - started >= self.stable:
            self.quick = 0
        self.quick += 1
        if self.quick == 1:
            return 0.0
        return min(self.max_delay, 2.0 ** (self.quick - 2))


class _NoAccept(protocol.Factory):
    """Never used: the supervisor's ports do not read."""

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover
        return None


class Worker:
    """One worker process, forked by the zygote: its slot, pid and signals."""

    def __init__(self, pool: "WorkerPool", slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: Optional[int] = None  # known once the zygote says "forked"
        self.started = pool.reactor.seconds()
        self.ended = False
        self.serving = False  # said Ready: its signal handlers are in place
        self.owed: List[int] = []  # signals for it once it is forked / serves
        self.handed = None  # the child's end of the channel, until the zygote has it

    def send(self, signum: int) -> None:
        if self.pid is None:
            if signum not in self.owed:
                self.owed.append(signum)
            return
        try:
            os.kill(self.pid, signum)
        except OSError:
            pass  # already gone: its end is reported

    def channel_lost(self) -> None:
        self.pool.channel_lost(self)

    def let_go(self) -> None:
        """Close our copy of the channel end the zygote was given."""
        if self.handed is not None:
            self.handed.close()
            self.handed = None


class ZygoteProcess(protocol.ProcessProtocol):
    """The zygote: the workers' log lines in relay mode (JSON on its shared
    standard output), their standard error, and its own end."""

    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool
        self.started = pool.reactor.seconds()
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            relog(line, None)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.error("worker: {line}", line=line)

    def processExited(self, reason) -> None:
        # Not processEnded: that waits for the pipes, which the workers hold.
        self.pool.zygote_ended(self, reason)

    def processEnded(self, reason) -> None:
        if self.buffer:  # the pipes closed: the last workers are gone too
            relog(self.buffer, None)
            self.buffer = b""


class ZygoteControl(basic.LineOnlyReceiver):
    """The supervisor's end of the zygote's control socket (see
    :mod:`mailserver.workers.zygote` for the lines)."""

    delimiter = b"\n"

    def __init__(self, pool: "WorkerPool") -> None:
        self.pool = pool

    def fork(self, worker: Worker, fd: int) -> None:
        self.transport.sendFileDescriptor(fd)
        self.transport.write(b"fork %d\n" % worker.slot)

    def close(self) -> None:
        self.transport.loseConnection()

    def lineReceived(self, line: bytes) -> None:
        words = line.decode("ascii", "replace").split(" ", 2)
        try:
            if words[0] == "forked":
                self.pool.forked(int(words[1]), int(words[2]))
            elif words[0] == "failed" and words[1].isdigit():
                self.pool.fork_failed(int(words[1]), words[2] if len(words) > 2 else "")
            elif words[0] == "ended":
                pid, code, sig = (int(w) for w in words[1:2] + words[2].split())
                self.pool.pid_ended(pid, how_ended(code, sig))
            else:
                log.error("zygote: {line}", line=line.decode("ascii", "replace"))
        except (IndexError, ValueError):
            log.error("zygote: cannot read {line!r}", line=line)


def how_ended(code: int, sig: int) -> str:
    """A worker's end for the log: ``signal N`` or ``exit N``."""
    return f"signal {sig}" if sig else f"exit {code}"


def relog(line: bytes, pid) -> None:
    """Log again one event a worker wrote (see ``worker.relay_line``); the
    line names its worker (``p``), else ``pid`` does."""
    try:
        record = json.loads(line)
        text = record["x"]
        level = LogLevel.levelWithName(record["l"])
    except (ValueError, KeyError, TypeError, Exception):
        text, level, record = line.decode("utf-8", "replace"), LogLevel.info, {}
    namespace = record.get("n", "mailserver")
    pid = record.get("p", pid)
    event = dict(record.get("f") or {})
    event.update(
        log_format=text.replace("{", "{{").replace("}", "}}"), log_level=level,
        log_namespace=namespace, log_time=record.get("t"), worker=pid,
        log_system=f"{namespace}#{level.name} worker {pid}")
    if event["log_time"] is None:
        del event["log_time"]
    globalLogPublisher(event)


class WorkerPool(service.Service):
    """Binds the listeners, runs ``count`` workers, keeps the shared state."""

    control_factory = ZygoteControl

    def __init__(self, config, reactor, count: int, top, throttle, rate_limiter,
                 metrics=None) -> None:
        from mailserver.listeners import connection_limits
        from mailserver.policy import Networks

        self.config = config
        self.reactor = reactor
        self.count = count
        self.top = top
        self.grace = config.server.shutdown_grace
        trusted = Networks(config.relay.trusted_networks)
        self.aggregate = None
        if metrics is not None:
            from mailserver.workers.metrics import Aggregate, gauge_families

            self.aggregate = Aggregate(metrics.registry)
            metrics.exposed = self.aggregate  # served by the one endpoint
            self.gauges = gauge_families(metrics.registry)
        self.state = SupervisorState(
            reactor, throttle, rate_limiter,
            {lc.name: connection_limits(config, lc, trusted) for lc in config.listeners},
            wake=self._wake, ready=self._ready, metrics=self.aggregate)
        self.ports: List = []  # (listener config, bound port), in config order
        self.workers: Dict[int, Worker] = {}  # slot -> its process
        self.zygote: Optional[ZygoteProcess] = None
        self.control: Optional[ZygoteControl] = None  # the zygote's control socket
        self.zygote_restarts = Restarts()
        self.zygote_pending = None  # the delayed call starting the zygote again
        self.waitpid = os.waitpid
        self.unreaped: set = set()  # pids of workers gone from the pool, not yet reaped
        self.reaping = None
        self.restarts = {slot: Restarts() for slot in range(count)}
        self.pending: Dict[int, object] = {}  # slot -> the delayed call restarting it
        self.announced = False
        self.readied: set = set()
        self.stopping = False
        self.all_ended: Optional[defer.Deferred] = None

    # -- binding, as root
    def privilegedStartService(self) -> None:
        from mailserver.service import make_endpoint

        super().privilegedStartService()
        for lc in self.config.listeners:
            d = make_endpoint(self.reactor, lc.address, lc.socket_mode).listen(_NoAccept())
            result = []
            d.addBoth(result.append)
            if isinstance(result[0], BaseException) or hasattr(result[0], "raiseException"):
                result[0].raiseException()
            port = result[0]
            port.stopReading()  # bound and listening; the workers accept
            self.ports.append((lc, port))

    # -- workers
    def startService(self) -> None:
        super().startService()
        _become_subreaper()
        self._start_zygote()

    def _wake(self) -> None:
        manager = self._queue_manager()
        if manager is not None:
            manager.wake()

    def _queue_manager(self):
        from mailserver.queue.manager import QueueManager

        for s in self.top:
            if isinstance(s, QueueManager):
                return s
        return None

    def _ready(self, worker, pid) -> None:
        log.info("worker {pid} serving", pid=pid)
        if worker is not None:
            if worker.pid is None:  # before the zygote's word: take its own
                worker.pid = pid
                worker.let_go()
                self._release_zygote()
            worker.serving = True
            owed, worker.owed = worker.owed, []
            for signum in owed:
                worker.send(signum)
        self.readied.add(worker.slot if worker is not None else pid)
        if not self.announced and len(self.readied) >= self.count:
            self.announced = True
            self.top.announce(f", {self.count} worker processes")

    def _start_zygote(self) -> None:
        """Start the zygote (which every worker is forked from), then ask it
        for a worker in every empty slot."""
        self.zygote_pending = None
        if self.stopping:
            return
        proc = ZygoteProcess(self)
        ours = theirs = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            observer = getattr(self.top, "log_observer", None)
            how, log_fd = (observer.for_workers() if observer is not None
                           else ("relay", None))
            # Standard output, the workers' as well: where they write their
            # own log lines (ours or [log] file), else a pipe we read (JSON
            # events, or stray output).
            fds = {0: "w", 1: "r" if log_fd is None else log_fd, 2: "r", 3: theirs.fileno()}
            args = [sys.executable, "-m", "mailserver.workers.zygote", "--control", "3",
                    "--config", self.config.path, "--log", how]
            for i, (lc, port) in enumerate(self.ports):
                fds[4 + i] = port.fileno()
                args += ["--listen", f"{i}={4 + i}:{int(port.socket.family)}"]
            self.reactor.spawnProcess(proc, sys.executable, args, env=_worker_env(),
                                      path=os.getcwd(), childFDs=fds)
        except Exception:  # out of processes or descriptors: try again later
            if ours is not None:
                ours.close()
            self._zygote_later(proc, "cannot start the worker zygote")
            return
        finally:
            if theirs is not None:
                theirs.close()
        try:
            control = self.control_factory(self)
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                               OneProtocol(control))
        except Exception:  # no descriptor for our copy: that zygote is no use
            self._zygote_later(proc, "cannot talk to the worker zygote")
            try:
                proc.transport.signalProcess("KILL")
            except Exception:
                pass
            return
        finally:
            ours.close()
        self.zygote, self.control = proc, control
        self.zygote_pending = None
        for slot in range(self.count):
            if slot not in self.workers and slot not in self.pending:
                self._spawn(slot)

    def _zygote_later(self, proc: "ZygoteProcess", what: str) -> None:
        delay = self.zygote_restarts.delay(proc.started, self.reactor.seconds())
        log.failure("{what}; trying again in {delay:.0f} s", what=what, delay=delay)
        self.zygote_pending = self.reactor.callLater(delay, self._start_zygote)

    def _spawn(self, slot: int) -> None:
        """Ask the zygote for the worker of ``slot`` (starting one first when
        there is none), handing it one end of a fresh socket pair for the
        worker's AMP channel."""
        self.pending.pop(slot, None)
        if self.stopping:
            return
        if self.control is None:  # no zygote: its start fills every empty slot
            if self.zygote is None and self.zygote_pending is None:
                self._start_zygote()
            return
        worker = Worker(self, slot)
        ours = None
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            worker.handed = theirs  # open until the zygote has its copy
            channel = SupervisorChannel(self.state, worker)
            self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                               OneProtocol(channel))
        except Exception:  # out of descriptors: try again later
            worker.let_go()
            delay = self.restarts[slot].delay(worker.started, self.reactor.seconds())
            log.failure("cannot start a worker; trying again in {delay:.0f} s", delay=delay)
            self.pending[slot] = self.reactor.callLater(delay, self._spawn, slot)
            return
        finally:
            if ours is not None:
                ours.close()
        self.workers[slot] = worker
        self.control.fork(worker, worker.handed.fileno())

    def _unforked(self, slot: int) -> Optional[Worker]:
        worker = self.workers.get(slot)
        return worker if worker is not None and worker.pid is None else None

    def _release_zygote(self) -> None:
        """Every worker asked for is forked: let the zygote go.  The workers
        keep the pages they share with it; a zygote kept waiting would hold
        copies of every page they have written since."""
        if self.control is not None and all(w.pid is not None for w in self.workers.values()):
            self.control.close()
            self.control = None

    def forked(self, slot: int, pid: int) -> None:
        worker = self._unforked(slot)
        if worker is None:  # it said Ready first, or is gone
            self._release_zygote()
            return
        worker.pid = pid
        worker.let_go()
        owed, worker.owed = worker.owed, []
        for signum in owed:  # a SIGTERM sent while it was being forked goes now
            if signum in (signal.SIGTERM, signal.SIGKILL):
                worker.send(signum)
            else:
                worker.owed.append(signum)
        self._release_zygote()

    def fork_failed(self, slot: int, reason: str) -> None:
        worker = self._unforked(slot)
        if worker is not None:
            worker.let_go()
            self.ended(worker, f"not started: {reason}")
        self._release_zygote()

    def pid_ended(self, pid: int, how: str) -> None:
        for worker in list(self.workers.values()):
            if worker.pid == pid:
                self.ended(worker, how)

    def channel_lost(self, worker: Worker, tries: int = 20) -> None:
        """A worker's channel closed: it has ended (or is ending).  Once its
        zygote has gone it is our child (we are the subreaper) or init's:
        collect its exit status when we can, to say how it ended."""
        if worker.ended:
            return
        if worker.pid is None:
            self.ended(worker, "never started")
            return
        how = None
        try:
            pid, status = self.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:  # its zygote's child (it reports), or init's
            pid = status = 0
            if self.zygote is None:
                how = "exit status unknown"
        if pid:
            how = how_ended(*exit_code_and_signal(status))
        if how is None and tries > 0:  # still exiting, or its report is on the way
            self.reactor.callLater(0.05, self.channel_lost, worker, tries - 1)
            return
        if how is None:  # still running (draining?) or slow to exit: reap it later
            self._reap_later(worker.pid)
        self.ended(worker, how or "its channel closed")

    def _reap_later(self, pid: int) -> None:
        """Wait for ``pid`` every second until it has ended, so that a
        worker that outlived its channel leaves no zombie behind."""
        self.unreaped.add(pid)
        if self.reaping is None or not self.reaping.active():
            self.reaping = self.reactor.callLater(1.0, self._reap)

    def _reap(self) -> None:
        for pid in list(self.unreaped):
            try:
                done, _status = self.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.unreaped.discard(pid)
        self.reaping = None
        if self.unreaped:
            self.reaping = self.reactor.callLater(1.0, self._reap)

    def zygote_ended(self, proc: ZygoteProcess, reason) -> None:
        """The zygote exited: let go once its work was done, or early.  A
        worker it was asked for and never confirmed is told by its channel:
        closed if it was never forked, else it serves and says so."""
        if self.zygote is not proc:
            return
        self.zygote = self.control = None
        for worker in self.workers.values():
            worker.let_go()
        if not self.stopping and any(slot not in self.workers and slot not in self.pending
                                     for slot in range(self.count)):
            self._start_zygote()  # a worker ended while this one was leaving

    def ended(self, proc: Worker, how: str) -> None:
        if proc.ended:
            return
        proc.ended = True
        if self.workers.get(proc.slot) is proc:
            del self.workers[proc.slot]
        if self.aggregate is not None:
            self.aggregate.gone(proc, self.gauges)
        if self.stopping:
            log.info("worker {pid} stopped ({how})", pid=proc.pid, how=how)
            self._check_all_ended()
            return
        now = self.reactor.seconds()
        delay = self.restarts[proc.slot].delay(proc.started, now)
        log.error("worker {pid} ended ({how}); starting another in {delay:.0f} s",
                  pid=proc.pid, how=how, delay=delay)
        self.pending[proc.slot] = self.reactor.callLater(delay, self._spawn, proc.slot)

    def _check_all_ended(self) -> None:
        if not self.workers and self.all_ended is not None and not self.all_ended.called:
            self.all_ended.callback(None)

    def signal(self, signum: int) -> None:
        """Pass ``signum`` on to every worker; SIGHUP or SIGUSR1 reaches a
        worker still starting once it serves (before its handler is in
        place, either would end it)."""
        for proc in list(self.workers.values()):
            if proc.serving or signum in (signal.SIGTERM, signal.SIGKILL):
                proc.send(signum)
            elif signum not in proc.owed:
                proc.owed.append(signum)

    def _kill_all(self) -> None:
        """The grace is over: SIGKILL to every worker, and to a zygote still
        there (a worker it forked and never told of closes its channel)."""
        self.signal(signal.SIGKILL)
        if self.zygote is not None:
            try:
                self.zygote.transport.signalProcess("KILL")
            except Exception:
                pass

    def stopService(self):
        """Stop the workers (they drain), wait, then close the sockets."""
        super().stopService()
        self.stopping = True
        for call in [*self.pending.values(), self.zygote_pending]:
            if call is not None and call.active():
                call.cancel()
        self.pending.clear()
        self.all_ended = defer.Deferred()
        if not self.workers:
            self.all_ended.callback(None)
        self.signal(signal.SIGTERM)
        killer = self.reactor.callLater(self.grace + KILL_MARGIN, self._kill_all)

        def done(_):
            if killer.active():
                killer.cancel()
            if self.control is not None:  # the zygote exits when this closes
                self.control.close()
            for _lc, port in self.ports:
                port.stopListening()

        return self.all_ended.addCallback(done)


def _become_subreaper() -> None:
    """Have the workers, once their zygote has gone, re-parented to us
    rather than to init (Linux ``PR_SET_CHILD_SUBREAPER``), so that their
    exit status can be told.  Elsewhere, or if it fails, init reaps them."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def _worker_env() -> dict:
    """The supervisor's environment, minus systemd's notify socket (only the
    supervisor talks to systemd), with this package importable."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    import mailserver

    top = os.path.dirname(os.path.dirname(os.path.abspath(mailserver.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
    return env
