# -*- test-case-name: tests.integration.test_workers -*-
"""A worker process: forked by the zygote (:mod:`mailserver.workers.zygote`),
which calls :func:`main` with the arguments below; ``python -m
mailserver.workers.worker`` runs the same by hand, for debugging.

Arguments: ``--config FILE``, ``--channel FD`` (its end of the AMP socket
pair), one ``--listen INDEX=FD:FAMILY`` per listener, in the order of the
configuration, and ``--log HOW``.  It builds the same listeners as one
process would (:func:`~mailserver.service.build_service` with a channel), on
sockets it adopts instead of binding, and runs until SIGTERM (drain, exit 0)
or until the supervisor's channel closes (the supervisor is gone: drain and
exit).  It runs as the user the supervisor runs as.

It writes its own log lines (:func:`mailserver.logs.worker_observer`), as
``--log`` says (:meth:`mailserver.logs.MailLogObserver.for_workers`):
``fd``, to its standard output, which is the supervisor's standard output or
``[log] file`` (reopened on SIGUSR1); ``syslog``, as syslog datagrams only;
``relay``, as JSON objects on standard output, one a line, for the
supervisor to log again (:func:`relay_line`; for twistd's rotating
``twistd.log``, which only the supervisor may write).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

from twisted.internet import defer
from twisted.logger import Logger, formatEvent

log = Logger(namespace="mailserver")


class AdoptedEndpoint:
    """A server endpoint over a listening socket the supervisor bound: the
    reactor adopts (a duplicate of) it."""

    def __init__(self, reactor, fd: int, family: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family

    def listen(self, factory):
        return defer.execute(self._adopt, factory)

    def _adopt(self, factory):
        port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        if self.family == socket.AF_UNIX:
            # The socket file is the supervisor's: closing our copy must not
            # remove it (twisted.internet.unix.Port unlinks its path).
            port.port = "\0" + os.fsdecode(port.port or "")
        return port


def worker_outbox(config, reactor, pool, channel):
    """Where a worker's listeners queue mail: the same spool, written the
    same way (durable before the 250); the supervisor, woken over the
    channel, delivers it."""
    from mailserver.queue.outbox import Outbox
    from mailserver.queue.spool import QueueSpool

    spool = QueueSpool(config.queue.directory, clock=reactor.seconds, fsync=config.store.fsync)
    return Outbox(spool, pool, reactor, wake=channel.wake)


def relay_line(event: dict) -> str:
    """An event as one JSON line for the supervisor to log again
    (``--log relay``, see the module's docstring; read by
    :func:`~mailserver.workers.supervisor.relog`): time, level, namespace,
    text and the event's own fields."""
    from mailserver.logs import event_fields, event_text

    level = event.get("log_level")
    try:
        record = {"p": os.getpid(), "t": event.get("log_time"),
                  "l": level.name if level else "info",
                  "n": event.get("log_namespace", "-"), "x": event_text(event),
                  "f": event_fields(event)}
        return json.dumps(record, default=str) + "\n"
    except Exception:
        return json.dumps({"l": "error", "x": "unloggable event: " + repr(formatEvent(event))}
                          ) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailserver-worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--log", choices=("fd", "syslog", "relay"), default="relay")
    args = parser.parse_args(argv)
    # The supervisor passes SIGUSR1 on once this worker serves; until the
    # service installs its handler (or for good, with nothing to reopen) it
    # must not end the process, SIGUSR1's default.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    from twisted.logger import globalLogBeginner

    from mailserver.config import load_config
    from mailserver.logs import FdDestination, MailLogObserver, worker_observer

    config = load_config(args.config)  # an error: a traceback on stderr, which is relayed
    if args.log == "relay":  # batched as the others: one write a reactor turn
        lines = MailLogObserver(relay_line, [FdDestination(sys.stdout.fileno())])
    else:
        lines = worker_observer(config.log, os.getpid(), fd=1 if args.log == "fd" else None)
    globalLogBeginner.beginLoggingTo([lines], redirectStandardIO=False)
    from twisted.internet import reactor

    lines.batch(reactor)

    from mailserver.service import build_service
    from mailserver.workers.channel import OneProtocol, Ready, WorkerChannel

    adopted = {}
    for spec in args.listen:
        index, _, rest = spec.partition("=")
        fd, _, family = rest.partition(":")
        adopted[config.listeners[int(index)].name] = (int(fd), int(family))

    def supervisor_gone():
        if reactor.running:
            log.error("worker {pid}: supervisor channel closed, stopping", pid=os.getpid())
            reactor.stop()

    channel = WorkerChannel(reactor, on_lost=supervisor_gone)
    reactor.adoptStreamConnection(args.channel, socket.AF_UNIX, OneProtocol(channel))
    os.close(args.channel)
    top = build_service(config, reactor, channel=channel, adopted=adopted)
    if args.log != "relay":
        top.log_observer = lines  # SIGUSR1 reopens [log] file, as in the supervisor
    top.privilegedStartService()
    for fd, _family in adopted.values():
        os.close(fd)  # adopted: the reactor holds its own duplicate
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)

    def started():
        # Stopped by the supervisor alone: a Ctrl-C at a terminal reaches the
        # whole process group, and the supervisor passes SIGTERM on itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        top.startService()
        channel.callRemote(Ready, pid=os.getpid()).addErrback(lambda f: None)

    reactor.callWhenRunning(started)
    try:
        reactor.run()
    finally:
        lines.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
