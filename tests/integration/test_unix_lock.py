"""A UNIX-socket listener restarts after a crash and refuses a live rival (issue 13 item 10)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import embedded_directory
from tests.support.server import MailServer
from tests.unit.test_unixlock import HOLDER


def _lhlo(path) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        return s.recv(512)


def test_restart_right_after_sigkill(tmp_path):
    """After SIGKILL of a real server, the next start binds the UNIX socket at once."""
    server = MailServer(tmp_path / "srv", directory=embedded_directory()).start()
    try:
        assert _lhlo(server.lmtp_socket).startswith(b"220")
        server.kill()
        assert os.path.exists(server.lmtp_socket)  # left behind by the crash
        server.start()
        assert _lhlo(server.lmtp_socket).startswith(b"220")
    finally:
        server.stop()


def test_leftover_pid_lock_of_a_reused_pid_does_not_block(tmp_path):
    """A leftover socket and an old PID lock naming a live unrelated PID (1) do not block a start."""
    server = MailServer(tmp_path / "srv", directory=embedded_directory())
    s = socket.socket(socket.AF_UNIX)
    s.bind(server.lmtp_socket)
    s.close()
    os.symlink("1", server.lmtp_socket + ".lock")  # twisted's wantPID lock, after a reboot
    try:
        server.start()
        assert _lhlo(server.lmtp_socket).startswith(b"220")
    finally:
        server.stop()


def test_a_live_holder_stops_the_start_with_one_line(tmp_path):
    """While another process holds the socket's flock, the server refuses to start with one line."""
    server = MailServer(tmp_path / "srv", directory=embedded_directory())
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.lmtp_socket + ".lock"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        server.launch()
        assert server.proc.wait(30) == 1
        lines = [ln for ln in server.log().splitlines() if "cannot listen" in ln]
        assert lines == [f"mailserver: {server.config_path}: cannot listen on "
                         f"unix:{server.lmtp_socket}: already in use: process {holder.pid} "
                         f"holds {server.lmtp_socket}.lock (another server running on this "
                         "socket?)"], server.log()
    finally:
        server.stop()
        holder.stdin.close()
        holder.wait()
