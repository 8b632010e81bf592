"""The outbound client against real servers: our own twistd server and Postfix's smtp-sink.

The tests are trial TestCases (pytest runs them): each test returns a
coroutine that trial runs on the real reactor, which is never restarted.
The receiving servers are separate processes: the ``server`` fixture from
tests/conftest.py (STARTTLS with a trustme CA, SIZE 200000, LMTP over TCP and
a UNIX socket) and one ``smtp-sink`` per test, told by its options to refuse
commands.  smtp-sink comes with the Debian package ``postfix``; when it is
missing the tests are skipped, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from twisted.trial.unittest import TestCase

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.protocols.outbound import Timeouts, deliver_to_host
from mailserver.protocols.outbound_pool import OutboundConnectionPool
from tests.support.server import free_port, wait_for_port

pytestmark = pytest.mark.slow

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
TIMEOUTS = Timeouts(connect=10, greeting=20, command=20, mail=20, rcpt=20, data_init=20,
                    data_block=20, data_end=20, quit=10)


def reactor():
    from twisted.internet import reactor as global_reactor

    return global_reactor


class Mail:
    """Writes content files and builds OutboundMessages for one test."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.count = 0

    def __call__(self, *rcpts, subject="test", body=b"Hello.\r\n", **kwargs) -> OutboundMessage:
        self.count += 1
        data = (b"From: alice@example.org\r\nTo: someone\r\nSubject: " + subject.encode()
                + b"\r\n\r\n" + body)
        path = self.directory / f"msg{self.count}"
        path.write_bytes(data)
        recipients = tuple(r if isinstance(r, OutboundRecipient) else OutboundRecipient(r)
                           for r in rcpts)
        return OutboundMessage(queue_id=f"T{self.count}", sender=kwargs.pop("sender",
                               "alice@example.org"), recipients=recipients,
                               content_path=str(path), size=kwargs.pop("size", len(data)), **kwargs)


async def send(port, message, **kwargs):
    kwargs.setdefault("helo", "client.example.test")
    kwargs.setdefault("timeouts", TIMEOUTS)
    return await deliver_to_host(reactor(), "127.0.0.1", port, message, **kwargs)


# --- our own server --------------------------------------------------------------

class OwnServerTests(TestCase):
    """Delivery to a second instance of this project's server."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _fixtures(self, server, tls_files, tmp_path):
        self.server, self.tls, self.mail = server, tls_files, Mail(tmp_path)

    def stored(self, local, subject):
        import mailbox

        path = self.server.maildir(local)
        if not path.exists():
            return []
        box = mailbox.Maildir(str(path), factory=None, create=False)
        return [m for m in box if m["Subject"] == subject]

    async def test_may_uses_starttls(self):
        """tls="may": STARTTLS is used; the message arrives with a TLS Received line."""
        report, retry = await send(self.server.smtp_port,
                                   self.mail("alice@example.test", subject="may-tls"))
        assert report.replies["alice@example.test"].code == 250, report
        assert not retry and report.remote == "[127.0.0.1]:%d" % self.server.smtp_port
        (msg,) = self.stored("alice", "may-tls")
        assert "using TLS" in msg["Received"]

    async def test_verify_with_the_right_name(self):
        """tls="verify" against our CA and the certificate's name delivers."""
        report, _ = await send(self.server.smtp_port,
                               self.mail("alice@example.test", subject="verified"),
                               tls="verify", tls_hostname="mx.example.test",
                               trust_root=self.tls["ca"])
        assert report.replies["alice@example.test"].code == 250
        assert self.stored("alice", "verified")

    async def test_verify_with_a_wrong_name(self):
        """A certificate that does not match: 451 4.7.5, next host, nothing sent."""
        report, retry = await send(self.server.smtp_port,
                                   self.mail("alice@example.test", subject="wrong-name"),
                                   tls="verify", tls_hostname="other.example.test",
                                   trust_root=self.tls["ca"])
        assert report.replies["alice@example.test"] == R.REMOTE_TLS_FAILED and retry
        assert not self.stored("alice", "wrong-name")

    async def test_verify_against_platform_trust(self):
        """Our private CA is not in the platform's store: the check fails."""
        report, retry = await send(self.server.smtp_port,
                                   self.mail("alice@example.test", subject="platform"),
                                   tls="verify", tls_hostname="mx.example.test")
        assert report.replies["alice@example.test"] == R.REMOTE_TLS_FAILED and retry

    async def test_per_recipient_results(self):
        """Known users get 250, an unknown one the server's 550 5.1.1 with its text."""
        report, retry = await send(self.server.smtp_port, self.mail(
            "alice@example.test", "nobody@example.test", "bob@example.test", subject="multi"))
        codes = {r: (v.code, v.enhanced) for r, v in report.replies.items()}
        assert codes["alice@example.test"][0] == 250 and codes["bob@example.test"][0] == 250
        assert codes["nobody@example.test"] == (550, (5, 1, 1))
        assert report.details["nobody@example.test"].startswith("550 5.1.1")
        assert not retry
        assert self.stored("alice", "multi") and self.stored("bob", "multi")

    async def test_size_limit_refused_before_mail(self):
        """A message over the server's SIZE (200000) is refused 552 5.3.4 by us."""
        report, retry = await send(self.server.smtp_port,
                                   self.mail("alice@example.test",
                                             body=(b"x" * 70 + b"\r\n") * 4000, subject="big"))
        assert report.replies["alice@example.test"] == R.REMOTE_SIZE_EXCEEDED and not retry

    async def test_content_arrives_intact(self):
        """Leading dots, 8-bit bytes and a smuggling attempt arrive as they were."""
        body = (b".one dot\r\n..two dots\r\n.\r\ncaf\xc3\xa9\r\n"
                b"smuggle\n.\r\nMAIL FROM:<evil@example.net>\r\n")
        report, _ = await send(self.server.smtp_port, self.mail(
            "bob@example.test", subject="intact", body=body, eight_bit=True))
        assert report.replies["bob@example.test"].code == 250, report
        (msg,) = self.stored("bob", "intact")
        payload = msg.get_payload(decode=False)
        assert ".one dot\n..two dots\n.\ncaf" in payload
        assert "smuggle\n.\nMAIL FROM:<evil@example.net>" in payload

    async def test_lmtp_over_tcp(self):
        """LMTP: LHLO and one reply per recipient after the data."""
        report, _ = await send(self.server.lmtp_port, self.mail(
            "alice@example.test", "nobody@example.test", subject="lmtp-tcp"), lmtp=True)
        assert report.replies["alice@example.test"].code == 250
        assert report.replies["nobody@example.test"].code == 550
        assert self.stored("alice", "lmtp-tcp")

    async def test_lmtp_over_unix_socket(self):
        """LMTP over the server's UNIX socket."""
        message = self.mail("bob@example.test", subject="lmtp-unix")
        report, _ = await deliver_to_host(reactor(), None, None, message, helo="client.test",
                                          lmtp=True, unix_path=self.server.lmtp_socket,
                                          timeouts=TIMEOUTS)
        assert report.replies["bob@example.test"].code == 250
        assert report.remote == f"unix:{self.server.lmtp_socket}"
        assert self.stored("bob", "lmtp-unix")

    async def test_pool_reuses_one_connection(self):
        """Three messages through the pool use one connection (RSET between them)."""
        before = self.server.log().count("smtp: connect from")
        pool = OutboundConnectionPool(reactor(), idle_time=10, timeouts=TIMEOUTS)
        for n in range(3):
            report, _ = await pool.deliver_to_host(reactor(), "127.0.0.1", self.server.smtp_port,
                                                   self.mail("alice@example.test",
                                                             subject=f"pooled-{n}"),
                                                   helo="client.example.test")
            assert report.replies["alice@example.test"].code == 250
        assert pool.idle_count() == 1
        await pool.close()
        assert pool.idle_count() == 0
        assert all(self.stored("alice", f"pooled-{n}") for n in range(3))
        deadline = time.monotonic() + 5
        while self.server.log().count("smtp: connect from") == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.server.log().count("smtp: connect from") == before + 1

    async def test_host_name(self):
        """A host name goes through HostnameEndpoint; the report names host and address."""
        message = self.mail("alice@example.test", subject="by-name")
        report, _ = await deliver_to_host(reactor(), "localhost", self.server.smtp_port, message,
                                          helo="client.example.test", timeouts=TIMEOUTS)
        assert report.replies["alice@example.test"].code == 250, report
        assert report.remote == f"localhost[127.0.0.1]:{self.server.smtp_port}"

    async def test_nothing_listening(self):
        """A closed port: 451 4.4.1 for everyone and try the next host."""
        report, retry = await send(free_port(), self.mail("alice@example.test"))
        assert report.replies["alice@example.test"].enhanced == (4, 4, 1) and retry


# --- Postfix's smtp-sink -----------------------------------------------------------

class Sink:
    """One smtp-sink process that dumps each message into ``directory``."""

    def __init__(self, directory: Path, *options: str) -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, "-d", f"{directory}/msg.", *options, f"127.0.0.1:{self.port}",
             "10"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port, time.monotonic() + 10, self.proc)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def messages(self) -> list:
        """Each dump as (headers dict of lists, body text).

        smtp-sink opens a dump file at MAIL and removes it, a moment after its
        reply, when the transaction ends without data: empty files are skipped.
        """
        out = []
        for path in sorted(self.directory.glob("msg.*")):
            text = path.read_text(errors="replace")
            if not text:
                continue
            head, _, body = text.partition("\nReceived: ")
            fields: dict = {}
            for line in head.splitlines():
                name, _, value = line.partition(": ")
                fields.setdefault(name, []).append(value)
            out.append((fields, body.split("\n", 3)[-1]))
        return out


@pytest.fixture
def sinks(tmp_path):
    if not os.path.exists(SMTP_SINK):
        message = ("smtp-sink not found: install the Debian package 'postfix' "
                   "(see scripts/test.sh)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started = []

    def start(*options: str) -> Sink:
        sink = Sink(tmp_path / f"sink{len(started)}", *options)
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


class SmtpSinkTests(TestCase):
    """Delivery to Postfix's smtp-sink, told to fail commands with 4xx/5xx."""

    timeout = 60

    @pytest.fixture(autouse=True)
    def _fixtures(self, sinks, tmp_path):
        self.sink, self.mail = sinks, Mail(tmp_path)

    async def test_delivery_with_dsn_parameters(self):
        """DSN parameters go out (the sink offers DSN) and the content arrives."""
        sink = self.sink()
        rcpt = OutboundRecipient("bob@example.org", notify=("FAILURE", "DELAY"),
                                 orcpt="rfc822;bob@example.org")
        message = self.mail(rcpt, "carol@example.org", body=b".dot\r\nline\r\n",
                            envid="Q+2B1", ret="HDRS")
        report, retry = await send(sink.port, message)
        assert [r.code for r in report.replies.values()] == [250, 250] and not retry
        ((fields, body),) = sink.messages()
        assert fields["X-Mail-Args"] == ["<alice@example.org> RET=HDRS ENVID=Q+2B1"]
        assert fields["X-Rcpt-Args"] == ["<bob@example.org> NOTIFY=FAILURE,DELAY "
                                         "ORCPT=rfc822;bob@example.org", "<carol@example.org>"]
        assert ".dot\nline\n" in body

    async def test_no_dsn_parameters_without_dsn(self):
        """-N: the sink does not offer DSN, so no RET/ENVID/NOTIFY/ORCPT."""
        sink = self.sink("-N")
        rcpt = OutboundRecipient("bob@example.org", notify=("NEVER",), orcpt="rfc822;b@x")
        report, _ = await send(sink.port, self.mail(rcpt, envid="X", ret="FULL"))
        assert report.replies["bob@example.org"].code == 250
        ((fields, _),) = sink.messages()
        assert fields["X-Mail-Args"] == ["<alice@example.org>"]
        assert fields["X-Rcpt-Args"] == ["<bob@example.org>"]

    async def test_rcpt_soft_reject(self):
        """-r RCPT: 450 4.3.0 per recipient, no DATA, not the host's fault."""
        sink = self.sink("-r", "RCPT")
        report, retry = await send(sink.port, self.mail("bob@example.org", "carol@example.org"))
        for reply in report.replies.values():
            assert (reply.code, reply.enhanced) == (450, (4, 3, 0))
        assert report.details["bob@example.org"] == "450 4.3.0 Error: command failed"
        assert not retry and sink.messages() == []

    async def test_rcpt_hard_reject(self):
        """-f RCPT: the sink's 5xx for every recipient."""
        sink = self.sink("-f", "RCPT")
        report, retry = await send(sink.port, self.mail("bob@example.org"))
        reply = report.replies["bob@example.org"]
        assert (reply.code, reply.enhanced) == (500, (5, 3, 0)) and not retry

    async def test_end_of_data_rejected(self):
        """-f .: the final reply refuses every accepted recipient."""
        sink = self.sink("-f", ".")
        report, _ = await send(sink.port, self.mail("bob@example.org", "carol@example.org"))
        assert [r.code for r in report.replies.values()] == [500, 500]

    async def test_eight_bit_to_seven_bit_server(self):
        """-8: no 8BITMIME, so 8-bit content is refused 554 5.6.3 and never sent."""
        sink = self.sink("-8")
        report, retry = await send(sink.port, self.mail("bob@example.org",
                                                        body=b"caf\xc3\xa9\r\n", eight_bit=True))
        assert report.replies["bob@example.org"] == R.REMOTE_NO_8BITMIME and not retry
        assert sink.messages() == []

    async def test_helo_fallback(self):
        """-e: EHLO is unknown, HELO works, the mail goes through as SMTP."""
        sink = self.sink("-e")
        report, _ = await send(sink.port, self.mail("bob@example.org"))
        assert report.replies["bob@example.org"].code == 250
        ((fields, _),) = sink.messages()
        assert fields["X-Client-Proto"] == ["SMTP"]

    async def test_lock_step_without_pipelining(self):
        """-p: no PIPELINING, commands one at a time."""
        sink = self.sink("-p")
        report, _ = await send(sink.port, self.mail("bob@example.org", "carol@example.org"))
        assert [r.code for r in report.replies.values()] == [250, 250]
        assert len(sink.messages()) == 1

    async def test_greeting_refused(self):
        """-f CONNECT: a 5xx greeting is final for this host, but try the next one."""
        sink = self.sink("-f", "CONNECT")
        report, retry = await send(sink.port, self.mail("bob@example.org"))
        assert report.replies["bob@example.org"].code == 500 and retry

    async def test_421_at_mail(self):
        """-Q MAIL: 421 then a hang-up: temporary, try the next host."""
        sink = self.sink("-Q", "MAIL")
        report, retry = await send(sink.port, self.mail("bob@example.org"))
        assert report.replies["bob@example.org"].code == 421 and retry

    async def test_lmtp(self):
        """-L: LMTP with one reply per recipient."""
        sink = self.sink("-L")
        report, _ = await send(sink.port, self.mail("bob@example.org", "carol@example.org"),
                               lmtp=True)
        assert [(r.code, r.enhanced) for r in report.replies.values()] == [(250, (2, 2, 0))] * 2

    async def test_auth_needs_tls_unless_allowed(self):
        """AUTH is never sent in clear, unless allow_plaintext_auth says so."""
        sink = self.sink()
        report, retry = await send(sink.port, self.mail("bob@example.org"), auth=("u", "p"))
        assert report.replies["bob@example.org"] == R.REMOTE_AUTH_NEEDS_TLS and retry
        report, _ = await send(sink.port, self.mail("bob@example.org"), auth=("u", "p"),
                               allow_plaintext_auth=True)
        assert report.replies["bob@example.org"].code == 250

    async def test_encrypt_without_starttls(self):
        """tls="encrypt" and a server without STARTTLS: 451 4.7.4, nothing sent."""
        sink = self.sink()
        report, retry = await send(sink.port, self.mail("bob@example.org"), tls="encrypt")
        assert report.replies["bob@example.org"] == R.REMOTE_TLS_NOT_OFFERED and retry
        assert sink.messages() == []

    async def test_large_message(self):
        """A 3 MB message is streamed to the end."""
        sink = self.sink()
        body = b"".join(b"%07d ....................................................\r\n" % i
                        for i in range(50000))
        report, _ = await send(sink.port, self.mail("bob@example.org", body=body))
        assert report.replies["bob@example.org"].code == 250
        ((_, received),) = sink.messages()
        assert received.count("\n") >= 50000

    async def test_pool_to_the_sink(self):
        """The pool sends two messages over one connection to the sink."""
        sink = self.sink()
        pool = OutboundConnectionPool(reactor(), timeouts=TIMEOUTS)
        for n in range(2):
            report, _ = await pool.deliver_to_host(reactor(), "127.0.0.1", sink.port,
                                                   self.mail("bob@example.org"),
                                                   helo="client.example.test")
            assert report.replies["bob@example.org"].code == 250
        assert pool.idle_count() == 1
        await pool.close()
        assert len(sink.messages()) == 2
