"""The outbound adapter (mailserver.protocols.outbound) on in-memory transports.

Connections are made through a MemoryReactorClock and completed by hand with
a StringTransport, so every byte and every timeout is under the test's
control; one test connects the client to our real SMTP server protocol with
twisted.test.iosim.
"""

from __future__ import annotations

import mailbox

import pytest
from twisted.internet import ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim

from mailserver import reply as R
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.delivery.local import LocalDelivery
from mailserver.policy import RecipientPolicy
from mailserver.sansio.smtp_server import Limits, Mode
from mailserver.protocols import outbound
from mailserver.protocols.outbound import (
    Destination,
    HostAttempt,
    Timeouts,
    deliver_to_host,
    tls_options,
)
from mailserver.protocols.outbound_pool import OutboundConnectionPool
from mailserver.protocols.limits import ConnectionLimiter
from mailserver.protocols.smtp import ListenerContext, SMTPFactory
from mailserver.delivery.recipients import RecipientDelivery
from mailserver.pipeline.acceptance import Acceptance
from mailserver.incoming import prepare_spool
from mailserver.store.maildir import MaildirStore
from mailserver.testing import FakeDirectory, ImmediateReactor, SynchronousThreadPool

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO = (b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n"
        b"250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
EHLO_TLS = EHLO.replace(b"250 ENHANCED", b"250-STARTTLS\r\n250 ENHANCED")
ACCEPT = b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"


@pytest.fixture
def content(tmp_path):
    def make(data: bytes = b"Subject: hi\r\n\r\n.dot\r\nbody\r\n") -> OutboundMessage:
        path = tmp_path / "content"
        path.write_bytes(data)
        return OutboundMessage(queue_id="Q1", sender="alice@example.test",
                               recipients=(OutboundRecipient("bob@example.org"),),
                               content_path=str(path), size=len(data))
    return make


class TLSStringTransport(StringTransport):
    """A StringTransport that records startTLS."""

    tls = None

    def startTLS(self, options, normal=True):
        self.tls = options


class Link:
    """Completes the reactor's pending TCP (or UNIX) connection by hand."""

    def __init__(self, reactor: MemoryReactorClock, unix: bool = False) -> None:
        if unix:
            path, factory, _timeout, _check = reactor.unixClients.pop(0)
            addr = None
        else:
            host, port, factory, _timeout, _bind = reactor.tcpClients.pop(0)
            addr = IPv4Address("TCP", host, port)
        self.factory = factory
        self.wrapper = factory.buildProtocol(addr)
        self.transport = TLSStringTransport(peerAddress=addr)
        self.wrapper.makeConnection(self.transport)
        self.proto = self.wrapper._wrappedProtocol

    def server(self, data: bytes) -> bytes:
        """The server sends ``data``; return what the client wrote back."""
        self.wrapper.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def stream(self) -> bytes:
        """Let the content producer run to the end."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        return self.take()

    def lost(self, reason=ConnectionDone) -> None:
        self.wrapper.connectionLost(Failure(reason()))


def start(reactor, message, host="192.0.2.1", **kwargs) -> Deferred:
    kwargs.setdefault("helo", "client.example.test")
    return Deferred.fromCoroutine(deliver_to_host(reactor, host, 25, message, **kwargs))


def deliver_ok(link: Link) -> bytes:
    """Greeting to end of data, all accepted; returns the DATA text sent."""
    assert link.server(GREETING) == b"EHLO client.example.test\r\n"
    assert link.server(EHLO).startswith(b"MAIL FROM:<alice@example.test> SIZE=")
    link.server(ACCEPT)
    return link.stream()


def finish(link: Link) -> None:
    """Final 250, QUIT, 221, close."""
    assert link.server(b"250 2.0.0 queued\r\n") == b"QUIT\r\n"
    link.server(b"221 2.0.0 bye\r\n")
    assert link.transport.disconnecting
    link.lost()


def result(d: Deferred) -> HostAttempt:
    assert d.called, "deliver_to_host has not finished"
    box = []
    d.addBoth(box.append)
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


class DeliveryTests:
    def test_delivery_and_quit(self, content):
        """A whole transaction: content dot-stuffed, 250 for the recipient, QUIT."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        assert deliver_ok(link) == b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n"
        assert not d.called
        finish(link)
        report, retry = result(d)
        assert report.replies == {"bob@example.org": R.Reply(250, (2, 0, 0), "queued")}
        assert report.remote == "[192.0.2.1]:25" and not retry
        assert not reactor.getDelayedCalls()

    def test_remote_names_the_mx(self, content):
        """With tls_hostname the report names the MX host and its address."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), tls_hostname="mx.example.org")
        link = Link(reactor)
        deliver_ok(link)
        finish(link)
        assert result(d).report.remote == "mx.example.org[192.0.2.1]:25"

    def test_large_content_streamed_in_chunks(self, content):
        """The content goes out one chunk per resumeProducing, never whole."""
        data = b"".join(b"line %06d .x\r\n" % i for i in range(20000))  # ~300 KB
        reactor = MemoryReactorClock()
        d = start(reactor, content(data))
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO)
        link.server(ACCEPT)
        producer = link.transport.producer
        assert producer is not None and not link.transport.streaming
        sent = []
        while link.transport.producer is not None:
            producer.resumeProducing()
            sent.append(link.take())
        assert len(sent) > 4 and max(map(len, sent[:-1])) <= outbound.CHUNK_SIZE + 100
        assert b"".join(sent).endswith(b"\r\n.\r\n")
        finish(link)
        assert result(d).report.replies["bob@example.org"].code == 250

    def test_connection_refused(self, content):
        """A refused connection: 451 4.4.1 for everyone, try the next host."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        iosim.ConnectionCompleter(reactor).failOnce(Failure(ConnectionRefusedError()))
        report, retry = result(d)
        reply = report.replies["bob@example.org"]
        assert (reply.code, reply.enhanced) == (451, (4, 4, 1)) and retry
        assert "Cannot connect to [192.0.2.1]:25" in reply.text

    def test_connect_timeout(self, content):
        """No connection within the connect timeout: 4.4.1, next host."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), timeouts=Timeouts(connect=10))
        reactor.advance(10)
        report, retry = result(d)
        assert report.replies["bob@example.org"].enhanced == (4, 4, 1) and retry
        assert "Timed out connecting" in report.replies["bob@example.org"].text

    def test_lost_mid_transaction(self, content):
        """The server hangs up after RCPT: 4.4.2, next host."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO)
        link.server(b"250 ok\r\n")
        link.lost(ConnectionLost)
        report, retry = result(d)
        assert report.replies["bob@example.org"].enhanced == (4, 4, 2) and retry

    def test_unreadable_content(self, content, tmp_path):
        """A content file that cannot be opened: 451 4.3.0, not the host's fault."""
        reactor = MemoryReactorClock()
        msg = content()
        (tmp_path / "content").unlink()
        d = start(reactor, msg)
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO)
        link.server(ACCEPT)
        assert link.transport.disconnecting and b".\r\n" not in link.take()
        link.lost()
        report, retry = result(d)
        assert report.replies["bob@example.org"] == R.CONTENT_UNREADABLE and not retry

    def test_unix_socket_for_lmtp(self, content):
        """unix_path connects with a UNIX endpoint and speaks LHLO."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), host=None, unix_path="/run/lmtp", lmtp=True)
        link = Link(reactor, unix=True)
        assert link.server(GREETING) == b"LHLO client.example.test\r\n"
        link.server(EHLO)
        link.server(ACCEPT)
        link.stream()
        assert link.server(b"250 2.0.0 delivered\r\n") == b"QUIT\r\n"
        link.server(b"221 bye\r\n")
        link.lost()
        report, _ = result(d)
        assert report.remote == "unix:/run/lmtp" and report.replies["bob@example.org"].code == 250

    def test_endpoints(self):
        """Names use HostnameEndpoint, IPv6 literals TCP6, sockets UNIX."""
        reactor, t = MemoryReactorClock(), Timeouts()
        assert isinstance(outbound._endpoint(reactor, Destination("mx.example.org", 25, "h"), t),
                          HostnameEndpoint)
        assert isinstance(outbound._endpoint(reactor, Destination("[2001:db8::1]", 25, "h"), t),
                          TCP6ClientEndpoint)
        assert isinstance(outbound._endpoint(reactor, Destination(None, None, "h",
                                                                  unix_path="/s"), t),
                          UNIXClientEndpoint)

    def test_bad_policy_refused(self, content):
        """An unknown TLS policy is a ValueError, not a delivery attempt."""
        with pytest.raises(ValueError):
            Destination("mx", 25, "h", tls="sometimes")

    def test_unsendable_addresses_refused_without_connecting(self, content):
        """Nothing sendable (here the sender): 553 for everyone at once, no
        connection, and no reason to try another host."""
        reactor = MemoryReactorClock()
        msg = content()
        msg = OutboundMessage(queue_id="Q1", sender="alice smith@example.test",
                              recipients=msg.recipients, content_path=msg.content_path,
                              size=msg.size)
        report, retry = result(start(reactor, msg))
        assert {a: (r.code, r.enhanced) for a, r in report.replies.items()} == {
            "bob@example.org": (553, (5, 1, 7))}
        assert not retry and not reactor.tcpClients

    def test_quoted_local_part_with_a_space_is_sent(self, content):
        """A quoted local part with a space goes out as it is."""
        reactor = MemoryReactorClock()
        msg = content()
        msg = OutboundMessage(queue_id="Q1", sender='"alice smith"@example.test',
                              recipients=(OutboundRecipient('"john doe"@example.org'),),
                              content_path=msg.content_path, size=msg.size)
        d = start(reactor, msg)
        link = Link(reactor)
        link.server(GREETING)
        assert link.server(EHLO) == (b'MAIL FROM:<"alice smith"@example.test> SIZE=%d\r\n'
                                     b'RCPT TO:<"john doe"@example.org>\r\nDATA\r\n'
                                     % msg.size)
        link.server(ACCEPT)
        link.stream()
        finish(link)
        assert result(d).report.replies['"john doe"@example.org'].code == 250

    def test_report_details_keep_remote_text(self, content):
        """A refused recipient's remote reply goes into the report's details."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO)
        out = link.server(b"250 ok\r\n550 5.1.1 <bob@example.org>: no such user\r\n"
                          b"554 5.5.1 no rcpt\r\n")
        assert out == b"QUIT\r\n"  # no DATA content, straight to QUIT
        link.server(b"221 bye\r\n")
        link.lost()
        report, retry = result(d)
        assert report.details == {"bob@example.org": "550 5.1.1 <bob@example.org>: no such user"}
        assert not retry


class TimeoutTests:
    @pytest.mark.parametrize("steps,phase_seconds,retry", [
        ([], 300, True),  # greeting
        ([GREETING], 300, True),  # EHLO
        ([GREETING, EHLO], 300, True),  # MAIL
        ([GREETING, EHLO, b"250 ok\r\n"], 300, True),  # RCPT
        ([GREETING, EHLO, b"250 ok\r\n250 ok\r\n"], 120, True),  # DATA
    ])
    def test_command_timeouts(self, content, steps, phase_seconds, retry):
        """Each wait has its RFC 5321 timeout; at expiry: 4.4.2 and a hang-up."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        for data in steps:
            link.server(data)
        reactor.advance(phase_seconds - 1)
        assert not link.transport.disconnecting
        reactor.advance(1)
        assert link.transport.disconnecting
        link.lost()
        report, got_retry = result(d)
        reply = report.replies["bob@example.org"]
        assert (reply.code, reply.enhanced) == (451, (4, 4, 2)) and got_retry is retry
        assert "Timed out waiting for" in reply.text

    def test_data_block_timeout(self, content):
        """A server that stops reading the content times out after 3 minutes."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO)
        link.server(ACCEPT)
        assert link.transport.producer is not None  # waiting for the buffer to drain
        reactor.advance(179)
        assert not link.transport.disconnecting
        reactor.advance(1)
        assert link.transport.disconnecting
        link.lost()
        assert "take the message" in result(d).report.replies["bob@example.org"].text

    def test_final_dot_timeout_does_not_retry_elsewhere(self, content):
        """After the final dot, 10 minutes; the mail may have arrived, so no next host."""
        reactor = MemoryReactorClock()
        d = start(reactor, content())
        link = Link(reactor)
        deliver_ok(link)
        reactor.advance(599)
        assert not link.transport.disconnecting
        reactor.advance(1)
        link.lost()
        report, retry = result(d)
        assert report.replies["bob@example.org"].code == 451 and not retry

    def test_configurable(self, content):
        """Timeouts are configurable."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), timeouts=Timeouts(greeting=5))
        link = Link(reactor)
        reactor.advance(5)
        assert link.transport.disconnecting
        link.lost()
        assert result(d).retry_elsewhere


class TLSTests:
    def test_may_starts_tls_and_discards_injected_replies(self, content):
        """STARTTLS when offered; replies sent with the 220 are never believed."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), tls="may")
        link = Link(reactor)
        link.server(GREETING)
        assert link.server(EHLO_TLS) == b"STARTTLS\r\n"
        assert link.server(b"220 2.0.0 ready\r\n250 2.0.0 fake\r\n") == b""
        assert isinstance(link.transport.tls, ssl.CertificateOptions)
        link.proto.handshakeCompleted()
        assert link.take() == b"EHLO client.example.test\r\n"
        assert link.server(EHLO).startswith(b"MAIL FROM:")
        link.server(ACCEPT)
        link.stream()
        finish(link)
        assert result(d).report.replies["bob@example.org"].code == 250

    def test_none_never_starts_tls(self, content):
        """tls="none" ignores STARTTLS."""
        reactor = MemoryReactorClock()
        start(reactor, content(), tls="none")
        link = Link(reactor)
        link.server(GREETING)
        assert link.server(EHLO_TLS).startswith(b"MAIL FROM:")

    def test_encrypt_requires_starttls(self, content):
        """tls="encrypt" and no STARTTLS: 451 4.7.4, nothing sent in clear."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), tls="encrypt")
        link = Link(reactor)
        link.server(GREETING)
        assert link.server(EHLO) == b"QUIT\r\n"
        link.lost()
        report, retry = result(d)
        assert report.replies["bob@example.org"] == R.REMOTE_TLS_NOT_OFFERED and retry

    def test_encrypt_handshake_failure(self, content):
        """A failed handshake under "encrypt": 451 4.7.5, next host, no retry in clear."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), tls="encrypt")
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO_TLS)
        link.server(b"220 go\r\n")
        link.lost(ConnectionLost)
        report, retry = result(d)
        assert report.replies["bob@example.org"] == R.REMOTE_TLS_FAILED and retry
        assert not reactor.tcpClients

    def test_may_falls_back_to_plaintext_after_failed_handshake(self, content):
        """Under "may" a failed handshake is retried once without TLS (Postfix-like)."""
        reactor = MemoryReactorClock()
        d = start(reactor, content(), tls="may")
        link = Link(reactor)
        link.server(GREETING)
        link.server(EHLO_TLS)
        link.server(b"220 go\r\n")
        link.lost(ConnectionLost)
        assert not d.called
        second = Link(reactor)
        second.server(GREETING)
        assert second.server(EHLO_TLS).startswith(b"MAIL FROM:")
        second.server(ACCEPT)
        second.stream()
        finish(second)
        assert result(d).report.replies["bob@example.org"].code == 250

    def test_verify_options(self, tmp_path):
        """verify: optionsForClientTLS for the MX name; a CA file is read."""
        trustme = pytest.importorskip("trustme")
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
        options = tls_options(Destination("192.0.2.1", 25, "h", tls="verify",
                                          tls_hostname="mx.example.org",
                                          trust_root=str(tmp_path / "ca.pem")))
        assert not isinstance(options, ssl.CertificateOptions)
        assert options._hostnameASCII == "mx.example.org"
        assert tls_options(Destination("mx", 25, "h", tls="none")) is None


class PoolTests:
    def deliver(self, pool, reactor, message) -> Deferred:
        return Deferred.fromCoroutine(pool.deliver_to_host(
            reactor, "192.0.2.1", 25, message, helo="client.example.test"))

    def one_idle(self, content):
        """A pool holding one idle connection, after one delivered message."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor)
        d = self.deliver(pool, reactor, content())
        link = Link(reactor)
        deliver_ok(link)
        link.server(b"250 ok\r\n")
        result(d)
        return reactor, pool, link

    def test_reuse_with_rset(self, content):
        """A second message to the same destination reuses the connection after RSET."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor, idle_time=5)
        d1 = self.deliver(pool, reactor, content())
        link = Link(reactor)
        deliver_ok(link)
        assert link.server(b"250 2.0.0 one\r\n") == b""
        assert result(d1).report.replies["bob@example.org"].text == "one"
        assert pool.idle_count() == 1
        d2 = self.deliver(pool, reactor, content())
        assert link.take() == b"RSET\r\n" and not reactor.tcpClients
        assert link.server(b"250 2.0.0 reset\r\n").startswith(b"MAIL FROM:")
        link.server(ACCEPT)
        link.stream()
        link.server(b"250 2.0.0 two\r\n")
        assert result(d2).report.replies["bob@example.org"].text == "two"
        reactor.advance(5)
        assert link.take() == b"QUIT\r\n"
        link.server(b"221 bye\r\n")
        link.lost()
        assert pool.idle_count() == 0

    def test_idle_connections_are_capped(self, content):
        """Past max_idle, the connection idle longest is closed to make room."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor, idle_time=5, max_idle=1)
        links = []
        for host in ("192.0.2.1", "192.0.2.2"):
            d = Deferred.fromCoroutine(pool.deliver_to_host(
                reactor, host, 25, content(), helo="client.example.test"))
            link = Link(reactor)
            deliver_ok(link)
            link.server(b"250 2.0.0 queued\r\n")
            result(d)
            links.append(link)
            reactor.advance(1)
        assert links[0].take() == b"QUIT\r\n"
        assert links[1].take() == b""
        assert pool.idle_count() == 1

    def test_failed_rset_opens_a_new_connection(self, content):
        """RSET refused: the message goes over a fresh connection."""
        reactor, pool, link = self.one_idle(content)
        d2 = self.deliver(pool, reactor, content())
        link.take()
        assert link.server(b"421 4.4.2 idle too long\r\n") == b""
        link.lost()
        fresh = Link(reactor)
        deliver_ok(fresh)
        fresh.server(b"250 2.0.0 fresh\r\n")
        assert result(d2).report.replies["bob@example.org"].text == "fresh"

    def test_idle_connection_closed_by_server(self, content):
        """An idle connection the server closes is not reused."""
        reactor, pool, link = self.one_idle(content)
        link.lost()
        self.deliver(pool, reactor, content())
        assert len(reactor.tcpClients) == 1

    def test_close_quits_idle_connections(self, content):
        """close() sends QUIT on every idle connection and waits for the close."""
        reactor, pool, link = self.one_idle(content)
        closed = Deferred.fromCoroutine(pool.close())
        assert link.take() == b"QUIT\r\n" and not closed.called
        link.server(b"221 bye\r\n")
        link.lost()
        assert closed.called and not reactor.getDelayedCalls()

    def test_unsendable_message_leaves_idle_connections_alone(self, content):
        """A message with nothing sendable takes no idle connection (no RSET)."""
        reactor, pool, link = self.one_idle(content)
        msg = content()
        msg = OutboundMessage(queue_id="Q2", sender=msg.sender,
                              recipients=(OutboundRecipient("bob@example.org>\r\nRSET"),),
                              content_path=msg.content_path, size=msg.size)
        report, retry = result(self.deliver(pool, reactor, msg))
        assert report.replies["bob@example.org>\r\nRSET"].code == 553 and not retry
        assert link.take() == b"" and pool.idle_count() == 1 and not reactor.tcpClients

    def test_delivery_in_flight_at_close_quits_instead_of_parking(self, content):
        """A delivery that ends after close() sends QUIT on its connection rather
        than parking it, and close() waits for that connection to close."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor)
        d = self.deliver(pool, reactor, content())
        link = Link(reactor)
        deliver_ok(link)
        closed = Deferred.fromCoroutine(pool.close())
        assert not closed.called
        assert link.server(b"250 2.0.0 queued\r\n") == b"QUIT\r\n"
        assert result(d).report.replies["bob@example.org"].code == 250
        assert pool.idle_count() == 0 and not closed.called
        link.server(b"221 bye\r\n")
        link.lost()
        assert closed.called and not reactor.getDelayedCalls()

    def test_close_waits_for_deliveries_in_flight_only_so_long(self, content):
        """A delivery still running after the grace period does not hold up close()."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor)
        self.deliver(pool, reactor, content())
        link = Link(reactor)
        link.server(GREETING)
        closed = Deferred.fromCoroutine(pool.close(grace=10))
        reactor.advance(9)
        assert not closed.called
        reactor.advance(1)
        assert closed.called

    def test_not_reused_after_failure(self, content):
        """A connection that ended in an error is closed, not parked."""
        reactor = MemoryReactorClock()
        pool = OutboundConnectionPool(reactor)
        d = self.deliver(pool, reactor, content())
        link = Link(reactor)
        link.server(b"554 5.7.1 go away\r\n")
        link.lost()
        assert result(d).retry_elsewhere and pool.idle_count() == 0


# --- against our own server protocol, in memory -------------------------------


def test_delivery_to_our_server_protocol(tmp_path, content):
    """iosim: the client delivers to our real SMTP server protocol, into a maildir."""
    reactor = MemoryReactorClock()
    spool = tmp_path / "spool"
    prepare_spool(str(spool))
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
    local = LocalDelivery(store, SynchronousThreadPool(), ImmediateReactor())
    pipeline = Acceptance(
        kind="smtp", hostname="mx.example.test",
        recipients=RecipientPolicy(FakeDirectory({"bob@example.test": ("bob@example.test",)}),
                                   ["example.test"]),
        local=local, delivery=RecipientDelivery(local, clock=reactor), spool_dir=str(spool),
        clock=reactor)
    ctx = ListenerContext(
        mode=Mode.MX, hostname="mx.example.test", limits=Limits(), pipeline=pipeline,
        clock=reactor, limiter=ConnectionLimiter(10, 10))
    reactor.listenTCP(25, SMTPFactory(ctx))
    msg = content(b"Subject: via iosim\r\n\r\n.leading dot\r\n")
    msg = OutboundMessage(queue_id="Q2", sender="alice@example.org",
                          recipients=(OutboundRecipient("bob@example.test"),
                                      OutboundRecipient("nobody@example.test")),
                          content_path=msg.content_path, size=msg.size)
    d = Deferred.fromCoroutine(deliver_to_host(reactor, "127.0.0.1", 25, msg, helo="client.test"))
    pump = iosim.ConnectionCompleter(reactor).succeedOnce()
    for _ in range(50):
        pump.flush()
        if d.called:
            break
    report, retry = result(d)
    assert report.replies["bob@example.test"].code == 250
    assert report.replies["nobody@example.test"] == R.RCPT_UNKNOWN
    assert not retry
    box = mailbox.Maildir(str(tmp_path / "mail" / "example.test" / "bob"), factory=None,
                          create=False)
    (stored,) = list(box)
    assert stored["Subject"] == "via iosim"
    assert stored.get_payload() == ".leading dot\n"
