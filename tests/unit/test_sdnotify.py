"""The systemd notify protocol over a real AF_UNIX datagram socket."""

from __future__ import annotations

import os
import socket

from mailserver import sdnotify


def _receiver(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    return s


def test_ready_reaches_a_path_socket(tmp_path):
    """READY=1 arrives as one datagram at the socket NOTIFY_SOCKET names."""
    path = str(tmp_path / "notify")
    with _receiver(path) as r:
        assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": path})
        assert r.recv(4096) == b"READY=1"


def test_abstract_namespace(tmp_path):
    """A NOTIFY_SOCKET starting with @ names a socket in the abstract namespace."""
    name = f"mailserver-test-{os.getpid()}-{tmp_path.name}"
    with _receiver("\0" + name) as r:
        assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert r.recv(4096) == b"STOPPING=1"


def test_without_systemd_nothing_happens():
    """Without NOTIFY_SOCKET, or with a dead one, notify returns False and raises nothing."""
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "relative"})


def test_reloading_carries_a_monotonic_timestamp():
    """The reload message has RELOADING=1 and MONOTONIC_USEC, as systemd 253 wants."""
    lines = sdnotify.reloading().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=") and int(lines[1].split("=")[1]) > 0
