"""The pure helpers of the side-by-side benchmark (benchmarks/harness.py).

The benchmark itself is never run by the suite (speed is measured, not
asserted); these check what it computes from /proc, from smtp-source's output
and for its table."""

import os
import time

from benchmarks.harness import (
    CLK_TCK, PAGE, count_new, median, parse_smtp_source, parse_stat, ratio, render_table,
    smtp_source_command, tree_pids, tree_usage, wait_for_files)


def stat_line(pid, comm, ppid, utime, stime, cutime, cstime, rss_pages):
    # fields after the command: state ppid pgrp session tty tpgid flags minflt
    # cminflt majflt cmajflt utime stime cutime cstime priority nice threads
    # itrealvalue starttime vsize rss ...
    rest = ["S", ppid, 1, 1, 0, -1, 4194560, 10, 0, 0, 0, utime, stime, cutime, cstime,
            20, 0, 1, 0, 100, 123456, rss_pages, 0]
    return f"{pid} ({comm}) " + " ".join(str(x) for x in rest)


def test_parse_stat_sums_own_and_reaped_children_cpu():
    ppid, cpu, rss = parse_stat(stat_line(42, "smtpd", 7, 100, 50, 30, 20, 256))
    assert ppid == 7
    assert cpu == (100 + 50 + 30 + 20) / CLK_TCK
    assert rss == 256 * PAGE


def test_parse_stat_command_with_spaces_and_parentheses():
    ppid, cpu, _ = parse_stat(stat_line(9, "tw) (istd x", 1, 1, 1, 0, 0, 1))
    assert ppid == 1
    assert cpu == 2 / CLK_TCK


def test_parse_stat_of_this_process():
    with open(f"/proc/{os.getpid()}/stat") as f:
        ppid, cpu, rss = parse_stat(f.read())
    assert ppid == os.getppid()
    assert cpu > 0 and rss > 0


STATS = {  # pid: (ppid, cpu seconds, rss bytes)
    1: (0, 100.0, 10),
    10: (1, 2.0, 100),  # a server's master
    11: (10, 1.0, 50),
    12: (11, 0.5, 25),  # a grandchild
    20: (1, 9.0, 1000),  # something else
}


def test_tree_pids_and_usage_cover_descendants_only():
    assert sorted(tree_pids(STATS, [10])) == [10, 11, 12]
    assert tree_usage([10], STATS) == (3.5, 175, 3)
    assert tree_usage([10, 20], STATS) == (12.5, 1175, 4)
    assert tree_usage([99], STATS) == (0, 0, 0)  # gone


def test_smtp_source_command():
    cmd = smtp_source_command("/usr/sbin/smtp-source", 2525, messages=3000, sessions=20,
                              size=4096, sender="a@example.org", recipient="b@example.test",
                              reuse=True, lmtp=True)
    assert cmd[0] == "/usr/sbin/smtp-source"
    assert cmd[-1] == "127.0.0.1:2525"
    flags = dict(zip(cmd[1:-1:1], cmd[2:-1]))
    assert flags["-s"] == "20" and flags["-m"] == "3000" and flags["-l"] == "4096"
    assert flags["-f"] == "a@example.org" and flags["-t"] == "b@example.test"
    assert "-d" in cmd and "-L" in cmd
    plain = smtp_source_command("smtp-source", 25, messages=1, sessions=1, size=1,
                                sender="a@x", recipient="b@y", reuse=False, lmtp=False)
    assert "-d" not in plain and "-L" not in plain


def test_parse_smtp_source_output():
    out = ("smtp-source: warning: 127.0.0.1:2525: slow\r"
           "smtp-source: fatal: rcpt to: 550 5.1.1 <b@example.test>: unknown\n"
           "smtp-source: error: lost connection\n"
           "something else\n")
    found = parse_smtp_source(out)
    assert found["fatal"] == ["rcpt to: 550 5.1.1 <b@example.test>: unknown"]
    assert found["error"] == ["lost connection"]
    assert found["warning"] == ["127.0.0.1:2525: slow"]
    assert parse_smtp_source("") == {"warning": [], "error": [], "fatal": []}


def test_median_and_ratio_skip_missing_figures():
    assert median([3, None, 1, 2]) == 2
    assert median([1, 2]) == 1.5
    assert median([None]) is None
    assert ratio(300, 150) == 2.0
    assert ratio(None, 1) is None and ratio(1, 0) is None and ratio(1, None) is None


def test_render_table_aligns_columns():
    text = render_table([
        {"what": "SMTP", "workload": "reused", "ours": 333.4, "reference": 651.0,
         "reference_name": "Postfix", "ratio": 0.512, "target": ">= 2", "cpu_ours": 3.14,
         "cpu_reference": 2.0, "peak_ours": 64.2, "peak_reference": 500.0},
        {"what": "idle", "workload": "2000 held", "unit": "MiB", "ours": 80.25,
         "reference": None, "reference_name": "Postfix", "ratio": None, "target": "<= 150",
         "cpu_ours": None, "cpu_reference": None, "peak_ours": None, "peak_reference": None},
    ])
    header, rule, first, second = text.splitlines()
    assert header.startswith("what") and set(rule) <= {"-", " "}
    assert "333 msg/s" in first and "Postfix 651" in first and "0.51" in first
    assert "3.14 / 2.00" in first and "64 / 500" in first
    assert "80.2 MiB" in second and "Postfix -" in second
    assert first.index("0.51") == header.index("ratio")


def test_count_new_and_wait_for_files(tmp_path):
    assert count_new(tmp_path / "missing") == 0
    (tmp_path / "new").mkdir()
    for i in range(3):
        (tmp_path / "new" / f"m{i}").write_bytes(b"x")
    assert count_new(tmp_path) == 3
    assert wait_for_files(tmp_path, 3, time.monotonic() + 5) == (3, None)
    # not there by the deadline: the count so far
    assert wait_for_files(tmp_path, 4, time.monotonic()) == (3, None)


class Ended:
    def __init__(self, status):
        self.status = status

    def poll(self):
        return self.status


def test_wait_for_files_notes_when_the_driver_ended(tmp_path):
    (tmp_path / "new").mkdir()
    before = time.monotonic()
    got, ended = wait_for_files(tmp_path, 1, time.monotonic() + 0.05, Ended(0))
    assert got == 0 and before <= ended <= time.monotonic()
    # a failed driver: give up without waiting for the deadline
    got, ended = wait_for_files(tmp_path, 1, time.monotonic() + 60, Ended(1))
    assert got == 0 and ended is not None
