#!/usr/bin/env python
"""POP3 retrieval (RETR) throughput of the real server, as a ratio of Dovecot's
POP3 server measured in the same run on an identical copy of the mailbox.

Run from the repository root::

    .venv/bin/python benchmarks/pop3_throughput.py [--messages N | --quick] [--warm-runs W]
                                                   [--json] [--keep] [--workdir DIR]
                                                   [--profile DIR]

It needs Dovecot's POP3 server (Debian: ``apt-get install dovecot-core
dovecot-pop3d``), runs it and our server on 127.0.0.1 only, and stops both
(and removes every file it made) whatever happens.

What one run does:

1. writes a mailbox of ``N`` messages (2000; ``--quick``: 200) of a realistic
   mix of sizes (median about 4 KiB, a tail of 10-40 KiB, 5% of about 100 KiB
   with a base64 attachment), deterministic (seeded), straight into alice's
   maildir as the server's store names and writes them: ``new/<secs>.M<usecs>
   P<pid>Q<n>R<hex>.<host>,S=<size on disk>,W=<size with CRLF>``, LF line
   ends on disk, some lines starting with "." (so both servers dot-stuff);
2. copies that maildir (names, bytes, times) for Dovecot, owned by
   ``nobody`` (Dovecot refuses to open mail as root);
3. starts our server (``twistd -n mailserver`` through
   ``tests.support.server.MailServer``, embedded LDIF directory, a
   ``protocol = "pop3"`` listener with ``plaintext_auth = true``) and Dovecot
   (``dovecot -F -c <temporary config>``: ``protocols = pop3``, ``ssl = no``,
   cleartext logins allowed, ``mail_location = maildir:<the copy>``, a
   passwd-file passdb with ``alice:{PLAIN}alice-password`` and a static
   userdb; run, state and log directories in the temporary directory);
4. for each server in turn (ours, Dovecot, ours, Dovecot, ...) runs one POP3
   session with ``poplib`` over plain TCP: connect, USER/PASS, STAT, LIST
   (timed together: *login+STAT+LIST*), RETR 1..N (timed from sending the
   first RETR to reading the end of the last), QUIT (timed: both servers mark
   the messages seen and move them from ``new/`` to ``cur/`` then).  The
   first session on each server is the *cold* run (Dovecot builds its index
   and uidlist, our server scans the maildir for the first time); then
   ``--warm-runs`` warm sessions (1; the warm figure is their median) read
   the same, now indexed and ``cur/``, mailbox.  The files were just written,
   so they are in the page cache for both servers in every run: "cold"
   means the servers' own state, not the disk;
5. checks every message each server sent: LIST sizes and, for every RETR
   response, the length and CRC-32 of the dot-stuffed bytes, against what
   was written (as a multiset: each server numbers in its own order);
6. reports messages/s and MB/s (10^6 octets of message as RETR sends it, CRLF
   line ends, before dot-stuffing), login+STAT+LIST and QUIT times, the
   servers' CPU time per message over the RETR span (``/proc/<pid>/stat``
   utime+stime, summed over the server's process tree: twistd is one
   process, Dovecot a master with a ``pop3`` process per session), and the
   ratio ours/Dovecot of each figure.

RETR responses are read raw by default (the socket's buffered file,
``read1`` until ``CRLF.CRLF``): ``poplib.POP3.retr`` splits every line
in Python, which costs the client more CPU than a fast server spends
sending it and would pull both servers towards the client's speed.
``--client poplib`` uses ``retr()`` as is.

``--profile DIR`` adds one more warm session (not counted in the figures)
against our server run in-process by this script (``--serve-profiled``:
``mailserver.service.build_service`` on the default reactor, as twistd runs
it) with cProfile on the reactor thread during the RETR span only; it writes
``DIR/pop3-server.pstats`` and prints the top functions.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import poplib
import pwd
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.server import MailServer, free_port  # noqa: E402

LDIF = REPO / "etc" / "quickstart-users.ldif"
USER, PASSWORD, DOMAIN = "alice", "alice-password", "example.test"
HOST_IN_NAMES = "bench.example.test"
SEED = 20261203
DOVECOT_INSTALL = "apt-get install dovecot-core dovecot-pop3d"


# --- the mailbox ------------------------------------------------------------

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from "
         "at which but have an they you were her all she there would their we him been has "
         "when who will more no if out so said what up its about into than them can only "
         "other new some could time these two may then do first any my now such like our "
         "over man me even most made after also did many before must through back years "
         "where much your way well down should because each just those people how too "
         "little state good very make world still own see men work long get here between "
         "both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three meeting invoice report "
         "server mailbox release quarterly budget schedule draft review attached please "
         "thanks regards tomorrow project customer delivery").split()


def _text_lines(rng: random.Random, n: int) -> list:
    """``n`` lines of prose, 20-76 characters; about one in 40 starts with a dot."""
    lines = []
    for _ in range(n):
        width = rng.randint(20, 76)
        words, length = [], 0
        while length < width:
            w = rng.choice(WORDS)
            words.append(w)
            length += len(w) + 1
        line = " ".join(words)[:76].rstrip()
        r = rng.random()
        if r < 0.025:
            line = "." + line  # dot-stuffed on the wire
        elif r < 0.04:
            line = ""
        elif r < 0.05:
            line = "> " + line[:70]
        lines.append(line)
    return lines


def message_sizes(n: int, rng: random.Random) -> list:
    """Target sizes: 80% log-normal around 3.5 KiB, 15% 10-40 KiB, 5% ~100 KiB."""
    sizes = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            sizes.append(int(rng.uniform(90, 115) * 1024))
        elif r < 0.20:
            sizes.append(int(rng.uniform(10, 40) * 1024))
        else:
            sizes.append(int(min(max(rng.lognormvariate(0, 0.55) * 3.5 * 1024, 900), 9 * 1024)))
    return sizes


def make_message(i: int, target: int, rng: random.Random, pool: list) -> bytes:
    """A message of about ``target`` octets (LF line ends, as on disk)."""
    day = 1 + i % 28
    head = [
        "Return-Path: <sender%d@example.org>" % (i % 97),
        "Delivered-To: alice@example.test",
        "Received: from mail%d.example.org (mail%d.example.org [192.0.2.%d])" % (
            i % 13, i % 13, 1 + i % 250),
        "\tby mx.example.test (mailserver) with ESMTPS id %016X" % rng.getrandbits(64),
        "\tfor <alice@example.test>; Tue, %02d Nov 2026 10:%02d:%02d +0000" % (
            day, i % 60, (i * 7) % 60),
        "From: Sender %d <sender%d@example.org>" % (i % 97, i % 97),
        "To: Alice <alice@example.test>",
        "Subject: %s" % " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))),
        "Date: Tue, %02d Nov 2026 10:%02d:%02d +0000" % (day, i % 60, (i * 7) % 60),
        "Message-ID: <%d.%016x@example.org>" % (i, rng.getrandbits(64)),
        "MIME-Version: 1.0",
    ]
    attachment = target > 64 * 1024
    if attachment:
        boundary = "=_bench_%08x" % rng.getrandbits(32)
        head.append('Content-Type: multipart/mixed; boundary="%s"' % boundary)
    else:
        head.append("Content-Type: text/plain; charset=us-ascii")
    out = "\n".join(head).encode() + b"\n\n"
    body = []
    size = len(out)
    text_target = 3000 if attachment else target
    if attachment:
        part = ("--%s\nContent-Type: text/plain; charset=us-ascii\n\n" % boundary).encode()
        body.append(part)
        size += len(part)
    start = rng.randrange(len(pool))
    k = start
    while size < text_target:
        line = pool[k % len(pool)].encode() + b"\n"
        body.append(line)
        size += len(line)
        k += 1
    if attachment:
        part = ("--%s\nContent-Type: application/pdf; name=\"report-%d.pdf\"\n"
                "Content-Transfer-Encoding: base64\n"
                "Content-Disposition: attachment; filename=\"report-%d.pdf\"\n\n"
                % (boundary, i, i)).encode()
        body.append(part)
        size += len(part)
        raw = rng.randbytes(max(0, (target - size - 64) * 57 // 78))
        b64 = base64.b64encode(raw)
        body.extend(b64[j:j + 76] + b"\n" for j in range(0, len(b64), 76))
        body.append(("--%s--\n" % boundary).encode())
    return out + b"".join(body)


def wire_form(disk: bytes) -> bytes:
    """What RETR sends for a file with LF line ends: CRLF, dot-stuffed, CRLF.CRLF."""
    wire = disk.replace(b"\n", b"\r\n")
    stuffed = wire.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


class Mailbox:
    """The generated messages: names, sizes and the expected RETR bytes."""

    def __init__(self, n: int) -> None:
        rng = random.Random(SEED)
        pool = _text_lines(rng, 4000)
        self.files = []  # (name, disk bytes)
        self.wire_sizes = []  # octets with CRLF (LIST, ,W=)
        self.expected = Counter()  # (length, crc32) of each RETR response body
        t0 = int(time.time()) - 86400
        pid = os.getpid()
        usecs = 0
        for i, target in enumerate(message_sizes(n, rng)):
            disk = make_message(i, target, rng, pool)
            wire = len(disk) + disk.count(b"\n")  # no CR on disk: every LF becomes CRLF
            usecs = (usecs + rng.randint(1, 400_000)) % 1_000_000
            name = (f"{t0 + 3 * i}.M{usecs}P{pid}Q{i + 1}R{rng.getrandbits(64):016x}"
                    f".{HOST_IN_NAMES},S={len(disk)},W={wire}")
            self.files.append((name, disk))
            self.wire_sizes.append(wire)
            raw = wire_form(disk)
            self.expected[(len(raw), zlib.crc32(raw))] += 1

    @property
    def wire_bytes(self) -> int:
        return sum(self.wire_sizes)

    def write(self, maildir: Path) -> None:
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, mode=0o700, exist_ok=True)
        for i, (name, disk) in enumerate(self.files):
            path = maildir / "new" / name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(disk)
            mtime = int(name.split(".", 1)[0])
            os.utime(path, (mtime, mtime))

    def size_summary(self) -> dict:
        sizes = sorted(self.wire_sizes)
        return {
            "messages": len(sizes),
            "median_octets": int(statistics.median(sizes)),
            "mean_octets": int(statistics.fmean(sizes)),
            "p90_octets": sizes[int(0.9 * (len(sizes) - 1))],
            "max_octets": sizes[-1],
            "over_64k": sum(1 for s in sizes if s > 65536),
            "total_mb": round(sum(sizes) / 1e6, 2),
        }


# --- processes ---------------------------------------------------------------

def proc_stat(pid: int):
    """(ppid, utime + stime in seconds) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and every process below it (Linux /proc)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                stats[int(entry)] = st
    children = {}
    for pid, (ppid, _cpu) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


# --- Dovecot -----------------------------------------------------------------

def find_dovecot() -> Optional[str]:
    path = shutil.which("dovecot") or next(
        (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.access(p, os.X_OK)),
        None)
    if path is None:
        return None
    # the POP3 server itself is another package (Debian: dovecot-pop3d)
    libexec = [Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"),
               Path("/usr/local/libexec/dovecot")]
    if not any((d / "pop3").exists() for d in libexec):
        return None
    return path


def dovecot_version(binary: str) -> tuple:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", out.stdout.strip())
    if not m:
        raise RuntimeError(f"cannot read dovecot --version: {out.stdout!r} {out.stderr!r}")
    return tuple(int(x or 0) for x in m.groups()), out.stdout.strip()


def _user_or(name: str, fallback: str) -> str:
    try:
        pwd.getpwnam(name)
        return name
    except KeyError:
        return fallback


class Dovecot:
    """A throw-away ``dovecot -F`` serving POP3 on 127.0.0.1:<free port>."""

    def __init__(self, binary: str, base: Path, maildir: Path) -> None:
        self.binary = binary
        self.base = base
        self.maildir = maildir
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.version, self.version_text = dovecot_version(binary)
        mail = pwd.getpwnam("nobody")
        self.uid, self.gid = mail.pw_uid, mail.pw_gid
        home = base / "home"
        run_dir, state_dir = base / "run", base / "state"
        for d in (home, run_dir, state_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(home, self.uid, self.gid)
        passwd = base / "passwd"
        passwd.write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        os.chmod(passwd, 0o644)  # read by the auth process (the internal user)
        self.log_path = base / "dovecot.log"
        # Dovecot will not run its login processes as root, nor open mail as
        # uid 0: the package's own users when they exist, nobody otherwise.
        internal = _user_or("dovecot", "nobody")
        login = _user_or("dovenull", "nobody")
        common = (
            "protocols = pop3\n"
            "listen = 127.0.0.1\n"
            "ssl = no\n"
            f"base_dir = {run_dir}\n"
            f"state_dir = {state_dir}\n"
            f"log_path = {self.log_path}\n"
            f"default_internal_user = {internal}\n"
            f"default_login_user = {login}\n"
            "first_valid_uid = 1\n"
            "service pop3-login {\n"
            f"  inet_listener pop3 {{\n    port = {self.port}\n  }}\n"
            "  inet_listener pop3s {\n    port = 0\n  }\n"
            "}\n"
        )
        if self.version >= (2, 4):
            conf = (
                "dovecot_config_version = %s\n"
                "dovecot_storage_version = %s\n" % ((".".join(map(str, self.version)),) * 2)
                + common
                + "auth_allow_cleartext = yes\n"
                "mail_driver = maildir\n"
                f"mail_path = {maildir}\n"
                "passdb passwd-file {\n"
                f"  passwd_file_path = {passwd}\n"
                "}\n"
                "userdb static {\n"
                f"  fields {{\n    uid = {self.uid}\n    gid = {self.gid}\n"
                f"    home = {home}\n  }}\n"
                "}\n"
            )
        else:
            conf = (
                common
                + "disable_plaintext_auth = no\n"
                f"mail_location = maildir:{maildir}\n"
                "passdb {\n  driver = passwd-file\n"
                f"  args = {passwd}\n}}\n"
                "userdb {\n  driver = static\n"
                f"  args = uid={self.uid} gid={self.gid} home={home}\n}}\n"
            )
        self.config = base / "dovecot.conf"
        self.config.write_text(conf)

    def start(self, timeout: float = 30.0) -> "Dovecot":
        self._out = open(self.base / "dovecot.stderr", "ab")
        # its own process group: stop() can then reach every child, by group id
        self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.config)],
                                     stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n" + self.log())
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    greeting = s.recv(512)
                    if not greeting.startswith(b"+OK") or b"Dovecot" not in greeting:
                        raise RuntimeError(f"port {self.port} is not our Dovecot: {greeting!r}")
                    s.sendall(b"QUIT\r\n")
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("dovecot did not start:\n" + self.log())

    def stop(self, timeout: float = 15.0) -> Optional[int]:
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the group's id is the master's pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # anything of that group still alive (it should not be)
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.returncode
        self.proc = None
        self._out.close()
        return code

    def log(self) -> str:
        text = ""
        for p in (self.log_path, self.base / "dovecot.stderr"):
            try:
                text += p.read_text(errors="replace")
            except OSError:
                pass
        return text

    def problems(self) -> list:
        return [line for line in self.log().splitlines()
                if re.search(r"\b(Error|Warning|Panic|Fatal):", line)
                and "Killed with signal 15" not in line]


# --- the client --------------------------------------------------------------

def retr_raw(p: poplib.POP3, number: int) -> bytes:
    """RETR ``number``; the dot-stuffed content with its CRLF.CRLF, read raw."""
    p._putcmd(f"RETR {number}")
    p._getresp()  # "+OK ..." or raises poplib.error_proto on -ERR
    f = p.file
    chunks = []
    tail = b"\r\n"  # the end of the status line
    while True:
        data = f.read1(65536)
        if not data:
            raise poplib.error_proto("-ERR EOF in RETR")
        chunks.append(data)
        tail = (tail + data)[-5:]
        if tail == b"\r\n.\r\n":
            return b"".join(chunks)


def retr_poplib(p: poplib.POP3, number: int) -> bytes:
    """RETR through ``poplib.POP3.retr``; rebuilt into the wire form for the check."""
    _resp, lines, _octets = p.retr(number)
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                    for line in lines) + b".\r\n"


class Session:
    def __init__(self, server: str, run: str) -> None:
        self.server = server
        self.run = run
        self.login_seconds = 0.0
        self.retr_seconds = 0.0
        self.quit_seconds = 0.0
        self.messages = 0
        self.wire_bytes = 0
        self.server_cpu = None
        self.client_cpu = 0.0
        self.problems = []

    def figures(self) -> dict:
        n = self.messages
        return {
            "server": self.server,
            "run": self.run,
            "messages": n,
            "messages_per_second": n / self.retr_seconds if self.retr_seconds else None,
            "mb_per_second": self.wire_bytes / 1e6 / self.retr_seconds
            if self.retr_seconds else None,
            "retr_seconds": self.retr_seconds,
            "login_stat_list_ms": self.login_seconds * 1000,
            "quit_ms": self.quit_seconds * 1000,
            "server_cpu_ms_per_message": self.server_cpu / n * 1000
            if self.server_cpu is not None and n else None,
            "client_cpu_ms_per_message": self.client_cpu / n * 1000 if n else None,
            "problems": self.problems,
        }


def pop3_session(server: str, run: str, port: int, server_pid: int, box: Mailbox,
                 client: str, timeout: float, around_retr=None) -> Session:
    s = Session(server, run)
    retr = retr_raw if client == "raw" else retr_poplib
    t0 = time.perf_counter()
    p = poplib.POP3("127.0.0.1", port, timeout=timeout)
    try:
        p.user(USER)
        p.pass_(PASSWORD)
        count, _size = p.stat()
        _resp, listing, _octets = p.list()
        s.login_seconds = time.perf_counter() - t0
        sizes = Counter(int(line.split()[1]) for line in listing)
        if count != len(box.files):
            raise RuntimeError(f"{server}: STAT says {count} messages, {len(box.files)} written")
        if sizes != Counter(box.wire_sizes):
            s.problems.append("LIST sizes differ from the ,W= sizes written")
        got = Counter()
        if around_retr is not None:
            around_retr(True)
        cpu0 = tree_cpu_seconds(server_pid)
        c0 = time.process_time()
        t1 = time.perf_counter()
        for number in range(1, count + 1):
            raw = retr(p, number)
            got[(len(raw), zlib.crc32(raw))] += 1
        s.retr_seconds = time.perf_counter() - t1
        s.client_cpu = time.process_time() - c0
        s.server_cpu = tree_cpu_seconds(server_pid) - cpu0
        if around_retr is not None:
            around_retr(False)
        s.messages = count
        s.wire_bytes = box.wire_bytes
        if got != box.expected:
            bad = sum((box.expected - got).values())
            s.problems.append(f"{bad} RETR response(s) differ from the messages written")
        t2 = time.perf_counter()
        p.quit()
        s.quit_seconds = time.perf_counter() - t2
    finally:
        p.close()
    return s


# --- profiling ---------------------------------------------------------------

def serve_profiled(config_path: str, stats_path: str, log_path: str) -> None:
    """Our server in this process, as twistd would run it (the service from
    ``mailserver.service.build_service``, the default reactor, the classic
    text log in a file), with cProfile on the reactor thread between SIGUSR1
    and SIGUSR2 (SIGUSR2 writes ``stats_path``).  Worker threads (the maildrop
    listing, opening each message) are not profiled."""
    import cProfile

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from mailserver.config import load_config
    from mailserver.service import build_service

    config = load_config(config_path)
    log_file = open(log_path, "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)], redirectStandardIO=False)
    top = build_service(config, reactor)
    prof = cProfile.Profile()

    def start(*_):
        prof.enable()

    def stop(*_):
        prof.disable()
        prof.dump_stats(stats_path + ".part")
        os.replace(stats_path + ".part", stats_path)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    top.privilegedStartService()
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    log_file.close()


def profiled_session(args, server: MailServer, port: int, box: Mailbox, outdir: Path) -> dict:
    """One more warm session (not counted) against our server under cProfile."""
    import pstats

    from tests.support.server import twistd_env, wait_for_port

    outdir.mkdir(parents=True, exist_ok=True)
    stats_path = outdir / "pop3-server.pstats"
    if stats_path.exists():
        stats_path.unlink()
    log = open(outdir / "pop3-server-profiled.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve-profiled",
         str(server.config_path), str(stats_path), str(outdir / "pop3-server-profiled.log")],
        cwd=server.workdir, env=twistd_env(), stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, time.monotonic() + 30, proc)

        def around(start: bool) -> None:
            proc.send_signal(signal.SIGUSR1 if start else signal.SIGUSR2)
            if start:
                time.sleep(0.2)  # let the handler run before the first RETR

        session = pop3_session("ours (cProfile)", "warm", port, proc.pid, box, args.client,
                               args.timeout, around)
        deadline = time.monotonic() + 30
        while not stats_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
    st = pstats.Stats(str(stats_path))
    total = st.total_tt or 1e-9

    def rows(key: str, keep, top: int = 25):
        items = []
        for (filename, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
            if keep(filename):
                items.append((tt if key == "tottime" else ct, nc, short_path(filename), line,
                              func))
        items.sort(reverse=True)
        return [{"seconds": round(t, 4), "share": round(t / total, 4), "calls": nc,
                 "per_message_us": round(t / max(session.messages, 1) * 1e6, 1),
                 "function": f"{func} ({path}:{line})"}
                for t, nc, path, line, func in items[:top]]

    return {
        "stats": str(stats_path),
        "session": session.figures(),
        "profiled_seconds": round(total, 3),
        "self": rows("tottime", lambda f: True),
        "inclusive": rows("cumtime", lambda f: "mailserver" in f or "twisted" in f),
    }


def short_path(filename: str) -> str:
    for marker in ("/site-packages/", str(REPO) + "/", "/lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


# --- the run -----------------------------------------------------------------

def run(args) -> dict:
    dovecot_bin = find_dovecot()
    if dovecot_bin is None:
        raise SystemExit("pop3_throughput: Dovecot's POP3 server is the reference and is not "
                         f"installed; install it with:\n    {DOVECOT_INSTALL}")
    started = time.perf_counter()
    box = Mailbox(args.messages)
    base = Path(tempfile.mkdtemp(prefix="mailserver-pop3-bench-", dir=args.workdir))
    server = dovecot = None
    sessions = []
    ours_code = dovecot_code = profile = None
    dovecot_problems, ours_errors = [], []
    try:
        os.chmod(base, 0o755)  # Dovecot's processes (nobody, dovecot) walk through it
        dv_base = base / "dovecot"
        dv_base.mkdir()
        os.chmod(dv_base, 0o755)
        hostname = f"pop-bench-{os.getpid()}.example.test"
        pop3_port = free_port()
        server = MailServer(
            base / "server",
            directory={"backend": "ldif", "ldif_file": str(LDIF),
                       "base_dn": "dc=example,dc=test"},
            server={"hostname": hostname},
            lmtp_unix=False,
            extra_listeners=({"name": "pop3", "protocol": "pop3",
                              "address": f"127.0.0.1:{pop3_port}", "plaintext_auth": True},),
        )
        ours_maildir = server.maildir(USER, DOMAIN)
        box.write(ours_maildir)
        dv_maildir = dv_base / "mail" / DOMAIN / USER
        shutil.copytree(ours_maildir, dv_maildir, symlinks=True)
        dovecot = Dovecot(dovecot_bin, dv_base, dv_maildir)
        for p in [dv_base / "mail", dv_base / "mail" / DOMAIN]:
            os.chmod(p, 0o755)
        for p in [dv_maildir, *dv_maildir.rglob("*")]:
            os.chown(p, dovecot.uid, dovecot.gid)
        if not args.json:
            s = box.size_summary()
            print(f"mailbox: {s['messages']} messages, {s['total_mb']} MB as RETR sends them, "
                  f"median {s['median_octets']} octets, {s['over_64k']} over 64 KiB; "
                  f"Dovecot {dovecot.version_text}", file=sys.stderr)
        load_before = loadavg()
        server.start()
        check_ours(pop3_port, hostname)
        dovecot.start()
        targets = [("ours", pop3_port, server.proc.pid),
                   ("dovecot", dovecot.port, dovecot.proc.pid)]
        for r in range(1 + args.warm_runs):
            run_name = "cold" if r == 0 else "warm"
            for name, port, pid in targets:
                s = pop3_session(name, run_name, port, pid, box, args.client, args.timeout)
                sessions.append(s)
                if not args.json:
                    f = s.figures()
                    print(f"{run_name:>4} {name:<8} {f['messages_per_second']:8.0f} msg/s "
                          f"{f['mb_per_second']:7.1f} MB/s  login+STAT+LIST "
                          f"{f['login_stat_list_ms']:7.1f} ms  QUIT {f['quit_ms']:7.1f} ms  "
                          f"server CPU {f['server_cpu_ms_per_message']:.3f} ms/msg"
                          + (f"  PROBLEMS: {s.problems}" if s.problems else ""),
                          file=sys.stderr)
        load_after = loadavg()
        if args.profile:
            ours_code = server.stop()
            profile = profiled_session(args, server, pop3_port, box, Path(args.profile))
    except BaseException:
        if server is not None:
            print("our server's log, last lines:\n"
                  + "\n".join(server.log().splitlines()[-30:]), file=sys.stderr)
        if dovecot is not None:
            print("dovecot's log, last lines:\n"
                  + "\n".join(dovecot.log().splitlines()[-30:]), file=sys.stderr)
        raise
    finally:
        # never leave a process or a file behind, whatever failed
        try:
            if dovecot is not None:
                dovecot_code = dovecot.stop()
                dovecot_problems = dovecot.problems()
        finally:
            try:
                if server is not None:
                    if server.proc is not None:
                        ours_code = server.stop()
                    ours_errors = [line for line in server.log().splitlines()
                                   if "Traceback" in line or "internal error" in line.lower()]
            finally:
                if args.keep:
                    print(f"kept {base}", file=sys.stderr)
                else:
                    shutil.rmtree(base, ignore_errors=True)
    rep = report(args, box, sessions, dovecot, time.perf_counter() - started)
    rep["machine"]["loadavg_1min"] = {"before": load_before, "after": load_after}
    rep["exit_codes"] = {"ours": ours_code, "dovecot": dovecot_code}
    rep["dovecot_log_problems"] = dovecot_problems[:20]
    rep["our_log_errors"] = ours_errors[:20]
    rep["profile"] = profile
    return rep


def check_ours(port: int, hostname: str) -> None:
    """The POP3 port greets with *this* run's host name (ports are picked by
    binding and closing, so another program could have taken it meanwhile)."""
    p = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        if hostname.encode() not in p.getwelcome():
            raise RuntimeError(f"port {port} is not our server: {p.getwelcome()!r}")
        p.quit()
    finally:
        p.close()


def source_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mailserver", "twisted"],
                               cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


FIGURES = (
    # key, label, unit, higher is better
    ("messages_per_second", "RETR messages/s", "msg/s", True),
    ("mb_per_second", "RETR MB/s", "MB/s", True),
    ("login_stat_list_ms", "login+STAT+LIST", "ms", False),
    ("quit_ms", "QUIT (UPDATE)", "ms", False),
    ("server_cpu_ms_per_message", "server CPU per RETR", "ms", False),
    ("client_cpu_ms_per_message", "client CPU per RETR", "ms", False),
)


def report(args, box: Mailbox, sessions: list, dovecot: Dovecot, elapsed: float) -> dict:
    def pick(server, run_name):
        return [s.figures() for s in sessions if s.server == server and s.run == run_name]

    runs = {}
    for run_name in ("cold", "warm"):
        ours, theirs = pick("ours", run_name), pick("dovecot", run_name)
        if not ours or not theirs:
            continue
        figures = {}
        for key, _label, _unit, _better in FIGURES:
            a = statistics.median(f[key] for f in ours)
            b = statistics.median(f[key] for f in theirs)
            ratios = [o[key] / d[key] for o, d in zip(ours, theirs) if d[key]]
            figures[key] = {"ours": a, "dovecot": b,
                            "ratio": statistics.median(ratios) if ratios else None,
                            "ratio_sessions": [round(x, 3) for x in ratios]}
        runs[run_name] = figures
    return {
        "benchmark": "pop3_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "source": source_version(),
        "reference": f"Dovecot {dovecot.version_text} pop3, same mailbox (a copy)",
        "parameters": {"messages": args.messages, "warm_runs": args.warm_runs,
                       "client": args.client},
        "mailbox": box.size_summary(),
        "runs": runs,
        "sessions": [s.figures() for s in sessions],
        "problems": [f"{s.server} {s.run}: {p}" for s in sessions for p in s.problems],
        "elapsed_seconds": round(elapsed, 1),
    }


def print_table(rep: dict) -> None:
    m, p = rep["mailbox"], rep["parameters"]
    print(f"POP3 retrieval: {m['messages']} messages ({m['total_mb']} MB, median "
          f"{m['median_octets']} octets, mean {m['mean_octets']}, {m['over_64k']} over 64 KiB), "
          f"one session per run, 1 cold + {p['warm_runs']} warm run(s), client {p['client']}  "
          f"[{rep['date']}, {rep['machine']['cpus']} CPUs, Python {rep['machine']['python']}, "
          f"source {rep['source']}]")
    print(f"reference = {rep['reference']}")
    print()
    header = f"{'figure':<26} {'run':<5} {'ours':>10} {'Dovecot':>10} {'ours/Dovecot':>13}"
    print(header)
    print("-" * len(header))
    for key, label, unit, better in FIGURES:
        for run_name in ("warm", "cold"):
            fig = rep["runs"].get(run_name, {}).get(key)
            if fig is None:
                continue
            fmt = ".3f" if "cpu" in key else (".1f" if unit != "msg/s" else ".0f")
            ratio = fig["ratio"]
            print(f"{label + ' (' + unit + ')':<26} {run_name:<5} {fig['ours']:>10{fmt}} "
                  f"{fig['dovecot']:>10{fmt}} "
                  f"{(f'{ratio:.2f}x' if ratio is not None else '-'):>13}")
    print("ours/Dovecot: for rates, below 1 means slower than Dovecot; for times and CPU,\n"
          "above 1 means slower / more CPU.  Warm figures are medians of the warm sessions.\n"
          "Server CPU: utime+stime of the server's process tree over the RETR span.")
    warm = rep["runs"].get("warm")
    if warm:
        r = warm["messages_per_second"]
        print()
        print(f"headline (warm): ours {r['ratio']:.2f}x Dovecot's RETR rate "
              f"({r['ours']:.0f} vs {r['dovecot']:.0f} msg/s, "
              f"{warm['mb_per_second']['ours']:.1f} vs {warm['mb_per_second']['dovecot']:.1f} "
              f"MB/s); server CPU per message {warm['server_cpu_ms_per_message']['ratio']:.1f}x")
    load = rep["machine"]["loadavg_1min"]
    print(f"run took {rep['elapsed_seconds']} s; load average {load['before']} before, "
          f"{load['after']} after; exit codes {rep['exit_codes']}")
    prof = rep.get("profile")
    if prof:
        f = prof["session"]
        print()
        print(f"cProfile, our server's reactor thread during one more warm session (not "
              f"counted; {f['messages_per_second']:.0f} msg/s under the profiler, "
              f"{prof['profiled_seconds']} s profiled): {prof['stats']}")
        print("  top self time (share of profiled time, microseconds per message):")
        for row in prof["self"]:
            print(f"  {row['share'] * 100:5.1f}% {row['per_message_us']:8.1f} us "
                  f"{row['calls']:>8}  {row['function']}")
        print("  inclusive time, mailserver and twisted functions:")
        for row in prof["inclusive"]:
            print(f"  {row['share'] * 100:5.1f}% {row['per_message_us']:8.1f} us "
                  f"{row['calls']:>8}  {row['function']}")
    if rep["problems"] or rep["dovecot_log_problems"] or rep["our_log_errors"]:
        print("PROBLEMS:")
        for line in rep["problems"] + rep["dovecot_log_problems"] + rep["our_log_errors"]:
            print("  " + line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=2000,
                    help="messages in the mailbox (2000)")
    ap.add_argument("--quick", action="store_true", help="200 messages (overrides --messages)")
    ap.add_argument("--warm-runs", type=int, default=1,
                    help="warm sessions per server after the cold one; the warm figures are "
                         "their median (1)")
    ap.add_argument("--client", choices=("raw", "poplib"), default="raw",
                    help="read RETR responses raw (default) or with poplib.POP3.retr")
    ap.add_argument("--timeout", type=float, default=60.0,
                    help="socket timeout of the POP3 client, seconds (60)")
    ap.add_argument("--workdir", default=None,
                    help="where the temporary maildirs go (default: the system temp dir)")
    ap.add_argument("--profile", metavar="DIR",
                    help="after measuring, run our server in-process under cProfile for one "
                         "more warm session (not counted); stats and a summary go to DIR")
    ap.add_argument("--serve-profiled", nargs=3, metavar=("CONFIG", "STATS", "LOG"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args(argv)
    if args.serve_profiled:
        serve_profiled(*args.serve_profiled)
        return 0
    if args.quick:
        args.messages = 200
    if not (1 <= args.messages <= 200_000):
        ap.error("--messages must be between 1 and 200000")
    if not (0 <= args.warm_runs <= 20):
        ap.error("--warm-runs must be between 0 and 20")
    os.chdir(REPO)
    rep = run(args)
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        print_table(rep)
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
