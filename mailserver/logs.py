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
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
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


def json_line(event: dict) -> str:
    """One JSON object, one line (newlines inside values are escaped)."""
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


def text_line(event: dict) -> Optional[str]:
    """twistd's own text line: time, [namespace#level], message.

    The same text as ``formatEventAsClassicLogText``; the usual event (a
    ``{field}`` format, a time, a namespace and a level, no traceback) takes
    a short path that costs a fifth as much, anything else goes to Twisted.
    """
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


class FileDestination:
    """Appends to ``path``; :meth:`reopen` after a rotation."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = self._open()

    def _open(self):
        return open(self.path, "a", encoding="utf-8", errors="replace")

    def write(self, line: str) -> None:
        self.file.write(line)
        self.file.flush()

    def reopen(self) -> None:
        """Close and open the file again (it may have been moved away)."""
        old, self.file = self.file, self._open()
        old.close()


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
    """Formats each event once and hands the line to every destination."""

    def __init__(self, fmt: Callable[[dict], Optional[str]], destinations: List,
                 syslog: Optional[SyslogDestination] = None, json_format: bool = False) -> None:
        self.format = fmt
        self.destinations = destinations
        self.syslog = syslog
        self.json_format = json_format

    def __call__(self, event: dict) -> None:
        line = self.format(event)
        if line is None:
            return
        for d in self.destinations:
            try:
                d.write(line)
            except Exception:  # a full disk must not stop the server
                pass
        if self.syslog is not None:
            text = line.rstrip("\n") if self.json_format else event_text(event)
            self.syslog.send(text, event.get("log_level"))

    def reopen(self) -> None:
        for d in self.destinations:
            if isinstance(d, FileDestination):
                d.reopen()


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


def build_observer(log_config, twistd_options=None) -> MailLogObserver:
    """The observer ``[log]`` asks for (by default twistd's text lines on
    twistd's output)."""
    json_format = log_config.format == "json"
    destinations: List = []
    if log_config.file:
        destinations.append(FileDestination(log_config.file))
    elif not log_config.syslog:
        destinations.append(StreamDestination(_twistd_output(twistd_options)))
    syslog = SyslogDestination(log_config.syslog_socket) if log_config.syslog else None
    return MailLogObserver(json_line if json_format else text_line, destinations, syslog,
                           json_format)


__all__ = ["MailLogObserver", "build_observer", "json_line", "event_fields", "text_line",
           "FileDestination", "SyslogDestination"]
