"""write_now: straight to a plain TCP socket when nothing is queued before
the data, else (and for the rest of what the socket does not take) through
the transport's own buffer, in order."""

import socket

import pytest
from twisted.internet import tcp

from mailserver.protocols.wire import write_now


def Recorder(sock):
    """A real ``tcp.Server`` (made without its ``__init__``: no reactor, no
    protocol) over one end of a socket pair, whose ``write`` only records."""
    t = tcp.Server.__new__(tcp.Server)
    t.socket = sock
    t.connected = 1
    t.disconnecting = False
    t._writeDisconnected = False
    t.TLS = False
    t.dataBuffer = b""
    t._tempDataBuffer = []
    t._tempDataLen = 0
    t.written = []
    t.write = lambda data: t.written.append(bytes(data))
    return t


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def read_all(sock):
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def test_sent_at_once_when_nothing_is_queued(pair):
    a, b = pair
    t = Recorder(a)
    write_now(t, b"+OK 42 octets\r\n")
    assert read_all(b) == b"+OK 42 octets\r\n"
    assert t.written == []


def test_queued_data_keeps_its_place(pair):
    a, b = pair
    t = Recorder(a)
    t._tempDataBuffer, t._tempDataLen = [b"first\r\n"], 7
    write_now(t, b"second\r\n")
    assert read_all(b) == b""
    assert t.written == [b"second\r\n"]


def test_partly_buffered_data_keeps_its_place(pair):
    a, b = pair
    t = Recorder(a)
    t.dataBuffer = b"rest of an earlier reply"
    write_now(t, b"next\r\n")
    assert read_all(b) == b"" and t.written == [b"next\r\n"]


def test_what_the_socket_does_not_take_goes_to_the_transport(pair):
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    t = Recorder(a)
    data = bytes(range(256)) * 8192  # 2 MiB, far more than the buffers hold
    write_now(t, data)
    got = read_all(b)
    assert 0 < len(got) < len(data)
    assert got + b"".join(t.written) == data


def test_a_broken_socket_is_left_to_the_transport(pair):
    a, b = pair
    b.close()
    t = Recorder(a)
    write_now(t, b"250 OK\r\n")  # EPIPE: no exception here, the transport sees it
    assert t.written == [b"250 OK\r\n"]


@pytest.mark.parametrize("attr, value", [("TLS", True), ("disconnecting", True),
                                         ("connected", 0), ("_writeDisconnected", True)])
def test_not_a_plain_open_connection_uses_the_transport(pair, attr, value):
    a, b = pair
    t = Recorder(a)
    setattr(t, attr, value)
    write_now(t, b"+OK\r\n")
    assert read_all(b) == b"" and t.written == [b"+OK\r\n"]


def test_other_transports_use_write():
    class Other:
        def __init__(self):
            self.written = []

        def write(self, data):
            self.written.append(data)

    t = Other()
    write_now(t, b"+OK\r\n")
    assert t.written == [b"+OK\r\n"]
