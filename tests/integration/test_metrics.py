"""The Prometheus endpoint of the real ``twistd -n mailserver`` process.

One server for the module with ``[metrics]`` on a loopback port, an MX
listener and a plaintext submission listener (loopback only, for a failed
login); the tests send real mail with smtplib, scrape ``/metrics`` with
urllib and read it with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import smtplib
import urllib.request

import pytest

from tests.conftest import embedded_directory
from tests.support.server import MailServer, free_port, wait_for

prometheus_parser = pytest.importorskip("prometheus_client.parser")


def scrape(port: int) -> dict:
    """{(sample name, frozenset(labels)): value} from the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    port, sub, pop, lmtp = free_port(), free_port(), free_port(), free_port()
    srv = MailServer(
        tmp_path_factory.mktemp("metrics"), directory=embedded_directory(), lmtp_unix=False,
        # Mail for other.test is relayed over LMTP to our own second LMTP
        # listener, which refuses it: a queue delivery with a known result.
        relay={"trusted_networks": ["127.0.0.1/32"],
               "transports": {"other.test": f"lmtp:127.0.0.1:{lmtp}"}},
        extra_tables={"metrics": {"address": f"127.0.0.1:{port}"},
                      "auth": {"failure_delay": 0.1, "max_failure_delay": 0.1},
                      "submission": {"messages_per_hour": 1}},
        extra_listeners=({"name": "submission", "protocol": "submission",
                          "address": f"127.0.0.1:{sub}", "tls": "none",
                          "plaintext_auth": True},
                         {"name": "pop3", "protocol": "pop3", "address": f"127.0.0.1:{pop}",
                          "tls": "none", "plaintext_auth": True},
                         {"name": "lmtp-relay", "protocol": "lmtp",
                          "address": f"127.0.0.1:{lmtp}"}))
    srv.metrics_port, srv.submission_port, srv.pop3_port = port, sub, pop
    srv.start()
    yield srv
    srv.stop()


def test_counts_mail_recipients_connections_and_lookups(metered):
    """One accepted message and one unknown recipient show up in the counters."""
    before = scrape(metered.metrics_port)
    with smtplib.SMTP("127.0.0.1", metered.smtp_port) as s:
        s.ehlo("client.example")
        s.mail("someone@example.org")
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.rcpt("nobody@example.test")[0] == 550
        s.data(b"Subject: metrics\r\n\r\nhello\r\n")
    samples = wait_for(lambda: (lambda m: m if value(
        m, "mailserver_connections_open", listener="smtp") == 0 else None)(
        scrape(metered.metrics_port)), "the connection to close")
    assert value(samples, "mailserver_messages_received_total",
                 listener="smtp", result="accepted") == 1
    assert value(samples, "mailserver_recipients_total", listener="smtp", reply="2xx") == 1
    assert value(samples, "mailserver_recipients_total", listener="smtp", reply="5xx") == 1
    assert (value(samples, "mailserver_connections_total", listener="smtp")
            - value(before, "mailserver_connections_total", listener="smtp")) == 1
    assert value(samples, "mailserver_deliveries_total", target="local", result="sent") == 1
    assert value(samples, "mailserver_delivery_delay_seconds_count", target="local") == 1
    assert value(samples, "mailserver_directory_lookups_total", kind="resolve",
                 result="ok") >= 2
    assert value(samples, "mailserver_directory_lookup_seconds_count", kind="resolve") >= 2
    for state in ("incoming", "active", "deferred", "hold", "corrupt"):
        assert ("mailserver_queue_messages", frozenset({("state", state)})) in samples


def test_counts_failed_logins_per_listener(metered):
    """A wrong password counts as an AUTH failure of the submission listener."""
    with smtplib.SMTP("127.0.0.1", metered.submission_port) as s:
        s.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.user, s.password = "alice", "not-her-password"
            s.auth("PLAIN", s.auth_plain)
    samples = scrape(metered.metrics_port)
    assert value(samples, "mailserver_auth_failures_total", listener="submission") == 1
    assert value(samples, "mailserver_directory_lookups_total", kind="authenticate",
                 result="ok") >= 1


def test_queue_depth_counts_the_spool(metered):
    """A message held in the queue shows in the queue gauge at the next scrape."""
    from mailserver.queue.spool import QueueSpool

    spool = QueueSpool(str(metered.queue_dir))
    held = spool.root + "/hold/0000TESTHELD"
    with open(held, "w") as f:
        f.write("{}")
    try:
        samples = scrape(metered.metrics_port)
        assert value(samples, "mailserver_queue_messages", state="hold") == 1
    finally:
        import os

        os.unlink(held)


def test_counts_rate_limit_hits(metered):
    """A login over its hourly message limit counts one rate-limit hit."""
    with smtplib.SMTP("127.0.0.1", metered.submission_port) as s:
        s.ehlo("client.example")
        s.login("bob", "bob-password")
        s.sendmail("bob@example.test", ["alice@example.test"], b"Subject: 1\r\n\r\none\r\n")
        assert s.mail("bob@example.test")[0] == 450
    samples = scrape(metered.metrics_port)
    assert value(samples, "mailserver_rate_limit_hits_total", listener="submission") == 1
    assert value(samples, "mailserver_messages_received_total", listener="submission",
                 result="accepted") == 1


def test_counts_pop3_connections_and_failed_logins(metered):
    """A POP3 session opens and closes a connection and counts its failed login."""
    import poplib

    before = scrape(metered.metrics_port)
    client = poplib.POP3("127.0.0.1", metered.pop3_port, timeout=10)
    client.user("alice")
    with pytest.raises(poplib.error_proto):
        client.pass_("not-her-password")
    client.quit()
    samples = wait_for(lambda: (lambda m: m if value(
        m, "mailserver_connections_open", listener="pop3") == 0 else None)(
        scrape(metered.metrics_port)), "the POP3 connection to close")
    assert value(samples, "mailserver_auth_failures_total", listener="pop3") == 1
    assert (value(samples, "mailserver_connections_total", listener="pop3")
            - value(before, "mailserver_connections_total", listener="pop3")) == 1


def test_counts_queue_deliveries_by_target_and_result(metered):
    """A relayed message refused by its LMTP next hop counts as an lmtp bounce."""
    with smtplib.SMTP("127.0.0.1", metered.smtp_port) as s:
        s.sendmail("", ["someone@other.test"], b"Subject: relay\r\n\r\nhi\r\n")
    samples = wait_for(lambda: (lambda m: m if value(
        m, "mailserver_deliveries_total", target="lmtp", result="bounced") else None)(
        scrape(metered.metrics_port)), "the LMTP attempt")
    assert value(samples, "mailserver_deliveries_total", target="lmtp", result="bounced") == 1
    assert value(samples, "mailserver_deliveries_total", target="lmtp", result="sent") == 0
