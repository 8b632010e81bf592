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
