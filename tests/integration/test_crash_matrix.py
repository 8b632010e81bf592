"""The crash matrix: the real server dies at each step of a maildir delivery and of a queue
transition (fault injection through MAILSERVER_CRASH_AT, see mailserver.faults), is restarted
without it, and nothing acknowledged is lost, nothing half-written is visible."""

from __future__ import annotations

import mailbox
import smtplib
from pathlib import Path

import pytest

from mailserver import faults
from tests.conftest import embedded_directory
from tests.support.server import MailServer, wait_for
from tests.support.sink import SmtpSink

pytestmark = pytest.mark.slow

END = b"END-OF-BODY"
BODY = b"".join(b"line %04d of the body, padding padding padding\r\n" % i for i in range(200))
QUEUE_STATES = ("incoming", "active", "deferred", "hold")

MAILDIR_STEPS = ["maildir.tmp_written", "maildir.fsynced", "maildir.linked",
                 "maildir.dir_fsynced"]
QUEUE_STEPS = ["queue.data", "queue.incoming", "queue.active", "queue.deferred",
               "queue.removed"]
# Steps after which the message is in new/ whole (stored before the 250 could be sent).
STORED_BEFORE_ACK = {"maildir.linked", "maildir.dir_fsynced"}
# Steps after the queue's commit point: the message must reach the next hop after restart.
COMMITTED = {"queue.incoming", "queue.active", "queue.deferred", "queue.removed"}


@pytest.fixture(scope="module")
def sinks(tmp_path_factory):
    """One accepting smtp-sink for the whole module, and one that defers every RCPT."""
    work = tmp_path_factory.mktemp("sinks")
    good = SmtpSink(dump_dir=work / "good").start()
    deferring = SmtpSink(soft_fail=("RCPT",)).start()
    yield good, deferring
    good.stop()
    deferring.stop()


def _server(work: Path, step: str, next_hop: int) -> MailServer:
    return MailServer(
        work, directory=embedded_directory(), lmtp_unix=False,
        relay={"trusted_networks": ["127.0.0.0/8"],
               "transports": {"remote.test": f"smtp:[127.0.0.1]:{next_hop}"}},
        queue={"min_backoff": 1.0, "scan_interval": 1.0},
        env={faults.ENV: step})


def _send(server: MailServer, rcpt: str, subject: str) -> bool:
    """Send one message; True when the server answered 250 to its data."""
    msg = f"Subject: {subject}\r\n\r\n".encode() + BODY + END + b"\r\n"
    try:
        s = smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30)
    except OSError:
        return False
    try:
        s.sendmail("sender@example.org", [rcpt], msg)
    except (smtplib.SMTPException, OSError):
        return False
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    return True


def _crash(server: MailServer, step: str) -> None:
    code = server.proc.wait(30)
    assert code == faults.EXIT_CODE, f"exit {code}, not the crash at {step}:\n{server.log()}"
    assert f"crash injected at {step}" in server.log()
    server.stop()  # reaps it and closes the log
    server.env = {}


def _maildir_messages(server: MailServer) -> dict:
    """Subject -> count of alice's messages; asserts every visible one is whole."""
    path = server.maildir("alice")
    if not (path / "new").is_dir():
        return {}
    seen: dict = {}
    for sub in ("new", "cur"):
        for f in (path / sub).iterdir():
            data = f.read_bytes()
            assert data.endswith(END + b"\n"), f"half-written message visible: {f}"
    md = mailbox.Maildir(str(path), factory=None, create=False)
    for key in md.keys():
        subject = md.get_message(key)["Subject"]
        seen[subject] = seen.get(subject, 0) + 1
    return seen


def _envelopes(server: MailServer) -> list:
    """Every queued envelope; asserts none is without its data file."""
    found = []
    for state in QUEUE_STATES:
        d = server.queue_dir / state
        for f in d.iterdir() if d.is_dir() else ():
            assert (server.queue_dir / "data" / f.name).is_file(), \
                f"envelope without data: {state}/{f.name}"
            found.append(f"{state}/{f.name}")
    return found


def _at_sink(sink: SmtpSink, subject: str) -> int:
    return sum(1 for m in sink.messages() if m.header("Subject") == subject)


@pytest.mark.parametrize("step", MAILDIR_STEPS)
def test_crash_during_maildir_delivery(tmp_path, step):
    """Killed at a maildir step, the restarted server shows only whole messages and loses no 250'd one."""
    server = _server(tmp_path / "srv", step, next_hop=9).start()
    subject = f"crash-{step}"
    acked = _send(server, "alice@example.test", subject)
    _crash(server, step)
    assert not acked  # every maildir step comes before the 250
    seen = _maildir_messages(server)
    assert seen.get(subject, 0) == (1 if step in STORED_BEFORE_ACK else 0)
    server.start()
    try:
        assert _send(server, "alice@example.test", "after")
        seen = _maildir_messages(server)
        assert seen.get("after") == 1
        assert seen.get(subject, 0) == (1 if step in STORED_BEFORE_ACK else 0)
    finally:
        server.stop()


@pytest.mark.parametrize("step", QUEUE_STEPS)
def test_crash_during_queue_transition(tmp_path, sinks, step):
    """Killed at a queue step, the restarted server delivers every committed message and shows no torn envelope."""
    good, deferring = sinks
    first_hop = deferring.port if step == "queue.deferred" else good.port
    server = _server(tmp_path / "srv", step, next_hop=first_hop).start()
    subject = f"crash-{step}"
    acked = _send(server, "bob@remote.test", subject)
    _crash(server, step)
    if step in ("queue.data", "queue.incoming"):
        assert not acked  # both come before the 250
    _envelopes(server)  # nothing torn on disk, before any recovery
    if step == "queue.deferred":  # the next hop recovers while we are down
        text = server.config_path.read_text()
        server.config_path.write_text(text.replace(f":{deferring.port}\"", f":{good.port}\""))
    server.start()
    try:
        if step in COMMITTED:
            wait_for(lambda: _at_sink(good, subject) >= 1, f"{subject} at the next hop")
            wait_for(lambda: not _envelopes(server), "an empty queue")
        else:
            assert not _envelopes(server)  # never committed: recovery leaves nothing to send
            assert _at_sink(good, subject) == 0
    finally:
        server.stop()
