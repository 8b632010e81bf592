"""Outbound TLS policy end to end: a recipient domain's "encrypt" holds on every
configured route, against a peer that offers STARTTLS and then refuses it."""

from __future__ import annotations

import smtplib
import socketserver
import threading

import pytest

from tests.conftest import embedded_directory
from tests.support.server import MailServer, free_port, wait_for

pytestmark = pytest.mark.slow


class RefusingPeer(socketserver.ThreadingTCPServer):
    """An SMTP server on 127.0.0.1 that offers STARTTLS, answers it with 454 and
    takes mail in clear; ``commands`` records what it was sent."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        self.commands = []
        super().__init__(("127.0.0.1", 0), _PeerSession)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _PeerSession(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(b"220 peer.test ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper()
            self.server.commands.append(verb.decode("ascii", "replace"))
            if verb == b"EHLO":
                self.wfile.write(b"250-peer.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
            elif verb == b"STARTTLS":
                self.wfile.write(b"454 4.7.0 TLS not available due to temporary reason\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                self.wfile.write(b"250 2.0.0 taken in clear\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


@pytest.mark.parametrize("how", ["transport", "smarthost"])
def test_domain_policy_is_not_stripped_by_a_configured_route(tmp_path, how):
    """bank.test's "encrypt" policy holds when its mail goes through the transport
    map or the smarthost: STARTTLS answered with 454 defers it, nothing in clear."""
    peer = RefusingPeer()
    port = free_port()
    hop = f"[127.0.0.1]:{peer.port}"
    relay = {"trusted_networks": ["127.0.0.0/8"], "tls_policies": {"bank.test": "encrypt"}}
    if how == "transport":
        relay["transports"] = {"bank.test": f"smtp:{hop}"}
    else:
        relay["smarthost"] = hop
    server = MailServer(tmp_path / "server", directory=embedded_directory(), smtp_port=port,
                        relay=relay, queue={"min_backoff": 3600.0, "scan_interval": 1.0})
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("someone@example.test", ["x@bank.test"],
                       b"Subject: secret\r\nMessage-ID: <tls@example.test>\r\n\r\nhi\r\n")
        line = wait_for(lambda: next((l for l in server.log().splitlines()
                                      if "to=<x@bank.test>" in l), None), "the delivery log line")
        assert "status=deferred" in line and "4.7.4" in line, line
        assert "STARTTLS" in peer.commands and "MAIL" not in peer.commands, peer.commands
    finally:
        server.stop()
        peer.stop()
