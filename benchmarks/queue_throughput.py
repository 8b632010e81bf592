#!/usr/bin/env python
"""Outbound queue throughput: messages relayed through the real server to
Postfix's smtp-sink, as a ratio of the same messages sent straight to it.

Run from the repository root::

    /tmp/venv/bin/python benchmarks/queue_throughput.py [--messages N] [--clients C]
                                                        [--size BYTES] [--rounds R] [--json]

What one run does (everything on loopback; every wait is bounded by
``--phase-timeout`` seconds and every loop by a message count):

1. starts ``smtp-sink`` (tests/support/sink.py) on a free port, saving each
   message to a file (``-d``), and the real server (``twistd -n mailserver``
   through tests/support/server.py's ``MailServer``, fsync on) relaying for
   127.0.0.0/8, with the transport ``bench.test = smtp:[127.0.0.1]:<sink port>``;
2. warms both up, then for each of ``--rounds`` rounds runs two phases of
   ``N`` messages of ``--size`` octets, each with a unique Message-ID, over
   ``C`` client threads with one SMTP connection each:

   * ``direct`` -- **the reference**: smtplib sends the messages straight to
     smtp-sink.  Rate: N / (last 250 - first MAIL); latency: one whole
     transaction (MAIL to the 250 after the dot);
   * ``queue``: smtplib submits them to the server for carol@bench.test; the
     server answers 250 once the message is in its queue (fsynced) and then
     relays it to smtp-sink.  Rate: N / (last remote acceptance - first 250);
     latency: from the server's 250 to the remote acceptance, per message;

3. reports both and the queue's figures divided by the reference's *in the
   same round* (median over rounds).

Remote acceptance is the modification time of the message's dump file:
smtp-sink closes the file at the end of DATA, just before it sends its 250
(postfix 3.7's smtp-sink.c), and the message is matched to its submission by
Message-ID.  The 250 from the server is ``time.time()`` as ``sendmail``
returns in the client thread.  File times come from the kernel's coarse clock
(a millisecond or a few here), which is well below the figures measured.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support.server import MailServer  # noqa: E402
from tests.support.sink import SmtpSink, parse_dump, smtp_sink_path  # noqa: E402

LDIF = REPO / "etc" / "quickstart-users.ldif"
SENDER = "bench@example.org"
RECIPIENT = "carol@bench.test"
QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt")


def make_message(size: int, message_id: str) -> bytes:
    """A plain-text message of ``size`` octets (at least its header), CRLF."""
    head = (
        "From: Benchmark <bench@example.org>\r\n"
        "To: Carol <carol@bench.test>\r\n"
        "Subject: queue_throughput benchmark\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    line = (b"The quick brown fox jumps over the lazy dog 0123456789 " * 2)[:76] + b"\r\n"
    body = bytearray()
    while len(head) + len(body) + len(line) <= size:
        body += line
    rest = size - len(head) - len(body)
    if rest >= 2:
        body += b"x" * (rest - 2) + b"\r\n"
    return head + bytes(body)


def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1,
                   int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def proc_cpu_seconds(pid: int):
    """utime + stime of a process in seconds (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def sink_sessions(sink: SmtpSink):
    """smtp-sink's ``-c`` counter of finished sessions, or None."""
    text = sink.log().replace("\r", "\n")
    for line in reversed(text.splitlines()):
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if "sess" in fields:
            try:
                return int(fields["sess"])
            except ValueError:
                return None
    return None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll another process's progress until ``predicate()`` or the deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def queue_size(server: MailServer) -> int:
    total = 0
    for state in QUEUE_STATES:
        try:
            total += sum(1 for n in os.listdir(server.queue_dir / state)
                         if not n.endswith(".reason"))
        except FileNotFoundError:
            pass
    return total


def clear_dumps(sink: SmtpSink) -> None:
    for path in sink.dump_files():
        path.unlink(missing_ok=True)


def send_all(port: int, clients: int, messages: list, timeout: float) -> dict:
    """Send ``(message_id, data)`` pairs over ``clients`` connections at once.

    Returns ``{message_id: (start, end)}``: ``time.time()`` before MAIL and
    after the 250 for the data.  Raises when anything was refused."""
    tickets = itertools.count()
    barrier = threading.Barrier(clients + 1)
    times: dict = {}
    failures: list = []
    deadline = time.monotonic() + timeout

    def worker() -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
                s.ehlo("bench.example.org")
                barrier.wait()
                while time.monotonic() < deadline:
                    k = next(tickets)  # atomic in CPython
                    if k >= len(messages):
                        return
                    mid, data = messages[k]
                    start = time.time()
                    refused = s.sendmail(SENDER, [RECIPIENT], data)
                    end = time.time()
                    if refused:
                        raise RuntimeError(f"refused: {refused}")
                    times[mid] = (start, end)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(timeout + 5)
    if failures:
        raise SystemExit(f"a client failed: {failures[0]!r}")
    if len(times) != len(messages):
        raise SystemExit(f"only {len(times)} of {len(messages)} messages sent in {timeout} s")
    return times


def accepted_at(sink: SmtpSink) -> dict:
    """``{message_id: [mtime, ...]}`` of the messages smtp-sink saved."""
    out: dict = {}
    for path in sink.dump_files():
        msg = parse_dump(path)
        mid = (msg.header("Message-ID") or "").strip("<>")
        out.setdefault(mid, []).append(msg.mtime)
    return out


def phase_direct(sink: SmtpSink, n: int, clients: int, size: int, tag: str,
                 timeout: float) -> dict:
    messages = [(f"{tag}-{i}@bench", make_message(size, f"{tag}-{i}@bench")) for i in range(n)]
    times = send_all(sink.port, clients, messages, timeout)
    first = min(s for s, _ in times.values())
    last = max(e for _, e in times.values())
    lat = sorted(e - s for s, e in times.values())
    got = accepted_at(sink)
    missing = [m for m, _ in messages if m not in got]
    if missing:
        raise SystemExit(f"direct: {len(missing)} messages not saved by smtp-sink")
    clear_dumps(sink)
    return {"phase": "direct", "messages": n, "seconds": last - first,
            "rate": n / (last - first), "latency_p50": percentile(lat, 50),
            "latency_p99": percentile(lat, 99)}


def phase_queue(server: MailServer, sink: SmtpSink, n: int, clients: int, size: int,
                tag: str, timeout: float) -> dict:
    messages = [(f"{tag}-{i}@bench", make_message(size, f"{tag}-{i}@bench")) for i in range(n)]
    cpu0 = proc_cpu_seconds(server.proc.pid)
    sess0 = sink_sessions(sink)
    times = send_all(server.smtp_port, clients, messages, timeout)
    # The queue is empty once every message got its 250 from smtp-sink, which
    # had closed the dump file before answering.
    wait_until(lambda: queue_size(server) == 0, timeout, "the queue to empty")
    cpu1 = proc_cpu_seconds(server.proc.pid)
    got = accepted_at(sink)
    missing = [m for m, _ in messages if m not in got]
    if missing:
        raise SystemExit(f"queue: {len(missing)} messages never reached smtp-sink")
    duplicates = sum(len(got[m]) - 1 for m, _ in messages)
    first_250 = min(e for _, e in times.values())
    last_250 = max(e for _, e in times.values())
    first_start = min(s for s, _ in times.values())
    remote = {m: min(got[m]) for m, _ in messages}
    last_remote = max(remote.values())
    lat = sorted(remote[m] - times[m][1] for m, _ in messages)
    sess1 = sink_sessions(sink)
    clear_dumps(sink)
    return {"phase": "queue", "messages": n, "seconds": last_remote - first_250,
            "rate": n / (last_remote - first_250),
            "submit_rate": n / (last_250 - first_start),
            "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
            "latency_max": lat[-1], "duplicates": duplicates,
            "cpu_per_msg": (cpu1 - cpu0) / n if cpu0 is not None and cpu1 is not None else None,
            "sessions": (sess1 - sess0) if sess0 is not None and sess1 is not None else None}


def ctl(server: MailServer, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "mailserver.ctl", "queue", *args,
                    "--queue-dir", str(server.queue_dir)], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


def phase_drain(server: MailServer, sink: SmtpSink, n: int, clients: int, size: int,
                tag: str, timeout: float) -> dict:
    """Delivery alone: N messages wait in deferred/ (smtp-sink stopped), then
    smtp-sink comes back on its port and ``mailserverctl queue flush`` runs."""
    messages = [(f"{tag}-{i}@bench", make_message(size, f"{tag}-{i}@bench")) for i in range(n)]
    sink.stop()
    send_all(server.smtp_port, clients, messages, timeout)
    wait_until(lambda: len(os.listdir(server.queue_dir / "deferred")) == n, timeout,
               "every message deferred")
    sink.start()
    cpu0 = proc_cpu_seconds(server.proc.pid)
    ctl(server, "flush")
    wait_until(lambda: queue_size(server) == 0, timeout, "the flushed queue to empty")
    cpu1 = proc_cpu_seconds(server.proc.pid)
    got = accepted_at(sink)
    missing = [m for m, _ in messages if m not in got]
    if missing:
        raise SystemExit(f"drain: {len(missing)} messages never reached smtp-sink")
    first = min(min(got[m]) for m, _ in messages)
    last = max(min(got[m]) for m, _ in messages)
    clear_dumps(sink)
    return {"phase": "drain", "messages": n, "seconds": last - first,
            "rate": (n - 1) / (last - first) if last > first else float("nan"),
            "duplicates": sum(len(got[m]) - 1 for m, _ in messages),
            "cpu_per_msg": (cpu1 - cpu0) / n if cpu0 is not None and cpu1 is not None else None}


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=300, help="messages per phase (300)")
    p.add_argument("--clients", type=int, default=4, help="client connections (4)")
    p.add_argument("--size", type=int, default=4096, help="octets per message (4096)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (3)")
    p.add_argument("--phase-timeout", type=float, default=120.0, help="seconds per phase (120)")
    p.add_argument("--workdir", help="where the temporary files go")
    p.add_argument("--keep", action="store_true", help="keep the temporary files")
    p.add_argument("--no-drain", dest="drain", action="store_false",
                   help="skip the drain phase (delivery of a flushed queue alone)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    if args.messages < 1 or args.clients < 1 or args.rounds < 1:
        p.error("--messages, --clients and --rounds must be at least 1")
    if smtp_sink_path() is None:
        print("smtp-sink not found: install the Debian package 'postfix'", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="queue-bench-", dir=args.workdir))
    sink = server = None
    load_before = loadavg()
    try:
        sink = SmtpSink(dump_dir=work / "sink", hostname="sink.bench.test",
                        options=["-c"]).start()
        server = MailServer(
            work / "server", domains=("example.test",),
            directory={"backend": "ldif", "ldif_file": str(LDIF), "base_dn": "dc=example,dc=test"},
            relay={"trusted_networks": ["127.0.0.0/8"],
                   "transports": {"bench.test": f"smtp:[127.0.0.1]:{sink.port}"}},
            # Deferred messages wait for a flush (the drain phase), never a timer.
            queue={"scan_interval": 1.0, "min_backoff": 3600.0},
        ).start()
        # Warm-up: imports, first connections, the directory's first lookups.
        phase_direct(sink, 20, args.clients, args.size, "warm-direct", args.phase_timeout)
        phase_queue(server, sink, 20, args.clients, args.size, "warm-queue", args.phase_timeout)
        rounds = []
        for r in range(args.rounds):
            ref = phase_direct(sink, args.messages, args.clients, args.size, f"d{r}",
                               args.phase_timeout)
            q = phase_queue(server, sink, args.messages, args.clients, args.size, f"q{r}",
                            args.phase_timeout)
            drain = phase_drain(server, sink, args.messages, args.clients, args.size, f"f{r}",
                                args.phase_timeout) if args.drain else None
            rounds.append({"direct": ref, "queue": q, "drain": drain,
                           "drain_ratio": drain["rate"] / ref["rate"] if drain else None,
                           "rate_ratio": q["rate"] / ref["rate"],
                           "p50_ratio": q["latency_p50"] / ref["latency_p50"],
                           "p99_ratio": q["latency_p99"] / ref["latency_p99"]})
            if not args.json:
                print(f"round {r + 1}: direct {ref['rate']:.0f} msg/s, "
                      f"queue {q['rate']:.0f} msg/s ({rounds[-1]['rate_ratio']:.3f}x), "
                      f"queue latency p50 {q['latency_p50'] * 1000:.0f} ms "
                      f"p99 {q['latency_p99'] * 1000:.0f} ms"
                      + (f", drain {drain['rate']:.0f} msg/s" if drain else ""), flush=True)
        left = queue_size(server)
    finally:
        if server is not None:
            server.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def med(key, phase=None):
        values = [(x[phase] if phase else x)[key] for x in rounds if not phase or x[phase]]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    summary = {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "python": platform.python_version(),
        "messages": args.messages, "clients": args.clients, "size": args.size,
        "rounds": rounds,
        "median": {
            "rate_ratio": med("rate_ratio"), "p50_ratio": med("p50_ratio"),
            "p99_ratio": med("p99_ratio"),
            "direct_rate": med("rate", "direct"), "queue_rate": med("rate", "queue"),
            "submit_rate": med("submit_rate", "queue"),
            "direct_p50": med("latency_p50", "direct"), "direct_p99": med("latency_p99", "direct"),
            "queue_p50": med("latency_p50", "queue"), "queue_p99": med("latency_p99", "queue"),
            "cpu_per_msg": med("cpu_per_msg", "queue"), "sessions": med("sessions", "queue"),
            "drain_rate": med("rate", "drain"), "drain_ratio": med("drain_ratio"),
            "drain_cpu_per_msg": med("cpu_per_msg", "drain"),
        },
        "duplicates": sum(x[k]["duplicates"] for x in rounds for k in ("queue", "drain")
                          if x[k]),
        "left_in_queue": left,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "workdir": str(work) if args.keep else None,
    }
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    m = summary["median"]
    ms = 1000.0
    print()
    print(f"{args.messages} messages of {args.size} octets, {args.clients} clients, "
          f"{args.rounds} rounds (medians); load average {load_before} -> {loadavg()}")
    print(f"  direct to smtp-sink (reference): {m['direct_rate']:.0f} msg/s, "
          f"transaction p50 {m['direct_p50'] * ms:.1f} ms, p99 {m['direct_p99'] * ms:.1f} ms")
    print(f"  through the queue:  {m['rate_ratio']:.3f}x ({m['queue_rate']:.0f} msg/s, "
          f"first 250 to last remote acceptance; submission alone {m['submit_rate']:.0f} msg/s)")
    print(f"  250 -> remote 250:  p50 {m['queue_p50'] * ms:.0f} ms ({m['p50_ratio']:.1f}x the "
          f"direct transaction), p99 {m['queue_p99'] * ms:.0f} ms ({m['p99_ratio']:.1f}x)")
    cpu = m["cpu_per_msg"]
    print(f"  server CPU per message (receive, queue, relay): "
          f"{cpu * ms:.1f} ms" if cpu is not None else "  server CPU: n/a")
    if m["drain_rate"] is not None:
        print(f"  drain (delivery alone, a flushed queue): {m['drain_ratio']:.3f}x "
              f"({m['drain_rate']:.0f} msg/s, first to last remote acceptance; "
              f"server CPU {m['drain_cpu_per_msg'] * ms:.1f} ms per message)")
    if m["sessions"] is not None:
        print(f"  SMTP sessions ended at smtp-sink per round: {m['sessions']:.0f} "
              f"for {args.messages} messages (connections kept open are not counted)")
    print(f"  duplicates at smtp-sink: {summary['duplicates']}; left in the queue: {left}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
