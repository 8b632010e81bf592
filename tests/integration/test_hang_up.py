"""Closing connections against the real twistd process: clients that never read."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import embedded_directory
from tests.support.server import MailServer

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    srv = MailServer(tmp_path / "server", directory=embedded_directory(),
                     # The floods are NOOPs and the slots are polled twice a second:
                     # neither the junk command limit nor the connection rate limit
                     # is what these tests are about.
                     smtp={"command_timeout": 1.0, "junk_command_limit": 0,
                           "connection_rate_limit": 0},
                     server={"max_connections_per_client": 2}).start()
    yield srv
    srv.stop()


def flood_without_reading(port: int) -> socket.socket:
    """Connect, then pipeline NOOPs until the server stops reading because
    its replies cannot be sent; never read a byte."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(2.0)
    chunk = b"NOOP\r\n" * 10000
    try:
        while True:
            sock.sendall(chunk)
    except socket.timeout:
        pass  # both socket buffers are full: the server has stopped reading
    return sock


def greeting(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.recv(512)


def test_client_that_never_reads_loses_its_slot(server):
    """A client whose replies fill the buffers is cut off after the timeout's 421 and a grace
    period, so its connection slots come back."""
    socks = [flood_without_reading(server.smtp_port) for _ in range(2)]
    try:
        assert greeting(server.smtp_port).startswith(b"421 4.7.0")  # both slots taken
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if greeting(server.smtp_port).startswith(b"220 "):
                break
            time.sleep(0.5)
        else:
            raise AssertionError("the slots were never released:\n" + server.log())
        assert "did not read the closing reply" in server.log()
    finally:
        for s in socks:
            s.close()
