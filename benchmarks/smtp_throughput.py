#!/usr/bin/env python
"""SMTP and LMTP delivery throughput of the real server, as a ratio of bare
durable maildir writes measured in the same run.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/smtp_throughput.py [--messages N] [--clients C]
                                                       [--size BYTES] [--rounds R] [--json]

What one run does (everything on loopback, every loop bounded by a message
count and by ``--phase-timeout`` seconds):

1. starts the real server (``twistd -n mailserver``, through
   ``tests.support.server.MailServer``) with the embedded LDIF directory
   (``etc/quickstart-users.ldif``) in a fresh temporary directory;
2. for each of ``--rounds`` rounds, measures four phases with ``C`` threads
   sharing ``N`` messages of ``--size`` bytes:

   * ``maildir fsync``: ``MaildirStore(root).deliver(...)`` called directly, fsync on:
     the bare cost of the durable write, and **the reference**;
   * ``maildir no-fsync``: the same with ``fsync=False`` (what the disk flush costs);
   * ``SMTP``: one ``smtplib.SMTP`` connection per thread, reused for every
     message, MAIL/RCPT/DATA to alice@example.test;
   * ``LMTP``: the same with ``smtplib.LMTP`` on the server's LMTP listener;

   the two bare phases take a fraction of a second for 500 messages, so each
   goes on past ``N`` until it has run ``--reference-seconds`` (1 s by
   default; at most 50 N messages): a rate over a longer window is steadier;

3. reports messages per second and latency percentiles per phase, and each
   phase's throughput divided by the reference's throughput *in the same round*
   (median over rounds), so the figures can be compared across machines.

Latency: for SMTP/LMTP, from writing the final block of data (ending in
``CRLF.CRLF``) to reading the ``250`` (which the server sends only once the copy
is fsynced); for the bare phases, one ``deliver()`` call.

``--profile DIR`` adds one extra SMTP pass (not counted in the figures) under
``py-spy record`` attached to the server process, writes the raw samples and a
flame graph into DIR and prints the functions where the server spends its CPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mailserver.directory.interfaces import Mailbox  # noqa: E402
from mailserver.store.maildir import MaildirStore  # noqa: E402
from tests.support.server import MailServer  # noqa: E402

SENDER = "bench@example.org"
RECIPIENT = "alice@example.test"
LDIF = REPO / "etc" / "quickstart-users.ldif"
# Stands in for the Received header the server prepends (same shape and size).
PREFIX = (
    b"Received: from bench.example.org (unknown [127.0.0.1])\r\n"
    b"\tby mx.example.test (mailserver) with ESMTP id AAAAAAAAAAAAAAAA\r\n"
    b"\tfor <alice@example.test>; Thu, 01 Jan 2026 00:00:00 +0000\r\n"
)
WARMUP_PER_CLIENT = 3
# A bare phase shorter than --reference-seconds goes on past --messages, up to this factor.
MAX_FACTOR = 50


# --- the message -------------------------------------------------------------

def make_message(size: int) -> bytes:
    """A plain-text message of exactly ``size`` octets, CRLF line endings."""
    head = (
        "From: Benchmark <bench@example.org>\r\n"
        "To: Alice <alice@example.test>\r\n"
        "Subject: smtp_throughput benchmark\r\n"
        "Message-ID: <smtp-throughput@example.org>\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    if size < len(head) + 2:
        raise SystemExit(f"--size must be at least {len(head) + 2}")
    line = (b"The quick brown fox jumps over the lazy dog 0123456789 " * 2)[:76] + b"\r\n"
    body = bytearray()
    room = size - len(head)
    while len(body) + len(line) <= room:
        body += line
    rest = room - len(body)
    if rest >= 2:
        body += b"x" * (rest - 2) + b"\r\n"
    elif rest == 1:  # one octet left over: lengthen the last line
        body[-2:] = b"x\r\n"
    msg = head + bytes(body)
    assert len(msg) == size, (len(msg), size)
    return msg


def dot_stuffed(msg: bytes) -> bytes:
    """The DATA payload smtplib would send, terminator included."""
    stuffed = msg.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


# --- measuring ---------------------------------------------------------------

def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def proc_cpu_seconds(pid: int, children: bool = False):
    """utime + stime of a process in seconds (Linux), or None; with
    ``children``, plus its live child processes' (the server's workers)."""
    own = _cpu_seconds(pid)
    if own is None or not children:
        return own
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _parent(int(entry)) == pid:
            own += _cpu_seconds(int(entry)) or 0.0
    return own


def _parent(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_seconds(pid: int):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class PhaseResult:
    def __init__(self, name: str, count: int, seconds: float, latencies: list,
                 errors: int, cpu=None) -> None:
        self.name = name
        self.count = count
        self.seconds = seconds
        self.latencies = latencies
        self.errors = errors
        self.cpu = cpu  # CPU seconds: the server's, or this process's for a bare phase

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


def run_threads(name: str, clients: int, messages: int, setup, one, teardown,
                timeout: float, server_pid=None, min_seconds: float = 0.0) -> PhaseResult:
    """Run ``one(state)`` at least ``messages`` times over ``clients`` threads.

    ``setup()`` makes each thread's state (and does its warm-up) before the
    clock starts; ``one`` returns the latency of one message or raises.
    All threads start together and take messages from a shared count.  The
    phase ends once ``messages`` are done and ``min_seconds`` have passed
    (never after more than ``MAX_FACTOR * messages``), or after ``timeout``
    seconds, and then counts what was done.
    """
    limit = messages * MAX_FACTOR if min_seconds > 0 else messages
    tickets = itertools.count()  # next() is atomic in CPython
    barrier = threading.Barrier(clients + 1)
    clock = {"start": 0.0, "deadline": float("inf")}
    lat_lists = [[] for _ in range(clients)]
    errors = [0] * clients
    failures = []

    def more(k: int) -> bool:
        if k >= limit or time.monotonic() > clock["deadline"]:
            return False
        return k < messages or time.perf_counter() - clock["start"] < min_seconds

    def worker(i: int) -> None:
        state = None
        try:
            state = setup()
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)
            barrier.abort()
            return
        try:
            barrier.wait()
            while more(next(tickets)):
                try:
                    lat_lists[i].append(one(state))
                except (smtplib.SMTPException, OSError) as e:
                    errors[i] += 1
                    if errors[i] > 10:
                        failures.append(e)
                        break
        except threading.BrokenBarrierError:
            pass
        finally:
            if state is not None:
                try:
                    teardown(state)
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass

    threads = [threading.Thread(target=worker, args=(i,), name=f"{name}-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=60)
    except threading.BrokenBarrierError:
        for t in threads:
            t.join(10)
        raise RuntimeError(f"{name}: setup failed: {failures[:1]}")
    # The workers are released together with this thread; the first
    # ``messages`` tickets never look at the clock, so setting it now is early enough.
    cpu0 = proc_cpu_seconds(server_pid or os.getpid(), children=bool(server_pid))
    clock["start"] = time.perf_counter()
    clock["deadline"] = time.monotonic() + timeout
    for t in threads:
        t.join()
    seconds = time.perf_counter() - clock["start"]
    cpu1 = proc_cpu_seconds(server_pid or os.getpid(), children=bool(server_pid))
    if failures:
        raise RuntimeError(f"{name}: {failures[0]!r}")
    latencies = sorted(x for lst in lat_lists for x in lst)
    cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
    return PhaseResult(name, len(latencies), seconds, latencies, sum(errors), cpu)


def bare_maildir_phase(name: str, root: Path, source: Path, fsync: bool, clients: int,
                       messages: int, timeout: float, min_seconds: float = 0.0) -> PhaseResult:
    store = MaildirStore(str(root), hostname="bench.example.test", fsync=fsync)
    mailbox = Mailbox(address=RECIPIENT, login="alice")

    def deliver():
        store.deliver(mailbox, sender=SENDER, source_path=str(source), prefix=PREFIX)

    def setup():
        for _ in range(WARMUP_PER_CLIENT):
            deliver()
        return store

    def one(_state):
        t0 = time.perf_counter()
        deliver()
        return time.perf_counter() - t0

    return run_threads(name, clients, messages, setup, one, lambda s: None, timeout,
                       min_seconds=min_seconds)


def smtp_phase(name: str, lmtp: bool, port: int, payload: bytes, clients: int, messages: int,
               timeout: float, server_pid: int, reuse: bool = True) -> PhaseResult:
    """``reuse``: one connection per thread for the whole phase; otherwise a
    new connection (greeting, EHLO/LHLO, QUIT) for every message, timed as a
    whole, and a latency from writing the data to the 250 as before."""
    cls = smtplib.LMTP if lmtp else smtplib.SMTP

    def transaction(c) -> float:
        code, resp = c.mail(SENDER)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, resp, SENDER)
        code, resp = c.rcpt(RECIPIENT)
        if code != 250:
            raise smtplib.SMTPRecipientsRefused({RECIPIENT: (code, resp)})
        c.putcmd("data")
        code, resp = c.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, resp)
        t0 = time.perf_counter()
        c.send(payload)
        code, resp = c.getreply()
        latency = time.perf_counter() - t0
        if code != 250:
            raise smtplib.SMTPDataError(code, resp)
        return latency

    def setup():
        c = connect()
        for _ in range(WARMUP_PER_CLIENT):
            transaction(c)
        return c

    def teardown(c):
        try:
            c.quit()
        finally:
            c.close()

    def connect():
        c = cls("127.0.0.1", port, local_hostname="bench.example.org", timeout=30)
        c.ehlo("bench.example.org")
        return c

    def one_connection(_state) -> float:
        c = connect()
        try:
            return transaction(c)
        finally:
            teardown(c)

    if not reuse:
        def warm():
            for _ in range(WARMUP_PER_CLIENT):
                one_connection(None)
        return run_threads(name, clients, messages, warm, one_connection, lambda s: None,
                           timeout, server_pid)
    return run_threads(name, clients, messages, setup, transaction, teardown, timeout, server_pid)


# --- profiling ---------------------------------------------------------------

def find_py_spy():
    here = Path(sys.executable).with_name("py-spy")
    return str(here) if here.exists() else shutil.which("py-spy")


def _module_of(frame: str) -> str:
    """``"func (pkg/mod.py:12)"`` -> ``"pkg/mod.py"``; a package's sub-modules
    for twisted are folded into their package (twisted/logger, ...)."""
    where = frame.rpartition(" (")[2].rstrip(")").rpartition(":")[0] or frame
    parts = where.split("/")
    if parts[0] == "twisted" and len(parts) > 2:
        return "/".join(parts[:2]) + "/"
    return where


def summarise_raw(raw: Path, top: int = 15) -> dict:
    """Self and inclusive sample counts per function from py-spy's raw output."""
    self_counts, incl_counts, threads, modules = Counter(), Counter(), Counter(), Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        if frames and frames[0].startswith(("process ", "thread ")):
            while frames and frames[0].startswith(("process ", "thread ")):
                threads[frames[0]] += n if frames[0].startswith("thread ") else 0
                frames = frames[1:]
        if not frames:
            continue
        self_counts[frames[-1]] += n
        modules[_module_of(frames[-1])] += n
        for f in set(frames):
            if "mailserver/" in f or "twisted/logger/" in f:
                incl_counts[f] += n

    def rows(counter):
        return [{"function": f, "samples": c, "share": c / total if total else 0.0}
                for f, c in counter.most_common(top)]

    return {"samples": total, "self": rows(self_counts), "self_by_module": rows(modules),
            "inclusive": rows(incl_counts),
            "threads": [{"thread": t, "samples": c} for t, c in threads.most_common() if c]}


def profiled_pass(args, server: MailServer, payload: bytes, outdir: Path) -> dict:
    py_spy = find_py_spy()
    if py_spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    outdir.mkdir(parents=True, exist_ok=True)
    result = {}
    # Two passes: the raw samples only of the thread holding the GIL (where
    # the Python CPU goes), the flame graph of every thread that is not idle.
    for fmt, suffix, extra in (("raw", "txt", ["--gil"]), ("flamegraph", "svg", [])):
        out = outdir / f"smtp-server.{suffix}"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.proc.pid), "--rate", "200", "--threads",
             "--function", "--format", fmt, "--output", str(out), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let py-spy attach
        try:
            smtp_phase("SMTP (profiled)", False, server.smtp_port, payload, args.clients,
                       args.messages, args.phase_timeout, server.proc.pid)
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                _, err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                _, err = spy.communicate()
        if not out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
        result[fmt] = str(out)
    result["summary"] = summarise_raw(outdir / "smtp-server.txt")
    return result


# --- the run -----------------------------------------------------------------

PHASES = ("maildir fsync", "maildir no-fsync", "SMTP", "LMTP", "SMTP 1/conn", "LMTP 1/conn")
REFERENCE = "maildir fsync"


def run(args) -> dict:
    msg = make_message(args.size)
    payload = dot_stuffed(msg)
    base = Path(tempfile.mkdtemp(prefix="mailserver-bench-", dir=args.workdir))
    source = base / "message.eml"
    source.write_bytes(msg)
    server = MailServer(
        base / "server",
        directory={"backend": "ldif", "ldif_file": str(LDIF), "base_dn": "dc=example,dc=test"},
        # connection_rate_limit off: the one-per-connection phases open hundreds a second
        smtp={"max_message_size": max(26214400, 2 * args.size), "connection_rate_limit": 0},
        server={"hostname": f"mx-bench-{os.getpid()}.example.test",
                "max_connections_per_client": max(20, args.clients + 5),
                "max_connections": max(200, args.clients + 5), "workers": args.workers},
        lmtp_unix=False,
    )
    rounds = []
    profile = None
    started = time.perf_counter()
    load_before = loadavg()
    try:
        server.start()
        pid = server.proc.pid
        check_server(server, f"mx-bench-{os.getpid()}.example.test")
        for r in range(args.rounds):
            res = {}
            res["maildir fsync"] = bare_maildir_phase(
                "maildir fsync", base / f"bare-fsync-{r}", source, True,
                args.clients, args.messages, args.phase_timeout, args.reference_seconds)
            res["maildir no-fsync"] = bare_maildir_phase(
                "maildir no-fsync", base / f"bare-nofsync-{r}", source, False,
                args.clients, args.messages, args.phase_timeout, args.reference_seconds)
            res["SMTP"] = smtp_phase("SMTP", False, server.smtp_port, payload, args.clients,
                                     args.messages, args.phase_timeout, pid)
            res["LMTP"] = smtp_phase("LMTP", True, server.lmtp_port, payload, args.clients,
                                     args.messages, args.phase_timeout, pid)
            res["SMTP 1/conn"] = smtp_phase("SMTP 1/conn", False, server.smtp_port, payload,
                                            args.clients, args.messages, args.phase_timeout,
                                            pid, reuse=False)
            res["LMTP 1/conn"] = smtp_phase("LMTP 1/conn", True, server.lmtp_port, payload,
                                            args.clients, args.messages, args.phase_timeout,
                                            pid, reuse=False)
            rounds.append(res)
            if not args.json:
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{k} {v.rate:.0f}/s" for k, v in res.items()), file=sys.stderr)
        load_after = loadavg()
        served = [p for p in PHASES if "MTP" in p]
        expected = sum(res[p].count for res in rounds for p in served)
        expected += len(served) * WARMUP_PER_CLIENT * args.clients * args.rounds
        delivered = len(server.messages("alice"))
        if args.profile:
            profile = profiled_pass(args, server, payload, Path(args.profile))
    except Exception:
        print("server log, last lines:\n" + "\n".join(server.log().splitlines()[-30:]),
              file=sys.stderr)
        raise
    finally:
        code = server.stop()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    if delivered != expected:
        raise SystemExit(f"delivered {delivered} messages, expected {expected}")
    rep = report(args, rounds, profile, delivered, time.perf_counter() - started, code)
    rep["machine"]["loadavg_1min"] = {"before": load_before, "after": load_after}
    return rep


def check_server(server: MailServer, hostname: str) -> None:
    """Make sure the ports answer with *our* server's greeting.

    ``MailServer`` picks free ports by binding and closing them, so another
    program starting at the same moment could take one first; then twistd
    exits and the benchmark would be talking to a stranger.
    """
    time.sleep(0.2)
    if server.proc.poll() is not None:
        raise RuntimeError(f"server exited with {server.proc.returncode}")
    for cls, port in ((smtplib.SMTP, server.smtp_port), (smtplib.LMTP, server.lmtp_port)):
        c = cls(timeout=10)
        try:
            code, banner = c.connect("127.0.0.1", port)
            if code != 220 or hostname.encode() not in banner:
                raise RuntimeError(f"port {port} is not our server: {code} {banner!r}")
            c.quit()
        finally:
            c.close()


def source_version() -> str:
    """The commit measured, with "+dirty" when the server's code has local changes."""
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


def report(args, rounds, profile, delivered, elapsed, exit_code) -> dict:
    phases = {}
    for name in PHASES:
        results = [r[name] for r in rounds]
        lat = sorted(x for res in results for x in res.latencies)
        ratios = [r[name].rate / r[REFERENCE].rate for r in rounds if r[REFERENCE].rate]
        count = sum(res.count for res in results)
        cpu = [res.cpu for res in results if res.cpu is not None]
        cpu_counts = sum(res.count for res in results if res.cpu is not None)
        phases[name] = {
            "messages_per_second": statistics.median(res.rate for res in results),
            "messages_per_second_rounds": [round(res.rate, 1) for res in results],
            "ratio_to_reference": statistics.median(ratios) if ratios else None,
            "ratio_rounds": [round(x, 3) for x in ratios],
            "latency_ms": {
                "p50": percentile(lat, 50) * 1000,
                "p90": percentile(lat, 90) * 1000,
                "p99": percentile(lat, 99) * 1000,
                "max": (lat[-1] * 1000) if lat else float("nan"),
            },
            "messages": count,
            "errors": sum(res.errors for res in results),
            # the server process's for SMTP/LMTP, the benchmark's own for a bare phase
            "cpu_ms_per_message": (sum(cpu) / cpu_counts * 1000) if cpu and cpu_counts else None,
        }
    return {
        "benchmark": "smtp_throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "source": source_version(),
        "parameters": {"messages": args.messages, "clients": args.clients, "size": args.size,
                       "rounds": args.rounds},
        "reference": REFERENCE + " (MaildirStore.deliver from the same threads, same message)",
        "phases": phases,
        "delivered_by_server": delivered,
        "server_exit_code": exit_code,
        "elapsed_seconds": round(elapsed, 1),
        "profile": profile,
    }


def print_table(rep: dict) -> None:
    p = rep["parameters"]
    print(f"mailserver delivery throughput: {p['messages']} messages x {p['size']} B, "
          f"{p['clients']} clients, median of {p['rounds']} round(s)  [{rep['date']}, "
          f"{rep['machine']['cpus']} CPUs, Python {rep['machine']['python']}, "
          f"source {rep['source']}]")
    print(f"reference = {rep['reference']}")
    print()
    header = (f"{'phase':<18} {'ratio':>7} {'msg/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'CPU ms/msg':>11}")
    print(header)
    print("-" * len(header))
    for name, ph in rep["phases"].items():
        lat = ph["latency_ms"]
        cpu = ph["cpu_ms_per_message"]
        ratio = ph["ratio_to_reference"]
        print(f"{name:<18} {(f'{ratio:.2f}x' if ratio is not None else '-'):>7} "
              f"{ph['messages_per_second']:>8.0f} {lat['p50']:>8.2f} {lat['p90']:>8.2f} "
              f"{lat['p99']:>8.2f} {(f'{cpu:.2f}' if cpu is not None else '-'):>11}")
    print("ratio: msg/s over the reference's msg/s in the same round, median of the rounds.\n"
          "CPU: user+system time of the server process (SMTP, LMTP) or of this process\n"
          "(bare phases) per message; an absolute figure, for finding where time goes.")
    print()
    for name in ("SMTP", "LMTP"):
        ph = rep["phases"][name]
        print(f"{name}: {ph['ratio_to_reference']:.2f}x of bare maildir writes "
              f"({ph['messages_per_second']:.0f} msg/s vs "
              f"{rep['phases'][REFERENCE]['messages_per_second']:.0f} msg/s; "
              f"rounds {ph['ratio_rounds']})")
    load = rep["machine"]["loadavg_1min"]
    print(f"delivered by the server: {rep['delivered_by_server']} (all checked); "
          f"run took {rep['elapsed_seconds']} s; load average {load['before']} before, "
          f"{load['after']} after (other work on the machine makes the rounds disagree)")
    prof = rep.get("profile")
    if prof:
        s = prof["summary"]
        print()
        print(f"py-spy, server process during an extra SMTP pass ({s['samples']} samples, "
              f"thread holding the GIL only): {prof['raw']}, flame graph {prof['flamegraph']}")
        for t in s["threads"]:
            print(f"  {t['samples']:>6}  {t['thread']}")
        print("  top self time:")
        for row in s["self"]:
            print(f"  {row['share'] * 100:5.1f}%  {row['function']}")
        print("  self time by module:")
        for row in s["self_by_module"]:
            print(f"  {row['share'] * 100:5.1f}%  {row['function']}")
        print("  inclusive time, mailserver and twisted.logger functions:")
        for row in s["inclusive"]:
            print(f"  {row['share'] * 100:5.1f}%  {row['function']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", "-n", type=int, default=500, help="messages per phase (500)")
    ap.add_argument("--clients", "-c", type=int, default=4, help="concurrent clients/threads (4)")
    ap.add_argument("--size", "-s", type=int, default=4096, help="message size in octets (4096)")
    ap.add_argument("--rounds", "-r", type=int, default=5,
                    help="rounds of all four phases; figures are medians (5)")
    ap.add_argument("--phase-timeout", type=float, default=60.0,
                    help="stop a phase after this many seconds (60)")
    ap.add_argument("--reference-seconds", type=float, default=1.0,
                    help="a bare maildir phase runs at least this long (more messages than "
                         "--messages, at most 50 times as many) so that its rate is stable (1.0)")
    ap.add_argument("--workdir", default=None,
                    help="where the temporary maildirs go (default: the system temp dir); "
                         "the reference and the server always share it")
    ap.add_argument("--workers", type=int, default=1,
                    help="the server's [server] workers (1: one process)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--profile", metavar="DIR",
                    help="after measuring, profile one SMTP pass with py-spy into DIR")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 100):
        ap.error("--clients must be between 1 and 100")
    if not (1 <= args.messages <= 1_000_000):
        ap.error("--messages must be between 1 and 1000000")
    if not (1 <= args.rounds <= 20):
        ap.error("--rounds must be between 1 and 20")
    os.chdir(REPO)
    rep = run(args)
    if args.json:
        json.dump(rep, sys.stdout, indent=2)
        print()
    else:
        print_table(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
