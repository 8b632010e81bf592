"""The zygote (mailserver.workers.zygote): a real process that forks a
stand-in worker (tests/support/fake_worker.py) per request, hands it its
channel and the listening sockets, and reports births and deaths."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mailserver.workers.zygote import parse

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 30


class Zygote:
    def __init__(self):
        self.control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        fd, lfd = theirs.fileno(), self.listener.fileno()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailserver.workers.zygote", "--control", str(fd),
             "--config", "/nonexistent.toml", "--listen", f"0={lfd}:2",
             "--worker-module", "tests.support.fake_worker"],
            pass_fds=(fd, lfd), env=env, cwd=str(REPO))
        theirs.close()
        self.control.settimeout(TIMEOUT)
        self.replies = self.control.makefile("rb")

    def fork(self, slot):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        socket.send_fds(self.control, [b"fork %d\n" % slot], [theirs.fileno()])
        theirs.close()
        ours.settimeout(TIMEOUT)
        return ours

    def reply(self):
        return self.replies.readline().decode().split()

    def close(self):
        self.replies.close()
        self.control.close()
        try:
            return self.proc.wait(TIMEOUT)
        finally:
            self.listener.close()


@pytest.fixture
def zygote():
    z = Zygote()
    yield z
    if z.proc.poll() is None:
        z.proc.kill()
        z.proc.wait()


def report(channel):
    return json.loads(channel.makefile("rb").readline())


def test_forks_a_worker_with_its_channel_and_the_listeners(zygote):
    """The child runs the worker with --channel, --config and --listen; the
    listening socket is inherited; the imports were made before the fork
    (frozen, out of the collector's reach), with no reactor installed;
    its exit code comes back in an ``ended`` line."""
    channel = zygote.fork(0)
    assert zygote.reply()[:2] == ["forked", "0"]
    got = report(channel)
    argv = got["argv"]
    assert argv[0] == "--channel" and argv[2:] == ["--config", "/nonexistent.toml",
                                                   "--listen", argv[-1]]
    assert got["listen_is_socket"] == [True]
    assert got["preloaded"] and got["frozen"] > 10000 and got["gc_enabled"]
    assert not got["reactor_installed"]
    channel.sendall(b"exit 3\n")
    assert zygote.reply() == ["ended", str(got["pid"]), "3", "0"]
    assert zygote.close() == 0


def test_each_worker_its_own_channel_and_a_kill_is_reported(zygote):
    a, b = zygote.fork(0), zygote.fork(1)
    forked = {zygote.reply()[1]: None, zygote.reply()[1]: None}
    assert set(forked) == {"0", "1"}
    pa, pb = report(a)["pid"], report(b)["pid"]
    assert pa != pb
    os.kill(pb, signal.SIGKILL)
    assert zygote.reply() == ["ended", str(pb), "-1", str(int(signal.SIGKILL))]
    a.sendall(b"exit 0\n")
    assert zygote.reply() == ["ended", str(pa), "0", "0"]


def test_a_request_it_cannot_use_is_answered_and_the_loop_goes_on(zygote):
    zygote.control.sendall(b"fork 7\nhello\n")  # no descriptor attached
    assert zygote.reply()[:2] == ["failed", "-"]
    assert zygote.reply()[:2] == ["failed", "-"]
    channel = zygote.fork(2)
    assert zygote.reply()[:2] == ["forked", "2"]
    report(channel)
    channel.sendall(b"exit 0\n")
    assert zygote.reply()[0] == "ended"


def test_exits_when_the_supervisor_goes(zygote):
    channel = zygote.fork(0)
    zygote.reply()
    report(channel)
    assert zygote.close() == 0
    channel.sendall(b"exit 0\n")  # the worker lives on by itself until told
    channel.close()


def test_parse_pairs_fork_lines_with_descriptors():
    reqs, rest, fds = parse(b"fork 0\nfork 1\nfork 2\npart", [10, 11])
    assert reqs == [("fork", 0, 10), ("fork", 1, 11), ("bad", "fork 2", -1)]
    assert rest == b"part" and fds == []
    reqs, rest, fds = parse(b"fork x\n", [12])
    assert reqs == [("bad", "fork x", -1)] and fds == [12]


def test_a_workers_channel_closes_when_it_dies_though_forked_in_one_batch(zygote):
    """Two requests read at once: the first child must not inherit the
    second's channel end, or the second's death would go unseen."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    socket.send_fds(zygote.control, [b"fork 0\nfork 1\n"], [p[1].fileno() for p in pairs])
    for ours, theirs in pairs:
        theirs.close()
        ours.settimeout(TIMEOUT)
    assert sorted(zygote.reply()[1] for _ in range(2)) == ["0", "1"]
    first, second = (report(p[0]) for p in pairs)
    os.kill(second["pid"], signal.SIGKILL)
    assert pairs[1][0].recv(100) == b""  # EOF: no copy left open in the first child
    pairs[0][0].sendall(b"exit 0\n")
    ended = {zygote.reply()[1] for _ in range(2)}
    assert ended == {str(first["pid"]), str(second["pid"])}
