# -*- test-case-name: tests.unit.test_logs -*-
"""Where log lines go, and in which format (``[log]``).

The default is the format of twistd's own observer: maillog-style text
lines on twistd's output (standard output with ``-n``, ``twistd.log``
otherwise), written by an observer of ours that produces the same lines for
a fraction of the CPU (:func:`text_line`: the time stamp is formatted once a
second, plain ``{field}`` formats go through ``str.format_map``).
:func:`build_observer` makes that observer, or the one ``[log]`` asks for,
and twistd installs it instead of its own (the service sets it as the
application's ``ILogObserver`` component, which ``twistd``'s ``AppLogger``
looks for before building its default):

* ``format = "json"``: one JSON object per line: ``time`` (ISO 8601, UTC),
  ``level``, ``namespace``, ``text`` (the line the text format would show)
  and the event's own fields (``id`` for a queue id, ``client``,
  ``sender``...).  Fields whose name looks like a secret (password, secret,
  credentials, token) are never written, whatever an event carries.
* ``file``: lines are appended to that file, which ``SIGUSR1`` reopens
  (logrotate's ``create`` plus ``postrotate kill -USR1``); being opened for
  appending, it also survives ``copytruncate``.
* ``syslog = true``: each line also goes to the local syslog socket with
  facility ``mail`` and ident ``mailserver`` (syslog adds its own time).

With ``syslog`` on and no ``file``, twistd's output gets nothing, so a
systemd journal does not receive every line twice.

Worker processes (``[server] workers``) write their own lines, in the same
format, to the same place: :func:`worker_observer` makes a worker's
observer, whose lines name the worker (``[mailserver.smtpd#info worker
4242]``; in JSON a ``worker`` field).  Its supervisor hands it, as its
standard output, the descriptor its own lines go to
(:meth:`MailLogObserver.for_workers`): twistd's standard output or the
``[log]`` file, which the worker reopens by name on ``SIGUSR1`` as the
supervisor does.  Every write carries whole lines, and at most
:data:`PIPE_BUF` octets when the descriptor is a pipe or a socket, so the
lines of different processes never mix within a line; a file is opened for
appending, where one write is one piece.  A worker sends its own syslog
datagrams (its pid in the tag, like Postfix's processes).  twistd's
``twistd.log`` (a daemon without ``[log] file``) is the one exception: that
file is rotated by the supervisor's ``LogFile`` by the size it wrote itself,
renaming it under any other writer, so there the workers still send their
events to the supervisor, which logs them (:mod:`mailserver.workers`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import socket
import stat
import sys
import threading
import time
from typing import Callable, List, Optional

from twisted.logger import (
    ILogObserver, LogLevel, formatEvent, formatEventAsClassicLogText, formatTime,
)
from zope.interface import implementer

#: Event keys that are never written, whatever their value.
SECRET = re.compile(r"pass|secret|credential|token|authz?_?data", re.IGNORECASE)
#: Keys of the legacy (twisted.python.log) event dictionary, already in ``text``.
_LEGACY = frozenset({"message", "system", "isError", "time", "format", "why", "failure"})

LOG_MAIL = 2  # syslog facility "mail"
#: The most a write to a pipe may carry and still arrive in one piece
#: (POSIX's PIPE_BUF: 4096 on Linux, at least 512 anywhere).
PIPE_BUF = getattr(select, "PIPE_BUF", 512)
_SEVERITY = {LogLevel.debug: 7, LogLevel.info: 6, LogLevel.warn: 4, LogLevel.error: 3,
             LogLevel.critical: 2}


def _plain(value):
    """A JSON-friendly form of a field value."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return str(value)


def event_fields(event: dict) -> dict:
    """The event's own fields, minus Twisted's bookkeeping and anything secret."""
    out = {}
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or SECRET.search(key):
            continue
        out[key] = _plain(value)
    return out


def event_text(event: dict) -> str:
    """The event's message, with its traceback when it carries a failure."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            text += "\n" + failure.getTraceback()
        except Exception:
            pass
    return text


def json_line(event: dict, worker: Optional[int] = None) -> str:
    """One JSON object, one line (newlines inside values are escaped); a
    worker process's line ends with its pid as ``worker``."""
    level = event.get("log_level")
    stamp = event.get("log_time") or time.time()
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp))
        + f".{int(stamp % 1 * 1000):03d}Z",
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "text": event_text(event),
    }
    for key, value in event_fields(event).items():
        record.setdefault(key, value)
    if worker is not None:
        record["worker"] = worker
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


class _SecondStamp:
    """twistd's time stamp (RFC 3339, local offset), formatted once per second.

    Every line of a busy server falls in a second already formatted; the
    stamp is Twisted's own ``formatTime`` of that whole second, so the text
    is the same and a change of offset (summer time) is seen at once.
    """

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = None
        self.text = ""

    def __call__(self, when: float) -> str:
        second = int(when)
        if second != self.second:
            self.text = formatTime(second)
            self.second = second
        return self.text


_stamp = _SecondStamp()


def text_line(event: dict, worker: Optional[int] = None) -> Optional[str]:
    """twistd's own text line: time, [namespace#level], message.

    The same text as ``formatEventAsClassicLogText``; the usual event (a
    ``{field}`` format, a time, a namespace and a level, no traceback) takes
    a short path that costs a fifth as much, anything else goes to Twisted.
    A worker process's line names it: ``[namespace#level worker PID]``.
    """
    if worker is not None:
        return _worker_text_line(event, worker)
    fmt = event.get("log_format")
    when = event.get("log_time")
    level = event.get("log_level")
    if (fmt is None or when is None or level is None or "()" in fmt or "log_failure" in event
            or "log_system" in event or "log_flattened" in event):
        return formatEventAsClassicLogText(event)
    try:
        text = fmt.format_map(event)
    except Exception:
        return formatEventAsClassicLogText(event)  # Twisted's "Unable to format event"
    if not text:
        return None
    if "\n" in text:
        text = text.replace("\n", "\n\t")
    return f"{_stamp(when)} [{event.get('log_namespace', '-')}#{level.name}] {text}\n"


def _worker_text_line(event: dict, worker: int) -> Optional[str]:
    """A worker's text line: its system is always ``namespace#level worker
    PID`` (a ``log_system`` of the event's own is not shown), the message
    carries its traceback, the level defaults to info; the line its
    supervisor wrote when it relayed the worker's events."""
    fmt = event.get("log_format")
    text = None
    if fmt is not None and "()" not in fmt and "log_failure" not in event \
            and "log_flattened" not in event:
        try:
            text = fmt.format_map(event)
        except Exception:
            pass  # event_text gives Twisted's "Unable to format event"
    if text is None:
        text = event_text(event)
    if not text:
        return None
    if "\n" in text:
        text = text.replace("\n", "\n\t")
    when = event.get("log_time")
    level = event.get("log_level") or LogLevel.info
    return (f"{_stamp(when) if when is not None else '-'} "
            f"[{event.get('log_namespace', '-')}#{level.name} worker {worker}] {text}\n")


def write_lines(fd: int, data: bytes, limit: Optional[int] = None) -> None:
    """Write ``data`` (whole lines) to ``fd``, each write at most ``limit``
    octets and cut after a newline; a single line longer than ``limit`` goes
    in one write of its own."""
    view = memoryview(data)
    start, end = 0, len(data)
    while start < end:
        stop = end
        if limit is not None and end - start > limit:
            cut = data.rfind(b"\n", start, start + limit)
            if cut < 0:  # one long line
                cut = data.find(b"\n", start + limit)
                cut = end - 1 if cut < 0 else cut
            stop = cut + 1
        while start < stop:  # a short write (a full disk, a signal) goes on
            start += os.write(fd, view[start:stop])


class FdDestination:
    """Writes to a file descriptor, one ``os.write`` per :meth:`write`.

    Pipes and sockets (standard output under systemd or a test) get writes
    of at most :data:`PIPE_BUF` octets, cut at line ends, which the kernel
    keeps whole even when other processes write to the same pipe.  ``path``,
    when given, is the file :meth:`reopen` opens again (for appending) in
    place of the descriptor, which keeps its number."""

    def __init__(self, fd: int, path: Optional[str] = None) -> None:
        self.fd = fd
        self.path = path
        self.limit = self._limit()

    def _limit(self) -> Optional[int]:
        try:
            regular = stat.S_ISREG(os.fstat(self.fd).st_mode)
        except OSError:
            regular = False
        return None if regular else PIPE_BUF

    def write(self, text: str) -> None:
        write_lines(self.fd, text.encode("utf-8", "replace"), self.limit)

    def reopen(self) -> None:
        """Open ``path`` again where the descriptor was (it may have been moved away)."""
        if self.path is None:
            return
        fresh = _open_append(self.path)
        try:
            os.dup2(fresh, self.fd, inheritable=self.fd <= 2)
        finally:
            os.close(fresh)
        self.limit = self._limit()


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)


class FileDestination(FdDestination):
    """Appends to ``path`` (opened ``O_APPEND``: every write lands at the
    end, whoever else appends); :meth:`reopen` after a rotation."""

    def __init__(self, path: str) -> None:
        super().__init__(_open_append(path), path)


class StreamDestination:
    """Writes to a stream opened elsewhere (standard output, twistd's LogFile)."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def write(self, line: str) -> None:
        self.stream.write(line)
        self.stream.flush()


class SyslogDestination:
    """RFC 3164-style datagrams to the local syslog socket, facility mail.

    A socket that is missing or refuses loses the line (logging must never
    stop the server); the next line tries to connect again.  Sends never
    block: when syslog falls behind, lines are dropped rather than the
    reactor held up."""

    def __init__(self, path: str = "/dev/log", ident: str = "mailserver") -> None:
        self.path = path
        self.ident = ident
        self.sock: Optional[socket.socket] = None

    def send(self, text: str, level) -> None:
        pri = LOG_MAIL * 8 + _SEVERITY.get(level, 6)
        data = f"<{pri}>{self.ident}[{os.getpid()}]: {text}".encode("utf-8", "replace")
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.connect(self.path)
                self.sock.setblocking(False)  # a stalled syslog must not stall the reactor
            self.sock.send(data[:65000])
        except BlockingIOError:
            pass  # its queue is full: this line is lost, the socket stays
        except OSError:
            if self.sock is not None:
                self.sock.close()
            self.sock = None


@implementer(ILogObserver)
class MailLogObserver:
    """Formats each event once and hands the line to every destination.

    Once :meth:`batch` has given it a reactor, lines for the destinations
    are gathered and written together once per reactor turn (one system
    call, not one a line; a worker process does this); a process killed
    outright loses at most that turn's lines.  Syslog gets one datagram a
    line as it comes."""

    def __init__(self, fmt: Callable[[dict], Optional[str]], destinations: List,
                 syslog: Optional[SyslogDestination] = None, json_format: bool = False) -> None:
        self.format = fmt
        self.destinations = destinations
        self.syslog = syslog
        self.json_format = json_format
        self.reactor = None
        self.pending: List[str] = []
        self.lock = threading.Lock()

    def batch(self, reactor) -> None:
        self.reactor = reactor

    def __call__(self, event: dict) -> None:
        line = self.format(event)
        if line is None:
            return
        if self.destinations:
            if self.reactor is None or not self.reactor.running:
                self.flush()
                self._write(line)
            else:
                with self.lock:
                    self.pending.append(line)
                    first = len(self.pending) == 1
                if first:  # from any thread: written on the reactor's next turn
                    self.reactor.callFromThread(self.flush)
        if self.syslog is not None:
            text = line.rstrip("\n") if self.json_format else event_text(event)
            self.syslog.send(text, event.get("log_level"))

    def flush(self) -> None:
        """Write the lines gathered so far."""
        with self.lock:
            lines, self.pending = self.pending, []
        if lines:
            self._write("".join(lines))

    def _write(self, text: str) -> None:
        for d in self.destinations:
            try:
                d.write(text)
            except Exception:  # a full disk must not stop the server
                pass

    def reopen(self) -> None:
        """SIGUSR1: open the ``[log]`` file again (logrotate moved it away)."""
        self.flush()  # what was logged before the signal goes to the old file
        for d in self.destinations:
            if isinstance(d, FdDestination):
                try:
                    d.reopen()
                except OSError as e:  # goes on with the old file, and says so
                    self(_reopen_failed(d.path, e))

    def for_workers(self):
        """How a worker process logs, as ``(how, fd)``: ``("fd", fd)``, it
        writes its own lines to ``fd`` (twistd's standard output or the
        ``[log]`` file); ``("syslog", None)``, it only sends its own syslog
        datagrams; ``("relay", None)``, it sends its events to this process
        (twistd's rotating ``twistd.log``, see the module's docstring)."""
        for d in self.destinations:
            if isinstance(d, FdDestination):
                return "fd", d.fd
        return ("relay", None) if self.destinations else ("syslog", None)


def _reopen_failed(path, error) -> dict:
    return {"log_format": "cannot reopen the log file {path}: {error}; still writing to "
                          "the old one", "log_level": LogLevel.error,
            "log_namespace": "mailserver", "log_time": time.time(), "path": path,
            "error": str(error)}


def _twistd_output(twistd_options):
    """Where twistd itself would have written: its --logfile, standard
    output with -n, or twistd.log (rotated as twistd rotates it)."""
    opts = twistd_options or {}
    name = opts.get("logfile") if hasattr(opts, "get") else None
    nodaemon = bool(opts.get("nodaemon")) if hasattr(opts, "get") else True
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    from twisted.python import logfile

    return logfile.LogFile.fromFullPath(name or "twistd.log")


def _stream_destination(stream):
    """Standard output by its descriptor (lines that stay whole beside the
    workers' own); anything else (twistd's LogFile, a test's capture)
    through its ``write``."""
    if stream is sys.stdout:
        try:
            fd = stream.fileno()
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # io.UnsupportedOperation is both
        else:
            return FdDestination(fd)
    return StreamDestination(stream)


def build_observer(log_config, twistd_options=None) -> MailLogObserver:
    """The observer ``[log]`` asks for (by default twistd's text lines on
    twistd's output)."""
    json_format = log_config.format == "json"
    destinations: List = []
    if log_config.file:
        destinations.append(FileDestination(log_config.file))
    elif not log_config.syslog:
        destinations.append(_stream_destination(_twistd_output(twistd_options)))
    syslog = SyslogDestination(log_config.syslog_socket) if log_config.syslog else None
    return MailLogObserver(json_line if json_format else text_line, destinations, syslog,
                           json_format)


def worker_observer(log_config, pid: int, fd: Optional[int] = None) -> MailLogObserver:
    """A worker process's observer: the lines its supervisor would write
    (naming the worker ``pid``), written to ``fd`` (what its supervisor
    handed it, see :meth:`MailLogObserver.for_workers`; none with syslog
    alone), reopening ``[log] file`` by name, and its own syslog datagrams."""
    json_format = log_config.format == "json"
    fmt = functools.partial(json_line if json_format else text_line, worker=pid)
    destinations = [FdDestination(fd, log_config.file or None)] if fd is not None else []
    syslog = SyslogDestination(log_config.syslog_socket) if log_config.syslog else None
    return MailLogObserver(fmt, destinations, syslog, json_format)


__all__ = ["MailLogObserver", "build_observer", "worker_observer", "json_line", "event_fields",
           "text_line", "FdDestination", "FileDestination", "SyslogDestination", "write_lines"]
