"""The flock that guards a UNIX-socket listener (issue 13 item 10)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from twisted.internet.error import CannotListenError

from mailserver import unixlock

HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture(autouse=True)
def _release():
    yield
    unixlock.release_all()


def test_a_live_holder_refuses_with_one_clear_line(tmp_path):
    """A process holding the flock makes acquire fail with one line naming it and the lock."""
    sock = str(tmp_path / "lmtp.sock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, sock + ".lock"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(CannotListenError) as e:
            unixlock.acquire(sock)
        text = str(e.value.socketError)
        assert "\n" not in text
        assert f"process {holder.pid} holds {sock}.lock" in text
    finally:
        holder.stdin.close()
        holder.wait()
    unixlock.acquire(sock)  # the holder is gone: its lock went with it


@pytest.mark.parametrize("pid", [b"1\n", b"999999999\n", b"garbage", b""])
def test_leftover_socket_and_lock_file_do_not_block(tmp_path, pid):
    """A leftover socket and a lock file naming a dead or reused PID do not block; the socket goes."""
    sock = tmp_path / "lmtp.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    s.close()
    (tmp_path / "lmtp.sock.lock").write_bytes(pid)
    unixlock.acquire(str(sock))
    assert not sock.exists()
    assert (tmp_path / "lmtp.sock.lock").read_text() == f"{os.getpid()}\n"


def test_twisted_pid_symlink_is_replaced_not_followed(tmp_path):
    """Twisted's old PID symlink (here naming the live PID 1) is replaced by a file, never followed."""
    sock = tmp_path / "lmtp.sock"
    target = tmp_path / "elsewhere"
    os.symlink("1", tmp_path / "lmtp.sock.lock")
    os.symlink(target, tmp_path / "other.sock.lock")
    unixlock.acquire(str(sock))
    unixlock.acquire(str(tmp_path / "other.sock"))
    assert not (tmp_path / "lmtp.sock.lock").is_symlink()
    assert not target.exists()


def test_a_regular_file_in_the_socket_place_is_left_alone(tmp_path):
    """Only a socket file is removed: a regular file at the socket path is not ours to delete."""
    sock = tmp_path / "lmtp.sock"
    sock.write_text("data")
    unixlock.acquire(str(sock))
    assert sock.read_text() == "data"


def test_lock_descriptor_is_close_on_exec(tmp_path):
    """The lock is not inherited by children the server runs."""
    fd = unixlock.acquire(str(tmp_path / "x.sock"))
    assert not os.get_inheritable(fd)
    assert unixlock.acquire(str(tmp_path / "x.sock")) == fd  # idempotent in one process
