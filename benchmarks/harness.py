"""Pieces shared by the side-by-side benchmark (``compare.py``): process-tree
CPU and memory from ``/proc``, a peak-memory sampler, waiting for files in a
maildir, running ``smtp-source`` and reading what it says, medians and ratios,
and the text table.  Pure functions where possible, so that
``tests/unit/test_bench_harness.py`` can check them without starting anything.
"""

from __future__ import annotations

import os
import re
import resource
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


# --- processes ---------------------------------------------------------------

def parse_stat(text: str) -> tuple:
    """``(ppid, cpu seconds, rss bytes)`` from the text of ``/proc/<pid>/stat``.

    CPU is utime + stime + cutime + cstime: a child that exits and is reaped
    during a measurement moves its time into its parent's cutime/cstime, so the
    sum over the live tree stays whole (Postfix and Dovecot end processes all
    the time).  The command name may hold spaces and parentheses: split after
    the last ``)``.
    """
    fields = text.rsplit(")", 1)[1].split()
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    return int(fields[1]), ticks / CLK_TCK, int(fields[21]) * PAGE


def all_stats() -> dict:
    """pid -> ``parse_stat`` of every process now alive."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = parse_stat(f.read())
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    return stats


def tree_pids(stats: dict, roots: Iterable[int]) -> list:
    """The roots that are alive and every process below them."""
    children = {}
    for pid, (ppid, _cpu, _rss) in stats.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = [], [r for r in roots if r in stats]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, ()))
    return seen


def tree_usage(roots: Iterable[int], stats: Optional[dict] = None) -> tuple:
    """``(cpu seconds, rss bytes, processes)`` summed over the trees under ``roots``."""
    stats = all_stats() if stats is None else stats
    pids = tree_pids(stats, roots)
    return (sum(stats[p][1] for p in pids), sum(stats[p][2] for p in pids), len(pids))


def pss_bytes(pid: int) -> Optional[int]:
    """The proportional set size of ``pid`` (``/proc/<pid>/smaps_rollup``):
    its private pages plus its share of every page it shares with other
    processes, so that a sum over processes counts each page once.  None
    when it cannot be read (gone, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def tree_memory(roots: Iterable[int], stats: Optional[dict] = None) -> int:
    """Memory of the trees under ``roots``: the sum of PSS, a process whose
    PSS cannot be read counting with its RSS.  Summing RSS would count the
    pages processes share (code, libraries, memory inherited from a fork)
    once per process; PSS shares them out."""
    stats = all_stats() if stats is None else stats
    total = 0
    for pid in tree_pids(stats, roots):
        pss = pss_bytes(pid)
        total += stats[pid][2] if pss is None else pss
    return total


class PeakSampler:
    """Samples the memory of the trees under ``roots`` (:func:`tree_memory`)
    every ``interval`` seconds on a thread, from ``start()`` to ``stop()``;
    ``peak`` in bytes."""

    def __init__(self, roots: Iterable[int], interval: float = 0.1) -> None:
        self.roots = list(roots)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> int:
        used = tree_memory(self.roots)
        self.peak = max(self.peak, used)
        return used

    def start(self) -> "PeakSampler":
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.peak


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit (children inherit it) towards
    ``wanted``, within the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# --- maildirs ----------------------------------------------------------------

def count_new(maildir: Path) -> int:
    """Files in ``maildir/new`` (0 while it does not exist)."""
    try:
        with os.scandir(maildir / "new") as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


def wait_for_files(maildir: Path, expected: int, deadline: float, driver=None,
                   interval: float = 0.01) -> tuple:
    """Poll until ``maildir/new`` holds ``expected`` files or ``deadline``
    (monotonic) passes.  Returns ``(count, when the driver ended)``: the
    ``driver`` process (anything with ``poll()``) is watched too, and the
    monotonic time it was first seen ended is the second item (None while it
    runs).  Stops early when the driver has failed (exit status not 0) and
    a second later nothing more has arrived."""
    ended = None
    n = count_new(maildir)
    while n < expected and time.monotonic() < deadline:
        status = driver.poll() if driver is not None else None
        if status is not None and ended is None:
            ended = time.monotonic()
        if status not in (None, 0):
            time.sleep(1.0)  # what was acknowledged may still be on its way
            return count_new(maildir), ended
        time.sleep(interval)
        n = count_new(maildir)
    return n, ended


# --- smtp-source -------------------------------------------------------------

SMTP_SOURCE_HOST = "bench-client.example.org"


def smtp_source_command(binary: str, port: int, *, messages: int, sessions: int, size: int,
                        sender: str, recipient: str, reuse: bool, lmtp: bool) -> list:
    """The ``smtp-source`` command line: ``-s`` parallel sessions, ``-m``
    messages in all, ``-l`` octets of body, ``-d`` keeps each connection for the
    next message (else one message per connection), ``-L`` speaks LMTP."""
    cmd = [binary, "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", SMTP_SOURCE_HOST, "-f", sender, "-t", recipient]
    if reuse:
        cmd.append("-d")
    if lmtp:
        cmd.append("-L")
    return cmd + [f"127.0.0.1:{port}"]


_PROBLEM = re.compile(r"^smtp-source: (warning|error|fatal): (.*)$")


def parse_smtp_source(output: str) -> dict:
    """What ``smtp-source`` said: its warning/error/fatal lines by kind.

    It prints nothing when all went well; a server's refusal shows as e.g.
    ``smtp-source: fatal: rcpt to: 550 5.1.1 ...``, a dropped connection as
    ``smtp-source: error: ...`` (without ``-c`` there is no counter)."""
    found = {"warning": [], "error": [], "fatal": []}
    for line in output.replace("\r", "\n").splitlines():
        m = _PROBLEM.match(line.strip())
        if m:
            found[m.group(1)].append(m.group(2))
    return found


def finish_smtp_source(proc: subprocess.Popen, timeout: float) -> tuple:
    """Wait for ``smtp-source``; ``(exit status, parse_smtp_source(output))``."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, parse_smtp_source(out.decode(errors="replace"))


# --- figures -----------------------------------------------------------------

def median(values: Iterable) -> Optional[float]:
    """Median of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    if ours is None or not theirs:
        return None
    return ours / theirs


def fmt(value, spec: str = ".0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


COLUMNS = ("what", "workload", "ours", "reference", "ratio", "target", "CPU ms/msg o/t",
           "peak MiB o/t")


def table_rows(results: list) -> list:
    """One row of text cells per result dict (see ``compare.summarise``)."""
    rows = []
    for r in results:
        unit = r.get("unit", "msg/s")
        spec = ".1f" if unit == "MiB" else ".0f"
        rows.append((
            r["what"], r["workload"],
            f"{fmt(r.get('ours'), spec)} {unit}",
            f"{r.get('reference_name', '')} {fmt(r.get('reference'), spec)}".strip(),
            fmt(r.get("ratio"), ".2f"),
            r.get("target", ""),
            f"{fmt(r.get('cpu_ours'), '.2f')} / {fmt(r.get('cpu_reference'), '.2f')}",
            f"{fmt(r.get('peak_ours'), '.0f')} / {fmt(r.get('peak_reference'), '.0f')}",
        ))
    return rows


def render_table(results: list) -> str:
    """A plain-text table, columns as wide as their widest cell."""
    rows = [COLUMNS] + table_rows(results)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
