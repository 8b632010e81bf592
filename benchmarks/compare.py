#!/usr/bin/env python
"""This server side by side with the servers people would pick instead:
Postfix (SMTP, submission) and Dovecot (LMTP, POP3), started by this script,
measured in the same run, alternately.

Run from the repository root, as root (Postfix and Dovecot start as root)::

    .venv/bin/python benchmarks/compare.py            # the issue's workloads, 15-30 min
    .venv/bin/python benchmarks/compare.py --quick    # a smoke run, 1-2 min
    .venv/bin/python benchmarks/compare.py --json --workers 2 --repetitions 5

Everything listens on free loopback ports and lives under one temporary
directory: our server (``twistd -n mailserver`` with a generated config and an
LDIF directory of test users), a private Postfix (``postfix -c <dir> start``;
final destination for example.test through virtual(8) into maildirs) and a
private Dovecot (LMTP, POP3, and the auth socket Postfix's submission service
uses for AUTH).  Each measured run delivers to a recipient of its own, so every
run starts on a fresh maildir; nothing is deleted until the end.

Throughput runs time from starting the client until the last message is a
file in the recipient's ``new/`` (so Postfix's queue and virtual(8) delivery
are inside the time, as our fsync-before-250 delivery is).  CPU per message is
utime+stime of every process of the server's tree (our twistd and its children;
Postfix's master and all its children; Dovecot's master and children, reaped
ones included through cutime/cstime), from /proc, over the run, divided by the
messages.  Peak memory is the largest sum of PSS over that tree (shared pages
counted once, shared out between the processes), sampled every 0.1 s.  See
benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import selectors
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import pop3_throughput  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    MIB, PeakSampler, finish_smtp_source, median, raise_nofile, ratio,
    render_table, smtp_source_command, tree_usage, wait_for_files)
from benchmarks.references import (  # noqa: E402
    DovecotReference, Postfix, ensure_packages, find_binary)
from tests.support.server import MailServer, free_port  # noqa: E402

DOMAIN = "example.test"
SENDER = "bench@example.org"
# pop3_throughput's session logs in as alice with this password: every test
# user gets it, on all three servers.
PASSWORD = pop3_throughput.PASSWORD
SUBMITTER = "sender"  # the account that submits (AUTH PLAIN), sender@example.test

TARGETS = {
    ("SMTP", "one message per connection"): ("≥ 1.5 × Postfix", 1.5),
    ("SMTP", "connections reused"): ("≥ 2 × Postfix", 2.0),
    ("LMTP", "one message per connection"): ("≥ 1.5 × Dovecot", 1.5),
    ("LMTP", "connections reused"): ("≥ 1.5 × Dovecot", 1.5),
    ("POP3 RETR", "warm mailbox"): ("≥ 1 × Dovecot", 1.0),
    ("idle SMTP connections", "held open"): ("≤ 150 MiB", None),
    ("submission, STARTTLS + AUTH PLAIN", "one message per connection"): ("reported", None),
}


# --- the servers -------------------------------------------------------------

def ldif(users: list) -> str:
    """The embedded directory: one inetOrgPerson per user, mail user@domain."""
    out = ["dn: dc=example,dc=test\nobjectClass: dcObject\nobjectClass: organization\n"
           "dc: example\no: Benchmark\n",
           "dn: ou=people,dc=example,dc=test\nobjectClass: organizationalUnit\nou: people\n"]
    for u in users:
        out.append(f"dn: uid={u},ou=people,dc=example,dc=test\nobjectClass: top\n"
                   "objectClass: person\nobjectClass: organizationalPerson\n"
                   f"objectClass: inetOrgPerson\nuid: {u}\ncn: {u}\nsn: {u}\n"
                   f"mail: {u}@{DOMAIN}\nuserPassword: {PASSWORD}\n")
    return "\n".join(out)


def self_signed(base: Path) -> tuple:
    """A throw-away certificate and key (RSA 2048) for both servers' STARTTLS."""
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=bench.example.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    os.chmod(key, 0o644)  # Postfix's smtpd reads it too; a benchmark's key, nothing else
    return str(cert), str(key)


def workers_supported() -> bool:
    """Does this version of the server know ``[server] workers``?"""
    text = (REPO / "etc" / "mailserver.toml").read_text()
    return "# workers = " in text


class Ours:
    name = "ours"

    def __init__(self, base: Path, users: list, cert: str, key: str, args) -> None:
        (base / "users.ldif").write_text(ldif(users))
        self.submission_port = free_port()
        self.pop3_port = free_port()
        conns = args.idle + 2 * args.sessions + 50
        server = {"hostname": "ours-bench.example.test", "max_connections": conns,
                  "max_connections_per_client": conns}
        # The test harness runs one process unless told; here the server's
        # own default (0: one worker per core) unless --workers says.
        if args.workers is not None or workers_supported():
            server["workers"] = 0 if args.workers is None else args.workers
        self.server = MailServer(
            base / "ours",
            directory={"backend": "ldif", "ldif_file": str(base / "users.ldif"),
                       "base_dn": "dc=example,dc=test"},
            tls={"certificate": cert, "private_key": key},
            smtp={"connection_rate_limit": 0},
            server=server,
            lmtp_unix=False,
            extra_tables={
                "submission": {"messages_per_hour": 0, "messages_per_day": 0,
                               "recipients_per_hour": 0, "recipients_per_day": 0},
                "pop3": {"connection_rate_limit": 0},
                # The login throttle counts a login as failed until it has
                # succeeded, so more than max_failures parallel logins from
                # one address are refused (by design, against guessing in
                # parallel); the clients here are 20 sessions on 127.0.0.1.
                "auth": {"max_failures": 10 * args.sessions + 10},
            },
            extra_listeners=(
                {"name": "submission", "protocol": "submission",
                 "address": f"127.0.0.1:{self.submission_port}"},
                {"name": "pop3", "protocol": "pop3", "address": f"127.0.0.1:{self.pop3_port}",
                 "plaintext_auth": True},
            ),
        )
        self.smtp_port = self.server.smtp_port
        self.lmtp_port = self.server.lmtp_port

    def start(self) -> None:
        self.server.start(timeout=60)

    def stop(self) -> None:
        self.server.stop()

    def roots(self) -> list:
        return [self.server.proc.pid]

    def maildir(self, user: str) -> Path:
        return self.server.maildir(user, DOMAIN)


class Users:
    """Fresh recipients: one per measured run, so each run has a new maildir."""

    def __init__(self, count: int) -> None:
        self.names = [pop3_throughput.USER, SUBMITTER] + [f"r{i:04d}" for i in range(count)]
        self._next = 2

    def fresh(self) -> str:
        if self._next >= len(self.names):
            raise RuntimeError("ran out of test users")
        self._next += 1
        return self.names[self._next - 1]


# --- clients -----------------------------------------------------------------

class Driver:
    """Client processes started together; ``poll()`` like one Popen."""

    def __init__(self, procs: list, finish, go=None) -> None:
        self.procs = procs
        self._finish = finish
        self._go = go

    def go(self) -> None:
        """Let clients that wait for a start signal begin (after their start-up)."""
        if self._go is not None:
            self._go(self.procs)

    def poll(self):
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)

    def finish(self, timeout: float) -> tuple:
        return self._finish(self.procs, timeout)


def smtp_source_driver(args, port: int, recipient: str, messages: int, reuse: bool,
                       lmtp: bool, sessions: int) -> Driver:
    cmd = smtp_source_command(args.smtp_source, port, messages=messages, sessions=sessions,
                              size=args.size, sender=SENDER, recipient=recipient, reuse=reuse,
                              lmtp=lmtp)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    return Driver([proc], lambda procs, timeout: finish_smtp_source(procs[0], timeout))


def submission_driver(args, port: int, recipient: str, messages: int) -> Driver:
    """``--sessions`` processes of this script in ``--submit`` mode, sharing the messages."""
    procs = []
    for i in range(args.sessions):
        count = messages // args.sessions + (1 if i < messages % args.sessions else 0)
        if count:
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--submit", str(port),
                 recipient, str(count), str(args.size)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE))
    for p in procs:  # Python's start-up is not part of the measurement
        p.stdout.readline()

    def go(procs):
        for p in procs:
            p.stdin.write(b"go\n")
            p.stdin.close()
            p.stdin = None  # communicate() must not flush it again

    def finish(procs, timeout):
        problems = {"warning": [], "error": [], "fatal": []}
        status = 0
        for p in procs:
            try:
                out, _ = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            status = status or p.returncode
            if p.returncode:
                problems["error"].append(out.decode(errors="replace").strip()[-300:])
        return status, problems

    return Driver(procs, finish, go)


def submit(port: int, recipient: str, count: int, size: int) -> int:
    """``--submit``: ``count`` messages, one connection each: EHLO, STARTTLS,
    EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sender = f"{SUBMITTER}@{DOMAIN}"
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: compare.py submission\r\n"
            f"Message-ID: <{{}}.{os.getpid()}@bench.example.test>\r\n"
            "Date: Thu, 03 Dec 2026 00:00:00 +0000\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopq\r\n"
    body = line * max(1, size // len(line))
    print("ready", flush=True)
    sys.stdin.readline()  # wait for the others (submission_driver's go)
    for i in range(count):
        c = smtplib.SMTP("127.0.0.1", port, local_hostname="bench-client.example.org",
                         timeout=60)
        try:
            c.ehlo()
            c.starttls(context=ctx)
            c.ehlo()
            c.user, c.password = SUBMITTER, PASSWORD
            c.auth("PLAIN", c.auth_plain)
            c.sendmail(sender, [recipient], head.format(i).encode() + body)
            c.quit()
        finally:
            c.close()
    return 0


def hold_connections(port: int, count: int, window: int = 100, stall: float = 5.0,
                     timeout: float = 120.0) -> tuple:
    """Open ``count`` connections, at most ``window`` of them waiting for their
    greeting at a time (a burst of thousands of SYNs would only overflow the
    listen queue and wait for retransmissions), and keep them open.

    Stops opening when no greeting has come for ``stall`` seconds (a server
    that takes no more, as Postfix past its process limit) or after
    ``timeout``; returns (the sockets, how many were greeted with 220)."""
    sel = selectors.DefaultSelector()
    socks, pending, greeted = [], 0, 0
    end = last = time.monotonic()
    end += timeout
    while time.monotonic() < end:
        while len(socks) < count and pending < window:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            sel.register(s, selectors.EVENT_READ)
            pending += 1
        if not pending:
            break
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(512)
            except OSError:
                data = b""
            sel.unregister(key.fileobj)
            pending -= 1
            if data.startswith(b"220"):
                greeted += 1
                last = time.monotonic()
        if time.monotonic() - last > stall:
            break
    sel.close()
    return socks, greeted


# --- measuring ---------------------------------------------------------------

def measure(server, maildir: Path, expected: int, start, timeout: float) -> dict:
    """Start the client (``start()`` -> Driver) and time until ``expected``
    files are in ``maildir/new``; CPU and peak memory of the server's tree."""
    roots = server.roots()
    sampler = PeakSampler(roots).start()
    driver = start()
    cpu0 = tree_usage(roots)[0]
    t0 = time.perf_counter()
    driver.go()
    m0 = time.monotonic()
    got, ended = wait_for_files(maildir, expected, m0 + timeout, driver)
    seconds = time.perf_counter() - t0
    cpu = tree_usage(roots)[0] - cpu0
    if ended is None and driver.poll() is not None:
        ended = time.monotonic()  # ended with (or just after) the last file
    peak = sampler.stop()
    status, problems = driver.finish(timeout=60)
    complaints = problems["fatal"] + problems["error"]
    if got < expected:
        complaints.append(f"only {got} of {expected} messages arrived "
                          f"(client exit status {status})")
    return {"server": server.name, "messages": got, "seconds": round(seconds, 3),
            "rate": got / seconds if seconds > 0 else None,
            # the clients' own view: messages over the time until they all
            # had their replies (None when they outlasted the last file)
            "client_rate": expected / (ended - m0) if ended and status == 0 else None,
            "cpu_ms_per_msg": cpu / got * 1000 if got else None,
            "peak_mib": peak / MIB, "problems": complaints[:5]}


def throughput_runs(args, pairs, users: Users, results: dict, what: str, workload: str,
                    start_for, rep: int) -> None:
    """One repetition of a workload on both servers of ``pairs`` (ours first
    on even repetitions, the reference first on odd ones)."""
    order = pairs if rep % 2 == 0 else pairs[::-1]
    timeout = max(120.0, args.messages / 2.0)  # a bound, not an expectation
    for server in order:
        user = users.fresh()
        res = measure(server, server.maildir(user), args.messages,
                      lambda: start_for(server, f"{user}@{DOMAIN}"), timeout)
        res["repetition"] = rep
        results.setdefault((what, workload), []).append(res)
        progress(args, f"{what}, {workload}, {server.name}: {fmt_rate(res['rate'])} msg/s "
                       f"(clients done at {fmt_rate(res['client_rate'])} msg/s), "
                       f"{fmt_rate(res['cpu_ms_per_msg'], '.2f')} ms CPU/msg, "
                       f"peak {res['peak_mib']:.0f} MiB"
                 + (f"  PROBLEMS {res['problems']}" if res["problems"] else ""))


def fmt_rate(v, spec=".0f"):
    return "-" if v is None else format(v, spec)


def progress(args, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


def pop3_prepare(args, ours: Ours, dovecot: DovecotReference):
    """The same mailbox (``--pop3-messages`` of ``--size`` octets) for alice
    on both servers, and one cold session on each (not counted)."""
    sizes = pop3_throughput.message_sizes
    pop3_throughput.message_sizes = lambda n, rng: [args.size] * n
    try:
        box = pop3_throughput.Mailbox(args.pop3_messages)
    finally:
        pop3_throughput.message_sizes = sizes
    user = pop3_throughput.USER
    box.write(ours.maildir(user))
    theirs = dovecot.maildir(user)
    shutil.copytree(ours.maildir(user), theirs, symlinks=True)
    for p in [theirs, *theirs.rglob("*")]:
        os.chown(p, dovecot.uid, dovecot.gid)
    for name, port, pid in (("ours", ours.pop3_port, ours.roots()[0]),
                            ("Dovecot", dovecot.port, dovecot.proc.pid)):
        pop3_throughput.pop3_session(name, "cold", port, pid, box, "raw", 120)
    return box


def pop3_runs(args, ours, dovecot, box, results: dict, rep: int) -> None:
    targets = [(ours, ours.pop3_port), (dovecot, dovecot.port)]
    for server, port in (targets if rep % 2 == 0 else targets[::-1]):
        sampler = PeakSampler(server.roots()).start()
        s = pop3_throughput.pop3_session(server.name, "warm", port, server.roots()[0], box,
                                         "raw", 120)
        f = s.figures()
        res = {"server": server.name, "messages": f["messages"],
               "seconds": round(f["retr_seconds"], 3), "rate": f["messages_per_second"],
               "cpu_ms_per_msg": f["server_cpu_ms_per_message"],
               "peak_mib": sampler.stop() / MIB, "problems": f["problems"], "repetition": rep}
        results.setdefault(("POP3 RETR", "warm mailbox"), []).append(res)
        progress(args, f"POP3 RETR warm, {server.name}: {fmt_rate(res['rate'])} msg/s, "
                       f"{fmt_rate(res['cpu_ms_per_msg'], '.3f')} ms CPU/msg"
                 + (f"  PROBLEMS {res['problems']}" if res["problems"] else ""))


def idle_run(args, server, port: int, users: Users, serve: bool) -> dict:
    """Hold ``--idle`` connections open to ``port``; with ``serve``, deliver a
    batch of messages meanwhile (timed).  Peak PSS of the server's tree."""
    sampler = PeakSampler(server.roots()).start()
    socks, greeted = hold_connections(port, args.idle)
    try:
        res = {"server": server.name, "held": len(socks), "greeted": greeted, "problems": []}
        if greeted < len(socks):
            res["problems"].append(f"{greeted} of {len(socks)} connections greeted")
        if serve:
            user = users.fresh()
            count = max(50, args.messages // 10)
            run = measure(server, server.maildir(user), count, lambda: smtp_source_driver(
                args, port, f"{user}@{DOMAIN}", count, False, False, 5), 120)
            res.update(messages=run["messages"], rate=run["rate"],
                       cpu_ms_per_msg=run["cpu_ms_per_msg"])
            res["problems"] += run["problems"]
    finally:
        for s in socks:
            s.close()
    res["peak_mib"] = sampler.stop() / MIB
    return res


# --- the run -----------------------------------------------------------------

def run(args) -> dict:
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="mailserver-compare-", dir=args.workdir))
    os.chmod(base, 0o755)  # Postfix's and Dovecot's unprivileged processes walk through it
    reps = args.repetitions
    users = Users(reps * 12 + 8)
    ours = postfix = dovecot = None
    results: dict = {}
    idle = {}
    load_before = os.getloadavg()[0]
    try:
        cert, key = self_signed(base)
        sasl = str(base / "dovecot" / "auth-client")
        (base / "dovecot").mkdir()
        os.chmod(base / "dovecot", 0o755)
        postfix = Postfix(base / "postfix", DOMAIN, users.names, cert, key, sasl)
        postfix.name, postfix.roots = "Postfix", lambda: [postfix.pid]
        dovecot = DovecotReference(pop3_throughput.find_dovecot() or find_binary("dovecot"),
                                   base / "dovecot", users.names, PASSWORD, sasl)
        dovecot.name, dovecot.roots = "Dovecot", lambda: [dovecot.proc.pid]
        ours = Ours(base, users.names, cert, key, args)
        ours.start()
        postfix.start()
        dovecot.start()
        progress(args, f"started: ours (pid {ours.roots()[0]}), Postfix {postfix.version} "
                       f"(master {postfix.pid}), Dovecot {dovecot.version_text} "
                       f"(pid {dovecot.proc.pid}); work directory {base}")

        def smtp_source_for(port_of, reuse, lmtp):
            return lambda server, rcpt: smtp_source_driver(
                args, port_of(server), rcpt, args.messages, reuse, lmtp, args.sessions)

        workloads = [
            ("SMTP", "one message per connection", (ours, postfix),
             smtp_source_for(lambda s: s.smtp_port, False, False)),
            ("SMTP", "connections reused", (ours, postfix),
             smtp_source_for(lambda s: s.smtp_port, True, False)),
            ("LMTP", "one message per connection", (ours, dovecot),
             smtp_source_for(lambda s: s.lmtp_port, False, True)),
            ("LMTP", "connections reused", (ours, dovecot),
             smtp_source_for(lambda s: s.lmtp_port, True, True)),
        ]
        if args.submission_messages:
            workloads.append((
                "submission, STARTTLS + AUTH PLAIN", "one message per connection",
                (ours, postfix), lambda server, rcpt: submission_driver(
                    args, server.submission_port, rcpt, args.submission_messages)))
        box = pop3_prepare(args, ours, dovecot) if args.pop3_messages else None
        for rep in range(reps):
            progress(args, f"repetition {rep + 1} of {reps}")
            for what, workload, pairs, start_for in workloads:
                if what.startswith("submission"):
                    saved, args.messages = args.messages, args.submission_messages
                    try:
                        throughput_runs(args, pairs, users, results, what, workload,
                                        start_for, rep)
                    finally:
                        args.messages = saved
                else:
                    throughput_runs(args, pairs, users, results, what, workload, start_for,
                                    rep)
            if box is not None:
                pop3_runs(args, ours, dovecot, box, results, rep)
        if args.idle:
            idle["ours"] = idle_run(args, ours, ours.smtp_port, users, serve=True)
            progress(args, f"idle: ours {idle['ours']}")
            idle["Postfix"] = idle_run(args, postfix, postfix.smtp_port, users, serve=False)
            progress(args, f"idle: Postfix {idle['Postfix']}")
        load_after = os.getloadavg()[0]
    except BaseException:
        for s in (ours and ours.server, postfix, dovecot):
            if s is not None:
                print(f"--- {type(s).__name__} log, last lines:\n"
                      + "\n".join(s.log().splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        for stop in (dovecot and dovecot.stop, postfix and postfix.stop, ours and ours.stop):
            try:
                if stop:
                    stop()
            except Exception as e:  # noqa: BLE001 - stop the others anyway
                print(f"stopping: {e!r}", file=sys.stderr)
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return report(args, results, idle, postfix, dovecot, load_before, load_after,
                  time.perf_counter() - started)


def summarise(results: dict, idle: dict, names: dict) -> list:
    """Medians per workload and server, their ratio, the target."""
    rows = []
    for (what, workload), runs in results.items():
        ours = [r for r in runs if r["server"] == "ours"]
        theirs = [r for r in runs if r["server"] != "ours"]
        ref = theirs[0]["server"] if theirs else ""
        a, b = median(r["rate"] for r in ours), median(r["rate"] for r in theirs)
        rows.append({
            "what": what, "workload": workload, "unit": "msg/s",
            "ours": a, "reference": b, "reference_name": ref, "ratio": ratio(a, b),
            "target": TARGETS.get((what, workload), ("", None))[0],
            "cpu_ours": median(r["cpu_ms_per_msg"] for r in ours),
            "cpu_reference": median(r["cpu_ms_per_msg"] for r in theirs),
            "peak_ours": median(r["peak_mib"] for r in ours),
            "peak_reference": median(r["peak_mib"] for r in theirs),
            "runs": runs,
            "problems": [p for r in runs for p in r["problems"]],
        })
    if idle:
        o, p = idle.get("ours", {}), idle.get("Postfix", {})
        rows.append({
            "what": "idle SMTP connections",
            "workload": f"{o.get('held')} held, {o.get('greeted')} greeted"
                        + (f", {o.get('rate', 0):.0f} msg/s meanwhile" if o.get("rate") else ""),
            "unit": "MiB", "ours": o.get("peak_mib"), "reference": p.get("peak_mib"),
            "reference_name": names["Postfix"], "ratio": ratio(o.get("peak_mib"),
                                                             p.get("peak_mib")),
            "target": TARGETS[("idle SMTP connections", "held open")][0],
            "cpu_ours": o.get("cpu_ms_per_msg"), "cpu_reference": None,
            "peak_ours": o.get("peak_mib"), "peak_reference": p.get("peak_mib"),
            "runs": [o, p], "problems": o.get("problems", []),
        })
    return rows


def report(args, results, idle, postfix, dovecot, load_before, load_after, elapsed) -> dict:
    names = {"Postfix": f"Postfix {postfix.version}" if postfix else "Postfix"}
    rows = summarise(results, idle, names)
    for row in rows:
        if row["reference_name"] == "Postfix":
            row["reference_name"] = names["Postfix"]
        elif row["reference_name"] == "Dovecot" and dovecot is not None:
            row["reference_name"] = f"Dovecot {'.'.join(map(str, dovecot.version))}"
    return {
        "benchmark": "compare",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "loadavg_1min": {"before": round(load_before, 2),
                                     "after": round(load_after, 2)}},
        "source": pop3_throughput.source_version(),
        "parameters": {k: getattr(args, k) for k in (
            "messages", "size", "sessions", "repetitions", "pop3_messages", "idle",
            "submission_messages", "workers")},
        "results": rows,
        "elapsed_seconds": round(elapsed, 1),
    }


def print_report(rep: dict) -> None:
    p = rep["parameters"]
    print(f"side by side: {p['messages']} messages of {p['size']} octets, {p['sessions']} "
          f"sessions, one recipient, median of {p['repetitions']}; POP3 {p['pop3_messages']} "
          f"messages; {p['idle']} idle connections; workers {'0 (one per core)' if p['workers'] is None else p['workers']}  "
          f"[{rep['date']}, {rep['machine']['cpus']} CPUs, source {rep['source']}]")
    print()
    print(render_table(rep["results"]))
    print()
    print("ratio: ours / reference (msg/s; for idle connections, memory).  CPU: utime+stime "
          "of the whole\nprocess tree per message.  peak: largest sum of PSS over the tree "
          "during the run (MiB).")
    load = rep["machine"]["loadavg_1min"]
    print(f"run took {rep['elapsed_seconds']} s; load average {load['before']} before, "
          f"{load['after']} after (a shared machine makes the figures noisy)")
    problems = [f"{r['what']}, {r['workload']}: {p}" for r in rep["results"]
                for p in r["problems"]]
    if problems:
        print("PROBLEMS:")
        for line in problems[:30]:
            print("  " + line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=3000,
                    help="messages per SMTP/LMTP run (3000)")
    ap.add_argument("--size", "-l", type=int, default=4096,
                    help="octets of message body (smtp-source -l) and POP3 messages (4096)")
    ap.add_argument("--sessions", "-s", type=int, default=20,
                    help="concurrent client sessions (20)")
    ap.add_argument("--repetitions", "-r", type=int, default=3,
                    help="repetitions of every workload; figures are medians (3)")
    ap.add_argument("--pop3-messages", type=int, default=2000,
                    help="messages in the POP3 mailbox; 0 skips POP3 (2000)")
    ap.add_argument("--idle", type=int, default=2000,
                    help="idle SMTP connections held open; 0 skips the test (2000)")
    ap.add_argument("--submission-messages", type=int, default=600,
                    help="messages per submission run (STARTTLS + AUTH, one per connection); "
                         "0 skips it (600)")
    ap.add_argument("--workers", type=int, default=None,
                    help="[server] workers for our server (default: 0, the server's own "
                         "default: one per core; 1 is one process)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 200 messages, 200 POP3, 200 idle, 60 submissions, "
                         "1 repetition")
    ap.add_argument("--no-install", action="store_true",
                    help="never apt-get install a missing Postfix or Dovecot; fail instead")
    ap.add_argument("--workdir", default=None,
                    help="where the temporary directory goes (default: the system temp dir)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--submit", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.submit:
        port, rcpt, count, size = args.submit
        return submit(int(port), rcpt, int(count), int(size))
    if args.quick:
        args.messages, args.pop3_messages, args.idle = 200, 200, 200
        args.submission_messages, args.repetitions = 60, 1
    if os.geteuid() != 0:
        ap.error("run as root: Postfix and Dovecot start as root")
    if args.workers is not None and not workers_supported():
        ap.error("this version of the server has no [server] workers setting")
    if not (1 <= args.sessions <= 500 and 1 <= args.repetitions <= 20
            and args.messages >= args.sessions):
        ap.error("need 1-500 sessions, 1-20 repetitions and at least one message per session")
    ensure_packages(install=not args.no_install)
    args.smtp_source = find_binary("smtp-source")
    raise_nofile(args.idle + 1024)
    os.chdir(REPO)
    rep = run(args)
    if args.json:
        json.dump(rep, sys.stdout, indent=2, default=str)
        print()
    else:
        print_report(rep)
    return 1 if any(r["problems"] for r in rep["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
