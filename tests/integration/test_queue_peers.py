"""The outbound queue against real peers: the real server process relays to
Postfix's ``smtp-sink`` (tests/support/sink.py), found by MX on a loopback DNS
server or named by a transport, and is steered with ``mailserverctl queue``.

Each test starts its own sending server (relaying for 127.0.0.0/8, retries an
hour apart so that only a flush retries) and its own smtp-sinks; a
destination that is "down" is a port nothing listens on until the test
starts a sink there.  The tests wait for the other processes' progress with
deadlines (``wait_for``): the message leaving the queue means the sink
answered its final dot, and smtp-sink closes its dump file before it answers.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import smtplib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import embedded_directory
from tests.support.dns import DNSServer
from tests.support.server import MailServer, free_port, twistd_env, wait_for, maildir_messages as read_maildir
from tests.support.sink import SmtpSink, require_smtp_sink

pytestmark = pytest.mark.slow

QUEUED = ("incoming", "active", "deferred", "hold", "corrupt")



# --- the pieces ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def dns(tmp_path_factory):
    """mx.test's only MX is mx1.mx.test, 127.0.0.1; hard.test's is the same host."""
    zones = {"mx.test": {"@": {"MX": [[10, "mx1"]]}, "mx1": {"A": "127.0.0.1"}},
             "hard.test": {"@": {"MX": [[10, "mx1.mx.test"]]}}}
    server = DNSServer(zones, directory=str(tmp_path_factory.mktemp("dns"))).start()
    yield server
    server.stop()


@pytest.fixture
def sinks(tmp_path):
    """``sinks(**SmtpSink kwargs)`` starts an smtp-sink; all are stopped at the end."""
    require_smtp_sink()
    started = []

    def start(**kwargs) -> SmtpSink:
        kwargs.setdefault("dump_dir", tmp_path / f"sink{len(started)}")
        sink = SmtpSink(**kwargs)
        started.append(sink)
        return sink.start()

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def sending(tmp_path, dns):
    """``sending(transports, **queue)`` starts a server that relays for
    loopback; local domain example.test (the quick-start users)."""
    started = []

    def start(transports: dict, **queue) -> MailServer:
        server = MailServer(
            tmp_path / f"sender{len(started)}", directory=embedded_directory(),
            relay={"trusted_networks": ["127.0.0.0/8"], "nameservers": [dns.nameserver],
                   "transports": transports},
            queue={"min_backoff": 3600.0, "scan_interval": 1.0, **queue})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def ctl(server: MailServer, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``mailserverctl queue ARGS --queue-dir`` the server's queue."""
    done = subprocess.run([sys.executable, "-m", "mailserver.ctl", "queue", *args,
                           "--queue-dir", str(server.queue_dir)],
                          capture_output=True, text=True, env=twistd_env(), timeout=60)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def queued(server: MailServer, state: str) -> list:
    """Queue ids with an envelope in ``state``/ (a look at the directory)."""
    try:
        names = os.listdir(server.queue_dir / state)
    except FileNotFoundError:
        return []
    return [n for n in names if not n.endswith(".reason") and not n.startswith(".")]


def queue_empty(server: MailServer) -> bool:
    return not any(queued(server, s) for s in QUEUED)


def listing(server: MailServer) -> list:
    return json.loads(ctl(server, "list", "--json").stdout)


def entry_for(server: MailServer, rcpt: str) -> dict:
    [entry] = [e for e in listing(server)
               if rcpt in [r["address"] for r in e.get("recipients", ())]]
    return entry


def message(subject: str, body: str = "hello\r\n") -> bytes:
    return (f"From: someone@sender.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@sender.test>\r\n\r\n{body}").encode()


def send(server: MailServer, sender: str, recipients, subjects, sessions: int = 1) -> None:
    """Submit one message per subject over ``sessions`` SMTP sessions at once;
    each got its 250 when this returns."""
    subjects = list(subjects)

    def session(part):
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            for subject in part:
                assert s.sendmail(sender, recipients, message(subject)) == {}

    if sessions == 1:
        return session(subjects)
    with ThreadPoolExecutor(sessions) as pool:
        for done in [pool.submit(session, subjects[i::sessions]) for i in range(sessions)]:
            done.result()


def message_ids(sink: SmtpSink) -> dict:
    return {mid.strip("<>"): len(ms) for mid, ms in sink.by_message_id().items()}


def maildir_messages(server: MailServer, local: str) -> list:
    return [email.message_from_bytes(m.as_bytes(), policy=email.policy.compat32)
            for m in read_maildir(server.maildir(local))]


# --- delivery ------------------------------------------------------------------------

def test_delivery_to_smtp_sink_found_by_mx(sinks, sending):
    """mx.test's MX (on the loopback DNS server) leads to smtp-sink: one
    transaction for both recipients, with our Received header on top."""
    sink = sinks()
    server = sending({"mx.test": f"smtp:mx.test:{sink.port}"})
    send(server, "someone@sender.test", ["carol@mx.test", "dave@mx.test"], ["mx-1"])
    wait_for(lambda: queue_empty(server), "the message to leave the queue")
    [got] = sink.messages()
    assert got.sender == "someone@sender.test"
    assert sorted(got.recipients) == ["carol@mx.test", "dave@mx.test"]
    assert got.helo == "mx.example.test"
    parsed = got.message()
    assert parsed["Subject"] == "mx-1" and parsed["Message-ID"] == "<mx-1@sender.test>"
    assert "by mx.example.test (mailserver)" in parsed["Received"]
    assert parsed.get_content().strip() == "hello"
    log = server.log()
    assert f"to=<carol@mx.test>, relay=mx1.mx.test[127.0.0.1]:{sink.port}, status=sent" in log


@pytest.mark.parametrize("command", ["RCPT", "DATA"])
def test_temporary_failure_then_flush_delivers(sinks, sending, tmp_path, command):
    """smtp-sink's 4xx defers the message with its reply on record (queue
    list shows it); a flush once the sink takes mail delivers it."""
    reply = "451 4.3.2 sink.test is busy, try again later"
    sink = sinks(soft_fail=[command], soft_reply=reply)
    server = sending({"soft.test": f"smtp:[127.0.0.1]:{sink.port}"})
    send(server, "someone@sender.test", ["carol@soft.test"], ["soft-1"])
    wait_for(lambda: queued(server, "deferred"), "the deferral")
    out = ctl(server, "list").stdout
    assert "carol@soft.test" in out and "deferred" in out
    assert reply in out, out
    [rcpt] = entry_for(server, "carol@soft.test")["recipients"]
    assert rcpt["state"] == "pending" and rcpt["last_reply"].startswith(reply)
    assert not message_ids(sink)

    sink.stop()
    sink = sinks(port=sink.port)  # the same port, no failure
    assert "1 deferred message(s)" in ctl(server, "flush").stdout
    wait_for(lambda: queue_empty(server), "the flushed message to leave the queue")
    assert ctl(server, "list").stdout.strip() == "Mail queue is empty"
    assert list(message_ids(sink)) == ["soft-1@sender.test"]
    log = server.log()
    assert "to=<carol@soft.test>" in log and "status=deferred" in log
    assert "status=sent" in log


def test_permanent_failure_bounces_to_the_sender(sinks, sending):
    """smtp-sink's 5xx to RCPT: an RFC 3464 DSN reaches the (local) sender,
    with the sink's reply quoted in the delivery-status part."""
    reply = "550 5.1.1 <nobody@hard.test>: sink.test knows no such user"
    sink = sinks(hard_fail=["RCPT"], hard_reply=reply)
    server = sending({"hard.test": f"smtp:hard.test:{sink.port}"})
    send(server, "bob@example.test", ["nobody@hard.test"], ["hard-1"])

    def dsn():
        return [m for m in maildir_messages(server, "bob")
                if m.get_content_type() == "multipart/report"]

    [bounce] = wait_for(dsn, "the DSN in bob's mailbox")
    assert bounce["Return-Path"] == "<>"
    assert bounce["To"] and "bob@example.test" in bounce["To"]
    assert bounce.get_param("report-type") == "delivery-status"
    human, status, original = bounce.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    text = status.as_string()
    assert "Final-Recipient: rfc822; nobody@hard.test" in text
    assert "Action: failed" in text and "Status: 5.1.1" in text
    assert "Remote-MTA: dns; mx1.mx.test" in text
    diagnostic = re.search(r"Diagnostic-Code: (.*(?:\n[ \t].*)*)", text).group(1)
    assert " ".join(diagnostic.split()) == f"smtp; {reply}"
    assert "hard-1@sender.test" in original.as_string()
    wait_for(lambda: queue_empty(server), "the queue to empty")
    assert not [m for m in sink.messages() if m.data]  # refused before DATA


def test_expiry_bounces_with_the_last_reply(sinks, sending):
    """A recipient smtp-sink keeps refusing with 4xx is given up after the
    queue lifetime: the sender gets a DSN with Status 4.4.7 (delivery time
    expired) quoting the sink's last reply, and the queue empties."""
    reply = "452 4.2.2 sink.test mailbox busy, try again later"
    sink = sinks(soft_fail=["RCPT"], soft_reply=reply)
    server = sending({"slow.test": f"smtp:[127.0.0.1]:{sink.port}"},
                     min_backoff=1.0, max_backoff=1.0, lifetime=3.0)
    send(server, "bob@example.test", ["carol@slow.test"], ["expire-1"])

    def dsn():
        return [m for m in maildir_messages(server, "bob")
                if m.get_content_type() == "multipart/report"]

    [bounce] = wait_for(dsn, "the expiry DSN in bob's mailbox")
    _human, status, _original = bounce.get_payload()
    text = status.as_string()
    assert "Final-Recipient: rfc822; carol@slow.test" in text
    assert "Action: failed" in text and "Status: 4.4.7" in text
    diagnostic = re.search(r"Diagnostic-Code: (.*(?:\n[ \t].*)*)", text).group(1)
    assert " ".join(diagnostic.split()) == f"smtp; {reply}"
    wait_for(lambda: queue_empty(server), "the queue to empty")
    assert "status=expired" in server.log()
    assert not message_ids(sink)


# --- restarts and crashes ------------------------------------------------------------

def test_restart_with_a_full_queue(sinks, sending, tmp_path):
    """50 messages deferred for a down destination survive a restart; once the
    destination is up, a flush delivers every one of them."""
    count = 50
    port = free_port()  # nothing listens here yet
    server = sending({"down.test": f"smtp:[127.0.0.1]:{port}"})
    subjects = [f"full-{i}" for i in range(count)]
    send(server, "someone@sender.test", ["carol@down.test"], subjects, sessions=4)
    wait_for(lambda: len(queued(server, "deferred")) == count, "every message deferred")
    before = sorted(queued(server, "deferred"))

    assert server.stop() == 0  # a graceful stop on SIGTERM exits 0
    server.start()
    assert sorted(queued(server, "deferred")) == before  # nothing lost, nothing retried
    entries = listing(server)
    assert len(entries) == count and {e["state"] for e in entries} == {"deferred"}
    assert {e["attempts"] for e in entries} == {1}
    assert "4.4.1 Cannot connect to [127.0.0.1]" in ctl(server, "list").stdout

    sink = sinks(port=port)
    ctl(server, "flush")
    wait_for(lambda: queue_empty(server), "the queue to empty")
    got = message_ids(sink)
    assert sorted(got) == sorted(f"{s}@sender.test" for s in subjects)
    assert set(got.values()) == {1}


def test_sigkill_during_delivery_loses_nothing(sinks, sending, tmp_path):
    """Kill -9 while hundreds of messages go out: after a restart every one
    reaches the sink at least once (duplicates allowed); nothing is corrupt."""
    count = 300
    port = free_port()
    server = sending({"kill.test": f"smtp:[127.0.0.1]:{port}"})
    subjects = [f"kill-{i}" for i in range(count)]
    send(server, "someone@sender.test", ["carol@kill.test"], subjects, sessions=8)
    # All wait in deferred/ (nothing listened); then the sink comes up and a
    # flush releases them at once: the kill lands in the middle of the run.
    wait_for(lambda: len(queued(server, "deferred")) == count, "every message deferred")
    sink = sinks(port=port)
    ctl(server, "flush")
    wait_for(lambda: sink.count() >= count // 4, "a quarter delivered", interval=0.005)
    server.kill()
    at_kill = sink.count()
    left = sum(len(queued(server, s)) for s in QUEUED)
    assert at_kill < count and left > 0, "the kill came after the run was over"

    server.start()
    wait_for(lambda: queue_empty(server), "the queue to empty after the restart", 60)
    got = message_ids(sink)
    missing = {f"{s}@sender.test" for s in subjects} - set(got)
    assert not missing, f"lost: {sorted(missing)[:10]}"
    assert set(got) == {f"{s}@sender.test" for s in subjects}
    assert not queued(server, "corrupt")
    assert ctl(server, "list").stdout.strip() == "Mail queue is empty"
    assert "queue recovered: requeued=" in server.log()
    duplicates = sum(n - 1 for n in got.values())
    print(f"{count} messages, {at_kill} at the sink when killed, {left} still queued, "
          f"{duplicates} duplicate(s)")


# --- administration --------------------------------------------------------------------

def test_cli_against_a_live_queue(sinks, sending, tmp_path):
    """hold keeps a deferred message through a flush, release sends it,
    delete removes another for good, show prints an envelope."""
    port = free_port()
    server = sending({"cli.test": f"smtp:[127.0.0.1]:{port}"})
    for name in ("held", "kept", "gone"):
        send(server, "someone@sender.test", [f"{name}@cli.test"], [f"cli-{name}"])
    wait_for(lambda: len(queued(server, "deferred")) == 3, "three deferred messages")
    ids = {name: entry_for(server, f"{name}@cli.test")["id"] for name in ("held", "kept", "gone")}

    shown = ctl(server, "show", ids["kept"]).stdout
    assert f"id: {ids['kept']}" in shown and "state: deferred" in shown
    assert "sender: <someone@sender.test>" in shown
    assert "<kept@cli.test> pending, 1 attempt(s)" in shown
    assert "4.4.1" in shown  # the refused connection on record
    assert "Message-ID: <cli-kept@sender.test>" in shown  # and the content's header

    assert ctl(server, "hold", ids["held"]).stdout.strip() == f"{ids['held']}: held"
    assert ctl(server, "delete", ids["gone"]).stdout.strip() == f"{ids['gone']}: deleted"
    entry = entry_for(server, "held@cli.test")
    assert entry["state"] == "hold"
    assert not [e for e in listing(server) if e["id"] == ids["gone"]]
    text = ctl(server, "list").stdout
    assert re.search(rf"^{ids['held']}\s+hold\s", text, re.M), text
    assert ctl(server, "show", ids["gone"], check=False).returncode == 1

    sink = sinks(port=port)
    ctl(server, "flush")
    # The flushed message arriving is the flush done; the held one stays put.
    wait_for(lambda: not queued(server, "deferred") and not queued(server, "incoming")
             and not queued(server, "active"), "the flush to be over")
    assert list(message_ids(sink)) == ["cli-kept@sender.test"]
    assert queued(server, "hold") == [ids["held"]]

    assert ctl(server, "release", ids["held"]).stdout.strip() == f"{ids['held']}: released"
    wait_for(lambda: queue_empty(server), "the released message to leave the queue")
    assert sorted(message_ids(sink)) == ["cli-held@sender.test", "cli-kept@sender.test"]
    assert ctl(server, "list").stdout.strip() == "Mail queue is empty"
