"""Loop detection end to end: an MX under another name that resolves to our own
address and listener port is us, found before any connection is made."""

from __future__ import annotations

import smtplib

import pytest

from tests.conftest import embedded_directory
from tests.support.dns import DNSServer
from tests.support.server import MailServer, free_port, wait_for

pytestmark = pytest.mark.slow



def test_mx_that_is_our_own_listener_is_a_loop(tmp_path):
    """loop.test's MX is other.loop.test, 127.0.0.1, and the transport sends its
    mail to our own port: deferred as a loop (4.4.6: a configured next hop),
    never relayed back to ourselves."""
    (tmp_path / "dns").mkdir()
    dns = DNSServer({"loop.test": {"@": {"MX": [[10, "other"]]}, "other": {"A": "127.0.0.1"}}},
                    directory=str(tmp_path / "dns")).start()
    port = free_port()
    server = MailServer(
        tmp_path / "server", directory=embedded_directory(), smtp_port=port,
        relay={"trusted_networks": ["127.0.0.0/8"], "nameservers": [dns.nameserver],
               "transports": {"loop.test": f"smtp:loop.test:{port}"}},
        queue={"min_backoff": 3600.0, "scan_interval": 1.0})
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("someone@example.test", ["x@loop.test"],
                       b"Subject: loop\r\nMessage-ID: <loop@example.test>\r\n\r\nhi\r\n")
        line = wait_for(lambda: next((l for l in server.log().splitlines()
                                      if "to=<x@loop.test>" in l), None), "the delivery log line")
        assert "status=deferred" in line and "4.4.6" in line and "loops back" in line, line
        assert "relay=other.loop.test" not in server.log()
    finally:
        server.stop()
        dns.stop()


@pytest.mark.parametrize("how", ["transport", "smarthost"])
def test_configured_next_hop_that_is_our_own_listener_is_a_loop(tmp_path, how):
    """A transport or smarthost next hop given as our own address and port is
    deferred as a loop (4.4.6) and logged, never relayed back to ourselves."""
    port = free_port()
    hop = f"[127.0.0.1]:{port}"
    relay = {"trusted_networks": ["127.0.0.0/8"]}
    if how == "transport":
        relay["transports"] = {"loop.test": f"smtp:{hop}"}
    else:
        relay["smarthost"] = hop
    server = MailServer(tmp_path / "server", directory=embedded_directory(), smtp_port=port,
                        relay=relay, queue={"min_backoff": 3600.0, "scan_interval": 1.0})
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("someone@example.test", ["x@loop.test"],
                       b"Subject: loop\r\nMessage-ID: <loop2@example.test>\r\n\r\nhi\r\n")
        line = wait_for(lambda: next((l for l in server.log().splitlines()
                                      if "to=<x@loop.test>" in l), None), "the delivery log line")
        assert "status=deferred" in line and "4.4.6" in line and "loops back" in line, line
        assert "is this server (mail loop)" in server.log()
    finally:
        server.stop()
