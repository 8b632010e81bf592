"""Several worker processes (``[server] workers = 2``) against the real ``twistd``.

One server for the module: two workers behind the supervisor, an MX
listener, a submission listener with AUTH in plaintext (for the throttle),
a self-signed certificate (for SIGHUP) and a transport sending
``remote.test`` to Postfix's smtp-sink.  Which worker served what is read
from the log: each worker writes its own lines to the supervisor's standard
output, with ``worker <pid>``.  The tests run in file order; the last two
kill a worker and stop the server.  A second server (``workers = 2``, JSON
lines to a ``[log] file``) shows the workers writing to that file and
reopening it on SIGUSR1.
"""

from __future__ import annotations

import base64
import json
import os
import poplib
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid

import pytest

from tests.conftest import embedded_directory
from tests.support.server import REPO, MailServer, free_port, wait_for
from tests.support.sink import SmtpSink, require_smtp_sink

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
MAX_FAILURES = 3
PER_CLIENT = 4
WORKER_LINE = re.compile(r"worker (\d+)\] (.*)")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_smtp_sink()
    work = tmp_path_factory.mktemp("workers")
    sink = SmtpSink(dump_dir=work / "sink").start()
    submission = free_port()
    metrics = free_port()
    pop3s = free_port()
    server = MailServer(
        work / "srv", directory=embedded_directory(),
        server={"workers": 2, "max_connections_per_client": PER_CLIENT,
                "shutdown_grace": 10.0},
        tls={"certificate": str(work / "cert.pem"), "private_key": str(work / "key.pem"),
             "self_signed": True},
        relay={"trusted_networks": ["127.0.0.1/32"],
               "transports": {"remote.test": f"smtp:{HOST}:{sink.port}"}},
        queue={"scan_interval": 60.0},
        extra_tables={"auth": {"failure_delay": 0.1, "max_failure_delay": 0.2,
                               "max_failures": MAX_FAILURES},
                      "metrics": {"address": f"{HOST}:{metrics}"}},
        extra_listeners=({"name": "submission", "protocol": "submission",
                          "address": f"{HOST}:{submission}", "tls": "none",
                          "plaintext_auth": True},
                         {"name": "pop3s", "protocol": "pop3", "address": f"{HOST}:{pop3s}",
                          "tls": "implicit"}))
    # A scratch file a crashed run left: exactly one process sweeps it.
    (server.spool / "incoming").mkdir(parents=True, exist_ok=True)
    (server.spool / "incoming" / "leftover").write_bytes(b"half a message")
    server.start(timeout=60)
    server.submission_port = submission
    server.metrics_port = metrics
    server.pop3s_port = pop3s
    yield {"server": server, "sink": sink}
    server.stop()
    sink.stop()


def worker_lines(server, pattern: str) -> list:
    """(pid, text) of every worker log line containing ``pattern``."""
    out = []
    for line in server.log().splitlines():
        m = WORKER_LINE.search(line)
        if m and pattern in m.group(2):
            out.append((int(m.group(1)), m.group(2)))
    return out


def serving(server) -> list:
    """Pids of the workers the supervisor saw start serving, in order."""
    return [int(m) for m in re.findall(r"\] worker (\d+) serving", server.log())]


SENT = []  # tokens of the messages answered 250, in order


def send(port: int, rcpt: str, token: str, source: str = HOST) -> None:
    with smtplib.SMTP(HOST, port, timeout=20, source_address=(source, 0)) as c:
        c.sendmail("sender@example.org", [rcpt],
                   f"Subject: {token}\r\nMessage-ID: <{token}@t>\r\n\r\n{token}\r\n".encode())
    SENT.append(token)


def test_both_workers_serve(env):
    server = env["server"]
    assert len(serving(server)) == 2
    assert "2 worker processes" in server.log()
    deadline = time.monotonic() + 30
    pids = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        send(server.smtp_port, "alice@example.test", uuid.uuid4().hex)
        pids = {pid for pid, _ in worker_lines(server, "smtp: connect from")}
    assert pids == set(serving(server))


#: A text line: time, [system], message; a traceback's lines start with a tab.
TEXT_LINE = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[[^\]\n]+\] \S|\t)")


def send_from(port: int, sender: str, source: str = HOST) -> None:
    with smtplib.SMTP(HOST, port, timeout=20, source_address=(source, 0)) as c:
        c.sendmail(sender, ["alice@example.test"], b"Subject: hello\r\n\r\nhello\r\n")


def send_many(port: int, senders: list, clients: int = 4) -> None:
    """Send one message from each sender, ``clients`` connections at a time,
    each from an address of its own (``max_connections_per_client``)."""
    errors = []

    def client(n):
        try:
            for sender in senders[n::clients]:
                send_from(port, sender, f"127.0.0.{40 + n}")
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_workers_write_whole_text_lines_to_the_supervisors_output(env):
    """Under load on both workers, each writing its own lines to the
    supervisor's standard output, every line there is one whole text line
    (none a JSON object), and each message's line names the worker."""
    server = env["server"]
    senders = [f"{uuid.uuid4().hex}@example.org" for _ in range(40)]
    send_many(server.smtp_port, senders)
    SENT.extend(senders)  # for the metrics test: accepted messages, counted
    wait_for(lambda: all(f"from=<{s}>" in server.log() for s in senders), "logged", 20)
    lines = server.log().splitlines()
    for line in lines:
        assert TEXT_LINE.match(line), line
    writers = set()
    for sender in senders:
        (line,) = [line for line in lines if f"from=<{sender}>" in line]
        m = WORKER_LINE.search(line)
        assert m and m.group(2).endswith(", nrcpt=1"), line
        writers.add(int(m.group(1)))
    assert writers <= set(serving(server))


def test_spool_swept_once(env):
    log = env["server"].log()
    assert log.count("removed 1 incomplete message(s) left in the spool") == 1
    assert not (env["server"].spool / "incoming" / "leftover").exists()


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def accepted(server) -> float:
    m = re.search(r'mailserver_messages_received_total\{listener="smtp",result="accepted"\} '
                  r'(\S+)', scrape(server))
    return float(m.group(1)) if m else 0.0


def test_metrics_add_up_the_workers_and_status_is_ok(env):
    server = env["server"]
    for _ in range(3):
        send(server.smtp_port, "alice@example.test", uuid.uuid4().hex)
    sent = len(SENT)  # every message so far, on either worker
    wait_for(lambda: accepted(server) == sent, f"{sent} accepted in the metrics", 20)
    text = scrape(server)
    assert 'mailserver_queue_messages{state="incoming"}' in text  # the supervisor's own
    assert len(re.findall(r"^# TYPE mailserver_messages_received\S* counter$", text, re.M)) == 1
    env_ = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "mailserver.ctl", "status", "-c",
                             str(server.config_path)], cwd=REPO, env=env_,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("mailserver OK")


def _auth(port: int, login: str, password: str, source: str):
    c = smtplib.SMTP(HOST, port, timeout=20, source_address=(source, 0))
    c.ehlo("client.example")
    token = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
    code, text = c.docmd("AUTH", "PLAIN " + token)
    try:
        c.close()
    except Exception:
        pass
    return code, text


def test_failed_login_throttle_holds_across_workers(env):
    server = env["server"]
    source = "127.0.0.21"
    for n in range(1, MAX_FAILURES + 1):  # the last failure blocks at once
        code, text = _auth(server.submission_port, "alice@example.test", "wrong", source)
        assert code == (421 if n == MAX_FAILURES else 535), text
    # Each connection is a new accept: with two workers they spread, and a
    # count per worker would let the next one try again.
    for _ in range(4):
        code, text = _auth(server.submission_port, "alice@example.test", "alice-password",
                           source)
        assert (code, text[:5]) == (421, b"4.7.0"), text
    failed = {pid for pid, text in worker_lines(server, "authentication failed")
              if source in text}
    blocked = {pid for pid, text in worker_lines(server, "login blocked") if source in text}
    assert failed | blocked == set(serving(server))


def test_connection_limit_holds_across_workers(env):
    server = env["server"]
    source = "127.0.0.22"
    held = []
    try:
        for _ in range(PER_CLIENT):
            s = socket.create_connection((HOST, server.smtp_port), timeout=20,
                                         source_address=(source, 0))
            held.append(s)
            assert s.recv(512).startswith(b"220 ")
        for _ in range(4):  # on either worker: the count is the supervisor's
            with socket.create_connection((HOST, server.smtp_port), timeout=20,
                                          source_address=(source, 0)) as s:
                assert s.recv(512).startswith(b"421 4.7.0 Too many connections from your")
        holders = {pid for pid, text in worker_lines(server, "smtp: connect from")
                   if text.endswith(source)}
        refusers = {pid for pid, text in worker_lines(server, "refused connection from")
                    if source in text}
        assert holders | refusers == set(serving(server))
    finally:
        for s in held:
            s.close()
    # Closed: the slots come back.
    wait_for(lambda: _greets(server.smtp_port, source), "slots released", 20)


def _greets(port: int, source: str) -> bool:
    with socket.create_connection((HOST, port), timeout=20, source_address=(source, 0)) as s:
        return s.recv(512).startswith(b"220 ")


def _pop3s(server):
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the self-signed pair
    p = poplib.POP3_SSL(HOST, server.pop3s_port, context=context, timeout=20)
    p.user("bob@example.test")  # alice is blocked by the throttle test
    p.pass_("bob-password")
    return p


def test_pop3s_and_its_mailbox_lock_across_workers(env):
    """Implicit TLS through the connection gate; the maildrop lock (flock)
    holds whichever worker each session is on."""
    server = env["server"]
    send(server.smtp_port, "bob@example.test", uuid.uuid4().hex)  # an empty drop has no lock
    first = _pop3s(server)
    try:
        assert first.stat()[0] >= 1
        for _ in range(4):
            with pytest.raises(poplib.error_proto, match=r"IN-USE"):
                _pop3s(server)
    finally:
        first.quit()
    second = _pop3s(server)  # free again
    second.quit()


def test_queue_runs_in_one_process(env):
    server, sink = env["server"], env["sink"]
    tokens = [uuid.uuid4().hex for _ in range(4)]
    for token in tokens:
        send(server.smtp_port, "someone@remote.test", token)
    wait_for(lambda: len(sink.dump_files()) >= len(tokens), "relayed", 30)
    # Out of the queue: a second delivery, if any, would have happened by now.
    wait_for(lambda: not any((server.queue_dir / state).is_dir()
                             and any((server.queue_dir / state).iterdir())
                             for state in ("incoming", "active", "deferred")),
             "queue empty", 30)
    bodies = [p.read_text(errors="replace") for p in sink.dump_files()]
    for token in tokens:
        assert sum(token in b for b in bodies) == 1
    # Delivered by the supervisor: no worker logs a remote delivery.
    assert not worker_lines(server, "relay=127.0.0.1")


def test_sighup_reaches_the_workers(env):
    server = env["server"]
    before = len(worker_lines(server, "reloaded TLS certificate"))
    os.kill(server.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(worker_lines(server, "reloaded TLS certificate")) >= before + 2,
             "both workers reloaded", 20)
    pids = {pid for pid, _ in worker_lines(server, "reloaded TLS certificate")[before:]}
    assert pids == set(serving(server))


def test_a_worker_fails_safe_when_the_supervisor_does_not_answer(env):
    """The supervisor stopped (SIGSTOP): after the channel's timeout a new
    connection is refused with a temporary 421, never let through."""
    server = env["server"]
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with socket.create_connection((HOST, server.smtp_port), timeout=30,
                                      source_address=("127.0.0.23", 0)) as s:
            assert s.recv(512).startswith(b"421 4.3.2 ")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    wait_for(lambda: _greets(server.smtp_port, "127.0.0.23"), "served again", 20)


def test_sigkill_of_a_worker_under_load_loses_no_acknowledged_message(env):
    server = env["server"]
    victim = serving(server)[0]
    acknowledged, stop = [], threading.Event()
    lock = threading.Lock()

    def client(n):
        while not stop.is_set():
            token = f"load{n}-{uuid.uuid4().hex}"
            try:
                send(server.smtp_port, "bob@example.test", token)
            except (smtplib.SMTPException, OSError):
                continue  # the worker died under this session: not acknowledged
            with lock:
                acknowledged.append(token)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(PER_CLIENT)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acknowledged) >= 20, "load running", 30)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(serving(server)) >= 3, "a new worker", 60)
        replacement = serving(server)[-1]
        count = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= count + 20, "load after the restart", 30)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert f"worker {victim} ended (signal 9)" in server.log()
    on_disk = {}
    for path in server.messages("bob"):
        m = re.search(rb"Subject: (load\S+)", path.read_bytes())
        if m:
            on_disk[m.group(1).decode()] = on_disk.get(m.group(1).decode(), 0) + 1
    for token in acknowledged:
        assert on_disk.get(token) == 1, token
    assert any(pid == replacement for pid, _ in worker_lines(server, "smtp: connect from"))


def test_sigterm_drains_and_exits_0(env):
    server = env["server"]
    workers = serving(server)[-2:]
    c = smtplib.SMTP(HOST, server.smtp_port, timeout=20)
    c.ehlo("client.example")
    c.mail("sender@example.org")
    c.rcpt("alice@example.test")
    code, _ = c.docmd("DATA")
    assert code == 354
    proc = server.proc
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "mailserver stopping" in server.log(), "stopping", 20)
    c.send(b"Subject: in flight\r\n\r\nfinished during the stop\r\n.\r\n")
    code, text = c.getreply()
    assert code == 250, text
    c.close()
    assert proc.wait(30) == 0
    for pid in workers:
        assert f"worker {pid} stopped (exit 0)" in server.log()
    assert any(b"finished during the stop" in p.read_bytes() for p in server.messages("alice"))


# -- a second server: JSON lines in a [log] file ------------------------------------
@pytest.fixture(scope="module")
def json_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("workers-json")
    server = MailServer(work / "srv", directory=embedded_directory(), lmtp_unix=False,
                        server={"workers": 2}, smtp={"connection_rate_limit": 0},
                        # Its standard output is the same file: nothing else writes there.
                        extra_tables={"log": {"format": "json",
                                              "file": str(work / "srv" / "server.log")}})
    server.start(timeout=60)
    yield server
    server.stop()


def records(path) -> list:
    """Every line of ``path`` as a JSON object (a line that is not one fails)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines()]


def json_serving(path) -> set:
    return {int(m.group(1)) for r in records(path) if "worker" not in r
            for m in [re.fullmatch(r"worker (\d+) serving", r["text"])] if m}


def test_workers_append_json_lines_with_their_pid_to_the_log_file(json_server):
    server = json_server
    pids = json_serving(server.log_path)
    assert len(pids) == 2
    senders = [f"{uuid.uuid4().hex}@example.org" for _ in range(20)]
    send_many(server.smtp_port, senders)
    wait_for(lambda: all(f"from=<{s}>" in server.log() for s in senders), "logged", 20)
    found = {r["sender"]: r for r in records(server.log_path) if r.get("sender") in senders}
    assert set(found) == set(senders)
    for r in found.values():
        assert r["worker"] in pids and r["namespace"] == "mailserver.smtpd"
        assert r["level"] == "info" and r["client"].startswith("127.0.0.") and r["text"].startswith(r["id"])


def test_sigusr1_reopens_the_log_file_in_the_workers(json_server):
    """Moved away and SIGUSR1 to the supervisor: each worker writes to a new
    file, and nothing more to the old one."""
    server = json_server
    pids = json_serving(server.log_path)
    old = server.log_path.with_name("server.log.1")
    server.log_path.rename(old)
    server.proc.send_signal(signal.SIGUSR1)

    def both_reopened():
        send_from(server.smtp_port, f"{uuid.uuid4().hex}@example.org")
        return {r.get("worker") for r in records(server.log_path)} >= pids

    wait_for(both_reopened, "both workers write the new file", 30)
    before = old.read_text()
    sender = f"{uuid.uuid4().hex}@example.org"
    send_from(server.smtp_port, sender)
    wait_for(lambda: f"from=<{sender}>" in server.log_path.read_text(), "logged", 20)
    assert old.read_text() == before


def test_twistds_own_log_file_gets_the_workers_lines_through_the_supervisor(tmp_path):
    """twistd --logfile (a LogFile it rotates): the workers' events still
    reach it through the supervisor, as text lines naming the worker."""
    server = MailServer(tmp_path / "srv", directory=embedded_directory(), lmtp_unix=False,
                        server={"workers": 2})
    server.twistd_options = (f"--logfile={server.log_path}",)
    server.start(timeout=60)
    try:
        for pid in serving(server):
            with open(f"/proc/{pid}/cmdline") as f:
                assert "\0--log\0relay\0" in f.read()
        sender = f"{uuid.uuid4().hex}@example.org"
        send_from(server.smtp_port, sender)
        wait_for(lambda: f"from=<{sender}>" in server.log(), "logged", 20)
    finally:
        server.stop()
    (line,) = [line for line in server.log().splitlines() if f"from=<{sender}>" in line]
    assert WORKER_LINE.search(line) and TEXT_LINE.match(line), line
