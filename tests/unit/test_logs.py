"""Log formats and destinations ([log]): JSON lines, files, syslog."""

from __future__ import annotations

import json
import socket

from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure

from mailserver.config import LogConfig
from mailserver.logs import (
    FileDestination, MailLogObserver, build_observer, json_line, text_line,
)


def event(**fields) -> dict:
    base = {"log_format": "{id}: client={client}, from=<{sender}>", "log_level": LogLevel.info,
            "log_namespace": "mailserver.smtpd", "log_time": 1764775200.25,
            "id": "ABCDEFGH23456789", "client": "192.0.2.1", "sender": "a@example.org"}
    base.update(fields)
    return base


def test_json_line_has_time_level_namespace_text_and_fields():
    """A JSON line is one object with the event's own fields beside the text."""
    line = json_line(event())
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["time"] == "2025-12-03T15:20:00.250Z"
    assert record["level"] == "info" and record["namespace"] == "mailserver.smtpd"
    assert record["text"] == "ABCDEFGH23456789: client=192.0.2.1, from=<a@example.org>"
    assert record["id"] == "ABCDEFGH23456789" and record["sender"] == "a@example.org"
    assert not any(k.startswith("log_") for k in record)


def test_json_line_never_writes_a_secret_field():
    """Fields named like a password, secret or credentials are dropped, values and all."""
    record = json.loads(json_line(event(password="hunter2", bind_password="x1",
                                        credentials=object(), srs_secret="s3")))
    text = json.dumps(record)
    for value in ("hunter2", "x1", "s3"):
        assert value not in text
    assert "credentials" not in record


def test_json_line_turns_objects_into_text_and_keeps_tracebacks():
    """Values that JSON cannot hold become strings; a failure adds its traceback."""
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    record = json.loads(json_line(event(log_failure=failure, where=("a", 1), obj=object())))
    assert "ZeroDivisionError" in record["text"]
    assert record["where"] == ["a", 1] and record["obj"].startswith("<object")


def test_defaults_write_twistds_lines_to_twistds_output(capsys):
    """By default our observer writes twistd's own text lines to standard
    output (twistd -n)."""
    observer = build_observer(LogConfig(), {"nodaemon": True, "logfile": None})
    observer(event())
    assert capsys.readouterr().out == formatEventAsClassicLogText(event())


def test_text_line_is_twisteds_classic_text():
    """The short path gives exactly Twisted's line, whatever the event holds."""
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    cases = [
        event(),
        event(log_time=1764775200.999),  # the same second as the one before
        event(log_time=1764775201.0),
        event(log_format="two\nlines {id}"),
        event(log_format="{id!r:>20} {client[0]} {missing}"),
        event(log_format="{sender.upper}"),
        event(log_format="call {f()}", f=lambda: "called"),
        event(log_format=""),
        event(log_system="legacy-system"),
        event(log_failure=failure),
        event(log_level=LogLevel.warn),
        {"log_format": "no time", "log_level": LogLevel.info},
    ]
    for ev in cases:
        assert text_line(ev) == formatEventAsClassicLogText(ev), ev


def test_text_to_a_file_and_reopen(tmp_path):
    """Text lines go to the file; after a rename, reopen starts a new file."""
    path = tmp_path / "mail.log"
    observer = build_observer(LogConfig(file=str(path)))
    observer(event())
    assert "ABCDEFGH23456789: client=192.0.2.1" in path.read_text()
    assert path.read_text() == text_line(event())
    path.rename(tmp_path / "mail.log.1")
    observer.reopen()
    observer(event(id="ZZZZZZZZZZZZZZZZ"))
    assert "ZZZZZZZZZZZZZZZZ" in path.read_text()
    assert "ZZZZ" not in (tmp_path / "mail.log.1").read_text()


def test_file_survives_copytruncate(tmp_path):
    """Appending after the file was truncated writes at the new end, not past a hole."""
    path = tmp_path / "mail.log"
    dest = FileDestination(str(path))
    dest.write("x" * 1000 + "\n")
    path.write_text("")  # what logrotate's copytruncate does
    dest.write("after\n")
    assert path.read_text() == "after\n"


def test_json_to_standard_output_with_nodaemon(capsys):
    """JSON with no file goes where twistd -n writes: standard output."""
    observer = build_observer(LogConfig(format="json"), {"nodaemon": True, "logfile": None})
    observer(event())
    assert json.loads(capsys.readouterr().out)["client"] == "192.0.2.1"


def test_syslog_gets_facility_mail_and_no_other_output(tmp_path, capsys):
    """With syslog on, lines reach the socket as mail.info datagrams, and nothing else."""
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        observer = build_observer(LogConfig(syslog=True, syslog_socket=path),
                                  {"nodaemon": True})
        observer(event())
        observer(event(log_level=LogLevel.error, log_format="broken"))
        info, error = listener.recv(4096).decode(), listener.recv(4096).decode()
    assert info.startswith("<22>mailserver[") and info.endswith(
        "ABCDEFGH23456789: client=192.0.2.1, from=<a@example.org>")
    assert error.startswith("<19>mailserver[") and error.endswith(": broken")
    assert capsys.readouterr().out == ""


def test_syslog_socket_missing_loses_lines_quietly(tmp_path):
    """No syslog socket: the line is lost, the server goes on."""
    observer = build_observer(LogConfig(syslog=True, syslog_socket=str(tmp_path / "none")))
    observer(event())


def test_unwritable_destination_does_not_raise():
    """A destination that fails (a full disk) does not stop logging."""
    class Broken:
        def write(self, line):
            raise OSError(28, "No space left on device")

    MailLogObserver(text_line, [Broken()])(event())


def test_config_errors_hide_secret_values(tmp_path, monkeypatch):
    """A password of the wrong type is refused without its value in the message."""
    import pytest

    from mailserver.config import load_config
    from mailserver.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.ldif").write_text("")
    path = tmp_path / "c.toml"
    path.write_text('[domains]\nlocal = ["example.test"]\n[directory]\nldif_file = "users.ldif"\n'
                    'bind_password = 918273645\n[[listeners]]\naddress = "127.0.0.1:2525"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "directory.bind_password: expected a string" in str(e.value)
    assert "918273645" not in str(e.value)


def test_json_follows_twistds_logfile_option(tmp_path):
    """With no [log] file, JSON goes to twistd's --logfile when one is given."""
    path = tmp_path / "twistd.log"
    observer = build_observer(LogConfig(format="json"),
                              {"nodaemon": True, "logfile": str(path)})
    observer(event())
    observer.destinations[0].stream.close()
    assert json.loads(path.read_text())["id"] == "ABCDEFGH23456789"


# -- worker processes: their own lines, written by themselves -----------------------
def test_a_workers_lines_are_those_its_supervisor_wrote_for_it(monkeypatch):
    """What a worker writes itself is, byte for byte, what the supervisor
    wrote when it relayed the worker's events (relay_line, which names the
    worker, then relog), in text and in JSON: ``worker PID`` in the
    brackets, a ``worker`` field."""
    import os

    from twisted.logger import globalLogPublisher

    from mailserver.logs import worker_observer
    from mailserver.workers.supervisor import relog
    from mailserver.workers.worker import relay_line

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    cases = [event(), event(log_format="two\nlines {id}"), event(log_level=LogLevel.warn),
             event(log_format="{id!r:>20} {missing}"), event(log_format="odd {{braces}}"),
             event(log_system="legacy-system"), event(log_failure=failure),
             event(log_format="call {f()}", f=lambda: "called"),
             {"log_format": "no time", "log_level": LogLevel.info}]
    for json_format in (False, True):
        ours = worker_observer(LogConfig(format="json" if json_format else "text"), 4242)
        relayed = []
        globalLogPublisher.addObserver(relayed.append)
        try:
            with monkeypatch.context() as m:
                m.setattr(os, "getpid", lambda: 4242)  # the worker relay_line runs in
                lines = [relay_line(ev) for ev in cases]
            for line in lines:
                relog(line.encode(), None)
        finally:
            globalLogPublisher.removeObserver(relayed.append)
        relayed = [e for e in relayed if e.get("worker") == 4242]
        supervisor = json_line if json_format else text_line
        for ev, again in zip(cases, relayed, strict=True):
            mine, theirs = ours.format(ev), supervisor(again)
            if json_format and "log_time" not in ev:  # each says "now"
                mine, theirs = (json.loads(x) for x in (mine, theirs))
                del mine["time"], theirs["time"]
            assert mine == theirs, ev
        if not json_format:
            assert ours.format(event()).startswith(
                text_line(event()).split(" [")[0] + " [mailserver.smtpd#info worker 4242] ")
        else:
            assert json.loads(ours.format(event()))["worker"] == 4242


def test_a_worker_writes_to_the_descriptor_it_was_given_and_reopens_the_file(tmp_path):
    """The supervisor's [log] file, handed over as a descriptor, is written
    at its end by the worker; reopen puts the file named in [log] at the same
    descriptor number."""
    import os

    from mailserver.logs import worker_observer

    path = tmp_path / "mail.log"
    sup = build_observer(LogConfig(file=str(path)))
    how, fd = sup.for_workers()
    assert how == "fd"
    theirs = os.dup(fd)  # what childFDs does
    worker = worker_observer(LogConfig(file=str(path)), 77, fd=theirs)
    sup(event(id="SUPERVISOR"))
    worker(event(id="WORKER"))
    lines = path.read_text().splitlines()
    assert "SUPERVISOR" in lines[0] and "worker 77] WORKER: " in lines[1]
    path.rename(tmp_path / "mail.log.1")
    worker.reopen()
    worker(event(id="AFTER"))
    assert "AFTER" in path.read_text() and "AFTER" not in (tmp_path / "mail.log.1").read_text()
    assert worker.destinations[0].fd == theirs
    os.close(theirs)


def test_what_workers_are_told_follows_the_destination(tmp_path):
    """A file or standard output is shared; syslog alone needs no descriptor;
    twistd's rotating log file is written by the supervisor alone."""
    import os
    import sys

    assert build_observer(LogConfig(file=str(tmp_path / "f"))).for_workers()[0] == "fd"
    assert build_observer(LogConfig(syslog=True, syslog_socket=str(tmp_path / "s")),
                          {"nodaemon": True}).for_workers() == ("syslog", None)
    logfile = build_observer(LogConfig(), {"nodaemon": False,
                                           "logfile": str(tmp_path / "twistd.log")})
    assert logfile.for_workers() == ("relay", None)
    logfile.destinations[0].stream.close()
    r, w = os.pipe()
    saved = sys.stdout
    try:
        sys.stdout = os.fdopen(w, "w", closefd=False)
        assert build_observer(LogConfig(), {"nodaemon": True}).for_workers() == ("fd", w)
    finally:
        sys.stdout = saved
        os.close(r)
        os.close(w)


def test_a_batch_to_a_pipe_is_cut_into_whole_lines_of_at_most_pipe_buf(monkeypatch):
    """Every write to a pipe carries whole lines and at most PIPE_BUF octets
    (the kernel keeps such a write whole beside other writers); a line
    longer than that goes alone."""
    import os
    import threading

    from mailserver import logs

    writes = []
    real = os.write

    def write(fd, data):
        writes.append(bytes(data))
        return real(fd, data)

    lines = [f"line {i} ".encode() + b"x" * (i * 37 % 300) + b"\n" for i in range(100)]
    lines.insert(50, b"long " + b"y" * 9000 + b"\n")
    data = b"".join(lines)
    got = bytearray()
    r, w = os.pipe()

    def read_all():
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        monkeypatch.setattr(logs.os, "write", write)
        logs.FdDestination(w).write(data.decode())
    finally:
        os.close(w)
        reader.join(10)
        os.close(r)
    assert bytes(got) == data
    assert len(writes) > 1 and b"".join(writes) == data
    for chunk in writes:
        assert chunk.endswith(b"\n")
        assert len(chunk) <= logs.PIPE_BUF or chunk.count(b"\n") == 1


def test_two_processes_batching_into_one_pipe_never_mix_lines():
    """Two writer processes, batches well above PIPE_BUF, one small pipe:
    every line read is one writer's, whole.  (Each batch in one write, as
    to a file, mixes lines here: a few hundred of the 24000.)"""
    import fcntl
    import os
    import re
    import subprocess
    import sys

    from tests.support.server import REPO

    script = ("import sys\nfrom mailserver.logs import FdDestination\n"
              "d = FdDestination(1)\nme = sys.argv[1]\n"
              "sys.stderr.write('ready')\nsys.stderr.flush()\nsys.stdin.read(1)\n"
              "for b in range(200):\n"
              "    d.write(''.join(f'{me} {b} {i} ' + me * (i * 13 % 200) + '\\n'"
              " for i in range(60)))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r, w = os.pipe()
    fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # full at once: writes wait
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stdout=w,
                              stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
             for name in ("a", "b")]
    os.close(w)
    for p in procs:  # both started: let them write at the same time
        assert p.stderr.read(5) == b"ready"
    for p in procs:
        p.stdin.write(b"g")
        p.stdin.close()
    got = bytearray()
    with os.fdopen(r, "rb", buffering=0) as pipe:
        while chunk := pipe.read(1000):
            got.extend(chunk)
    assert [p.wait(30) for p in procs] == [0, 0]
    for p in procs:
        p.stderr.close()
    lines = got.decode().splitlines()
    assert len(lines) == 2 * 200 * 60
    shape = re.compile(r"([ab]) (\d+) (\d+) (\1*)$")
    for line in lines:
        m = shape.match(line)
        assert m and len(m.group(4)) == int(m.group(3)) * 13 % 200, line


def test_a_batching_observer_writes_once_per_reactor_turn(tmp_path):
    """Lines logged during one reactor turn reach the destination in one write."""
    class Reactor:
        running = True

        def __init__(self):
            self.calls = []

        def callFromThread(self, f, *a):
            self.calls.append((f, a))

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)

    reactor, dest = Reactor(), Recorder()
    observer = MailLogObserver(text_line, [dest])
    observer.batch(reactor)
    observer(event(id="ONE"))
    observer(event(id="TWO"))
    assert dest.writes == [] and len(reactor.calls) == 1
    f, a = reactor.calls.pop()
    f(*a)
    assert dest.writes == [text_line(event(id="ONE")) + text_line(event(id="TWO"))]
    reactor.running = False  # stopping: at once
    observer(event(id="THREE"))
    assert dest.writes[-1] == text_line(event(id="THREE"))
