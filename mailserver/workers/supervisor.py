# -*- test-case-name: tests.unit.test_workers -*-
"""The supervisor: the twistd process when ``[server] workers`` is above 1.

:class:`WorkerPool` binds every listener in ``privilegedStartService`` (as
root, before twistd drops privileges; the same endpoints as one process
uses, UNIX-socket locks included) but never accepts on them: it stops
reading at once.  Once running as the service user it starts the workers
(``python -m mailserver.workers.worker``), handing each, by ``childFDs``,
one end of a fresh UNIX socket pair for its AMP channel and every listening
socket, which the worker adopts.  The supervisor itself keeps the outbound
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
from twisted.logger import Logger, LogLevel, globalLogPublisher

from mailserver.workers.channel import OneProtocol, SupervisorChannel, SupervisorState

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


class WorkerProcess(protocol.ProcessProtocol):
    """One worker process: its log lines and its end."""

    def __init__(self, pool: "WorkerPool", slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid: Optional[int] = None
        self.started = pool.reactor.seconds()
        self.buffer = b""
        self.ended = False
        self.serving = False  # said Ready: its signal handlers are in place
        self.owed: List[int] = []  # signals for it once it serves

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            relog(line, self.pid)

    def errReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.error("worker {pid}: {line}", pid=self.pid, line=line)

    def processEnded(self, reason) -> None:
        self.ended = True
        if self.buffer:
            relog(self.buffer, self.pid)
            self.buffer = b""
        self.pool.ended(self, reason)


def relog(line: bytes, pid) -> None:
    """Log again one event a worker wrote (see ``worker.relay_line``)."""
    try:
        record = json.loads(line)
        text = record["x"]
        level = LogLevel.levelWithName(record["l"])
    except (ValueError, KeyError, TypeError, Exception):
        text, level, record = line.decode("utf-8", "replace"), LogLevel.info, {}
    namespace = record.get("n", "mailserver")
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
        self.workers: Dict[int, WorkerProcess] = {}  # slot -> its process
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
        for slot in range(self.count):
            self._spawn(slot)

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
            worker.serving = True
            owed, worker.owed = worker.owed, []
            for signum in owed:
                self._send(worker, signum)
        self.readied.add(worker.slot if worker is not None else pid)
        if not self.announced and len(self.readied) >= self.count:
            self.announced = True
            self.top.announce(f", {self.count} worker processes")

    def _spawn(self, slot: int) -> None:
        self.pending.pop(slot, None)
        if self.stopping:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        observer = getattr(self.top, "log_observer", None)
        how, log_fd = observer.for_workers() if observer is not None else ("relay", None)
        # Standard output: where the worker writes its own log lines (ours or
        # [log] file), else a pipe we read (JSON events, or stray output).
        fds = {0: "w", 1: "r" if log_fd is None else log_fd, 2: "r", 3: theirs.fileno()}
        args = [sys.executable, "-m", "mailserver.workers.worker",
                "--config", self.config.path, "--channel", "3", "--log", how]
        for i, (lc, port) in enumerate(self.ports):
            fds[4 + i] = port.fileno()
            args += ["--listen", f"{i}={4 + i}:{int(port.socket.family)}"]
        proc = WorkerProcess(self, slot)
        try:
            self.reactor.spawnProcess(proc, sys.executable, args, env=_worker_env(),
                                      path=os.getcwd(), childFDs=fds)
        except Exception:  # out of processes or descriptors: try again later
            ours.close()
            delay = self.restarts[slot].delay(proc.started, self.reactor.seconds())
            log.failure("cannot start a worker; trying again in {delay:.0f} s", delay=delay)
            self.pending[slot] = self.reactor.callLater(delay, self._spawn, slot)
            return
        finally:
            theirs.close()
        self.workers[slot] = proc
        channel = SupervisorChannel(self.state, proc)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, OneProtocol(channel))
        ours.close()

    def ended(self, proc: WorkerProcess, reason) -> None:
        if self.workers.get(proc.slot) is proc:
            del self.workers[proc.slot]
        if self.aggregate is not None:
            self.aggregate.gone(proc, self.gauges)
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {sig}" if sig else f"exit {code}"
        if self.stopping:
            log.info("worker {pid} stopped ({how})", pid=proc.pid, how=how)
            if not self.workers and self.all_ended is not None and not self.all_ended.called:
                self.all_ended.callback(None)
            return
        now = self.reactor.seconds()
        delay = self.restarts[proc.slot].delay(proc.started, now)
        log.error("worker {pid} ended ({how}); starting another in {delay:.0f} s",
                  pid=proc.pid, how=how, delay=delay)
        self.pending[proc.slot] = self.reactor.callLater(delay, self._spawn, proc.slot)

    def signal(self, signum: int) -> None:
        """Pass ``signum`` on to every worker; SIGHUP or SIGUSR1 reaches a
        worker still starting once it serves (before its handler is in
        place, either would end it)."""
        for proc in list(self.workers.values()):
            if proc.serving or signum in (signal.SIGTERM, signal.SIGKILL):
                self._send(proc, signum)
            elif signum not in proc.owed:
                proc.owed.append(signum)

    @staticmethod
    def _send(proc: WorkerProcess, signum: int) -> None:
        try:
            proc.transport.signalProcess(signum)
        except Exception:
            pass  # already gone: processEnded will tell

    def stopService(self):
        """Stop the workers (they drain), wait, then close the sockets."""
        super().stopService()
        self.stopping = True
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        self.all_ended = defer.Deferred()
        if not self.workers:
            self.all_ended.callback(None)
        self.signal(signal.SIGTERM)
        killer = self.reactor.callLater(self.grace + KILL_MARGIN, self.signal, signal.SIGKILL)

        def done(_):
            if killer.active():
                killer.cancel()
            for _lc, port in self.ports:
                port.stopListening()

        return self.all_ended.addCallback(done)


def _worker_env() -> dict:
    """The supervisor's environment, minus systemd's notify socket (only the
    supervisor talks to systemd), with this package importable."""
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    import mailserver

    top = os.path.dirname(os.path.dirname(os.path.abspath(mailserver.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (top, env.get("PYTHONPATH")) if p)
    return env
