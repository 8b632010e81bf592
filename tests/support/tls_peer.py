"""A small SMTP server on 127.0.0.1 with STARTTLS, for outbound TLS tests.

smtp-sink (tests/support/sink.py) has no STARTTLS; this one does, with the
certificate it is given (PEM files, e.g. from trustme).  It runs in threads
beside the test's reactor and records what it was told: ``sessions`` is a
list of command lists (one per connection, verbs upper-cased, ``TLS`` where
the handshake completed), ``lines`` every command line as sent, ``messages``
the message texts it took.  ``extensions`` are added to the EHLO reply once
TLS is active (``("REQUIRETLS",)``, say)::

    peer = TLSPeer(cert_file, key_file)
    ...   # deliver to 127.0.0.1:peer.port
    assert "DATA" not in peer.commands()
    peer.stop()
"""

from __future__ import annotations

import socketserver
import ssl
import threading
from typing import List


class TLSPeer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cert_file: str, key_file: str, name: str = "peer.test",
                 extensions: tuple = ()) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert_file, key_file)
        self.name = name
        self.extensions = tuple(extensions)
        self.lines: List[bytes] = []
        self.sessions: List[List[str]] = []
        self.messages: List[bytes] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Session)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def commands(self) -> List[str]:
        with self.lock:
            return [c for s in self.sessions for c in s]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Session(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: TLSPeer = self.server
        seen: List[str] = []
        with server.lock:
            server.sessions.append(seen)
        sock = self.request
        sock.settimeout(30)
        reader = sock.makefile("rb")
        send = sock.sendall
        send(f"220 {server.name} ESMTP\r\n".encode())
        tls = False
        while True:
            line = reader.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii", "replace")
            seen.append(verb)
            with server.lock:
                server.lines.append(line.rstrip(b"\r\n"))
            if verb == "EHLO":
                more = "250-STARTTLS\r\n" if not tls else "".join(
                    f"250-{e}\r\n" for e in server.extensions)
                send(f"250-{server.name}\r\n{more}250 8BITMIME\r\n".encode())
            elif verb == "STARTTLS" and not tls:
                send(b"220 2.0.0 go ahead\r\n")
                try:
                    sock = server.context.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError):
                    return
                seen.append("TLS")
                tls = True
                reader, send = sock.makefile("rb"), sock.sendall
            elif verb == "DATA":
                send(b"354 go on\r\n")
                lines = []
                while (data := reader.readline()) not in (b".\r\n", b""):
                    lines.append(data)
                with server.lock:
                    server.messages.append(b"".join(lines))
                send(b"250 2.0.0 taken\r\n")
            elif verb == "QUIT":
                send(b"221 2.0.0 bye\r\n")
                return
            else:
                send(b"250 2.0.0 ok\r\n")
