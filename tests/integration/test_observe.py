"""JSON logs, ``mailserverctl log`` and ``mailserverctl status`` against the real server.

One server for the module writes JSON lines to its log file, with metrics on
and a plaintext submission listener (loopback only) for logins; a second,
never started, gives ``status`` a server that is down.  The text-format log
comes from the shared ``server`` fixture.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import subprocess
import sys

import pytest

from tests.conftest import embedded_directory
from tests.support.server import REPO, MailServer, free_port, wait_for

SECRET = "Wr0ng-Sekr1t-for-the-log-test"


def ctl(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "mailserver.ctl", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def observed(tmp_path_factory, tls_files):
    work = tmp_path_factory.mktemp("observe")
    port, sub = free_port(), free_port()
    srv = MailServer(
        work, directory=embedded_directory(), lmtp_unix=False,
        tls={"certificate": tls_files["certificate"], "private_key": tls_files["private_key"]},
        extra_tables={"metrics": {"address": f"127.0.0.1:{port}"},
                      "log": {"format": "json", "file": str(work / "server.log")},
                      "auth": {"failure_delay": 0.1, "max_failure_delay": 0.1}},
        extra_listeners=({"name": "submission", "protocol": "submission",
                          "address": f"127.0.0.1:{sub}", "tls": "none",
                          "plaintext_auth": True},))
    srv.submission_port = sub
    srv.start()
    yield srv
    srv.stop()


def json_records(srv) -> list:
    return [json.loads(line) for line in srv.log().splitlines() if line.startswith("{")]


def send_with_success_report(port: int, sender: str = "bob@example.test") -> str:
    """Send to alice asking for a delivery report; return the queue id."""
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.example")
        s.mail(sender)
        code, _ = s.rcpt("alice@example.test", options=["NOTIFY=SUCCESS"])
        assert code == 250
        code, text = s.data(b"Subject: follow me\r\n\r\nhello\r\n")
    assert code == 250
    return text.decode().rsplit(" ", 1)[1]


def test_json_lines_carry_the_event_fields(observed):
    """Every line is one JSON object; the accepted message's carries id, client and sender."""
    queue_id = send_with_success_report(observed.smtp_port)
    records = wait_for(lambda: (lambda rs: rs if any(
        r.get("id") == queue_id and "sender" in r for r in rs) else None)(
        json_records(observed)), "the accepted message's line")
    for r in records:
        assert {"time", "level", "namespace", "text"} <= set(r)
    line = next(r for r in records if r.get("id") == queue_id and "sender" in r)
    assert line["client"] == "127.0.0.1" and line["sender"] == "bob@example.test"
    assert line["namespace"] == "mailserver.smtpd" and line["level"] == "info"
    assert line["text"].startswith(f"{queue_id}: client=127.0.0.1")


def test_no_password_reaches_the_log(observed):
    """A failed and a successful login leave neither password in the log, in any form."""
    for password in (SECRET, "alice-password"):
        with smtplib.SMTP("127.0.0.1", observed.submission_port) as s:
            s.ehlo("client.example")
            s.user, s.password = "alice", password
            try:
                s.auth("PLAIN", s.auth_plain)
            except smtplib.SMTPAuthenticationError:
                pass
    wait_for(lambda: "authenticated: sasl_method=PLAIN" in observed.log(), "the login line")
    text = observed.log()
    for password in (SECRET, "alice-password"):
        plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
        assert password not in text and plain not in text


def test_log_command_follows_a_message_and_its_report(observed):
    """mailserverctl log prints the message's lines and those of the report it spawned."""
    queue_id = send_with_success_report(observed.smtp_port)

    def report_delivered():
        for r in json_records(observed):
            if r.get("id") == queue_id and "notification" in r["text"]:
                dsn = r["dsn"]
                if any(x.get("id") == dsn and "status=sent" in x["text"]
                       for x in json_records(observed)):
                    return dsn
        return None

    dsn = wait_for(report_delivered, "the delivery report to reach bob")
    result = ctl("log", queue_id, "--file", str(observed.log_path))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r.get("id") for r in lines} == {queue_id, dsn}
    assert any("status=sent" in r["text"] and r["id"] == dsn for r in lines)
    assert ctl("log", "AAAAAAAAAAAAAAAA", "--file", str(observed.log_path)).returncode == 1


def test_log_command_reads_the_text_format(server):
    """The default text lines are followed the same way."""
    queue_id = send_with_success_report(server.smtp_port)
    wait_for(lambda: "status=sent" in "".join(
        line for line in server.log().splitlines(True)
        if "notification" not in line and queue_id not in line), "the report's delivery")
    result = ctl("log", queue_id, "--file", str(server.log_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert any(f"{queue_id}: client=127.0.0.1" in line for line in out)
    dsn = next(line for line in out if "notification:" in line).rsplit(" ", 1)[1]
    assert any(f"{dsn}: to=<bob@example.test>" in line for line in out)


def test_status_of_a_running_server(observed):
    """A running server is ok (exit 0): listeners accept, directory answers, logins counted."""
    result = ctl("status", "-c", str(observed.config_path), "--json")
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout
    assert report["status"] == "ok"
    kinds = {(c["check"], c["name"]): c for c in report["checks"]}
    assert kinds[("listener", "smtp")]["state"] == "ok"
    assert kinds[("listener", "submission")]["state"] == "ok"
    assert kinds[("metrics", "metrics")]["state"] == "ok"
    assert kinds[("directory", "ldif")]["data"]["found"] is True
    cert = next(c for c in report["checks"] if c["check"] == "certificate")
    assert cert["state"] == "ok" and cert["data"]["days_left"] > 14
    logins = kinds[("logins", "since start")]
    assert logins["state"] == "ok" and "auth_failures" in logins["data"]
    text = ctl("status", "-c", str(observed.config_path))
    assert text.returncode == 0 and text.stdout.startswith("mailserver OK")


def test_status_of_a_stopped_server(tmp_path):
    """A server that is not running is critical (exit 2), each listener named."""
    down = MailServer(tmp_path, directory=embedded_directory(), lmtp_unix=False)
    result = ctl("status", "-c", str(down.config_path), "--json")
    assert result.returncode == 2, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status"] == "critical"
    listeners = [c for c in report["checks"] if c["check"] == "listener"]
    assert {c["name"] for c in listeners} == {"smtp", "lmtp"}
    assert all(c["state"] == "critical" for c in listeners)
    logins = next(c for c in report["checks"] if c["check"] == "logins")
    assert logins["state"] == "unknown"


def test_sigusr1_reopens_the_log_file(observed):
    """After the file is moved away, SIGUSR1 makes the server write a new one."""
    import signal

    old = observed.log_path.with_name("server.log.1")
    observed.log_path.rename(old)
    observed.proc.send_signal(signal.SIGUSR1)

    def reopened():
        with smtplib.SMTP("127.0.0.1", observed.smtp_port) as s:
            s.noop()
        return observed.log_path.exists() and "connect from" in observed.log_path.read_text()

    wait_for(reopened, "a new log file")
    assert json.loads(observed.log_path.read_text().splitlines()[0])["namespace"]
