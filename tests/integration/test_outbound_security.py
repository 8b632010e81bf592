"""MTA-STS and DANE end to end, in process on the real reactor (trial TestCases).

A loopback DNS server (tests/support/dns.py) publishes the MX, the
``_mta-sts`` TXT record and TLSA records, answering with the AD bit where the
zone says "secure" (as a validating resolver would); a local HTTPS server with
a trustme certificate serves the MTA-STS policy (the fetcher's ``connect_to``
sends ``mta-sts.DOMAIN`` there, the certificate is still checked for that
name); the MX is a STARTTLS peer (tests/support/tls_peer.py) that records the
commands it gets.  The client is the real ``deliver_to_host``.
"""

from __future__ import annotations

import pytest
from twisted.internet import defer, ssl
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailserver.delivery.dane import DANELookup, SecureDNS, association
from mailserver.delivery.interfaces import OutboundMessage, OutboundRecipient
from mailserver.delivery.mtasts import MTASTS, HTTPSPolicyFetcher, PolicyCache
from mailserver.delivery.remote import RemoteDelivery
from mailserver.delivery.tlsplan import OutboundSecurity
from mailserver.protocols.outbound import Timeouts, deliver_to_host
from tests.support.dns import DNSServer
from tests.support.tls_peer import TLSPeer

trustme = pytest.importorskip("trustme")
pytestmark = pytest.mark.slow

TIMEOUTS = Timeouts(connect=5, greeting=10, command=10, mail=10, rcpt=10, data_init=10,
                    data_block=10, data_end=10, quit=5)


def reactor():
    from twisted.internet import reactor as global_reactor

    return global_reactor


def tlsa_for(pem: bytes) -> str:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    return "3 1 1 " + association(cert, 1, 1).hex()


class OutboundSecurityTests(TestCase):
    def setUp(self):
        import shutil
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="outtls-")  # not trial's mktemp: that is in the cwd
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.ca = trustme.CA()
        mx_cert = self.ca.issue_cert("mx.sts.test", "mx.dane.test")
        self.mx_pem = f"{self.tmp}/mx.pem"
        mx_cert.private_key_and_cert_chain_pem.write_to_path(self.mx_pem)
        self.peer = TLSPeer(self.mx_pem, self.mx_pem, name="mx.test")
        self.addCleanup(self.peer.stop)
        self.trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(
            self.ca.cert_pem.bytes())])
        self.policy = b"version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n"
        self.https_port = self._https()
        wrong = trustme.CA().issue_cert("mx.dane.test").cert_chain_pems[0].bytes()
        zones = {
            "sts.test": {"@": {"MX": [[10, "mx"]]}, "mx": {"A": "127.0.0.1"},
                         "_mta-sts": {"TXT": "v=STSv1; id=one"}},
            "other.test": {"@": {"MX": [[10, "mx.sts.test"]]},
                           "_mta-sts": {"TXT": "v=STSv1; id=one"}},
            "dane.test": {"secure": True, "@": {"MX": [[10, "mx"]]}, "mx": {"A": "127.0.0.1"},
                          f"_{self.peer.port}._tcp.mx.dane.test": {"TLSA": tlsa_for(wrong)}},
            "good.test": {"secure": True, "@": {"MX": [[10, "mx.dane.test"]]}},
            # signed MX and TLSA, but the MX host's address answer is not authenticated
            "half.test": {"@": {"MX": [[10, "mx"]], "secure": True}, "mx": {"A": "127.0.0.1"},
                          f"_{self.peer.port}._tcp.mx.half.test": {"TLSA": tlsa_for(wrong),
                                                                    "secure": True}},
        }
        self.dns = DNSServer(zones).start()
        self.addCleanup(self.dns.stop)
        self.logged = []
        observer = lambda e: self.logged.append(formatEvent(e) or "")  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def _https(self) -> int:
        from twisted.web import resource, server

        root = resource.Resource()
        well_known = resource.Resource()
        root.putChild(b".well-known", well_known)
        self.served = _Policy(self.policy)
        well_known.putChild(b"mta-sts.txt", self.served)
        cert = self.ca.issue_cert("mta-sts.sts.test", "mta-sts.other.test")
        options = ssl.PrivateCertificate.loadPEM(
            cert.private_key_and_cert_chain_pem.bytes()).options()
        site = server.Site(root)
        listening = reactor().listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        return listening.getHost().port

    def remote(self, *, mta_sts=False, dane=False, mx_trust=None) -> RemoteDelivery:
        from twisted.names import client

        resolver = client.Resolver(servers=[self.dns.address], reactor=reactor(),
                                   timeout=(2,))
        sts = None
        if mta_sts:
            fetch = HTTPSPolicyFetcher(reactor(), trust_root=self.trust, timeout=5,
                                       connect_to={
                                           "mta-sts.sts.test": ("127.0.0.1", self.https_port),
                                           "mta-sts.other.test": ("127.0.0.1", self.https_port)})
            sts = MTASTS(resolver, fetch, PolicyCache(f"{self.tmp}/mta-sts.json",
                                                      reactor().seconds), reactor().seconds)
        lookup = DANELookup(SecureDNS([self.dns.address], reactor(), timeout=2)) if dane else None

        def connect(*args, **kwargs):
            return deliver_to_host(*args, timeouts=TIMEOUTS, **kwargs)

        return RemoteDelivery(resolver, connect, helo="us.test", reactor=reactor(),
                              port=self.peer.port, families=("ipv4",),
                              security=OutboundSecurity(sts, lookup, mx_trust or self.trust))

    def message(self, rcpt: str, header: bytes = b"") -> OutboundMessage:
        path = f"{self.tmp}/msg"
        with open(path, "wb") as f:
            f.write(b"Subject: secure\r\nMessage-ID: <s@us.test>\r\n" + header
                    + b"\r\nhello\r\n")
        return OutboundMessage("Q1", "alice@us.test", (OutboundRecipient(rcpt),), path, 40)

    async def send(self, remote, rcpt, header: bytes = b""):
        report = await remote.deliver(self.message(rcpt, header))
        return report.replies[rcpt]

    def test_enforce_matching_mx_verified_is_delivered(self):
        async def run():
            reply = await self.send(self.remote(mta_sts=True), "bob@sts.test")
            self.assertEqual(reply.code, 250, str(reply))
            self.assertIn("TLS", self.peer.commands())
            self.assertEqual(len(self.peer.messages), 1)
            self.assertIn("MTA-STS: sts.test policy id one: mode enforce", "\n".join(self.logged))
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_enforce_mx_not_in_policy_is_deferred_unsent(self):
        async def run():
            # other.test's MX is mx.sts.test; the policy served lists mx.sts.test
            # only for sts.test's own name: change it to one that does not match
            self.served.data = self.policy.replace(b"mx.sts.test", b"*.elsewhere.test")
            reply = await self.send(self.remote(mta_sts=True), "bob@other.test")
            self.assertEqual((reply.code, reply.enhanced), (451, (4, 7, 5)), str(reply))
            self.assertEqual(self.peer.sessions, [])  # never even connected
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_testing_mode_delivers_and_logs(self):
        async def run():
            self.served.data = self.policy.replace(b"enforce", b"testing").replace(
                b"mx.sts.test", b"*.elsewhere.test")
            reply = await self.send(self.remote(mta_sts=True), "bob@other.test")
            self.assertEqual(reply.code, 250, str(reply))
            self.assertIn("MTA-STS (testing): MX host mx.sts.test does not match",
                          "\n".join(self.logged))
            self.assertNotIn("enforce mode would not deliver", "\n".join(self.logged))
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_testing_mode_logs_a_certificate_enforce_would_refuse(self):
        async def run():
            self.served.data = self.policy.replace(b"enforce", b"testing")
            untrusted = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(
                trustme.CA().cert_pem.bytes())])
            reply = await self.send(self.remote(mta_sts=True, mx_trust=untrusted),
                                    "bob@sts.test")
            self.assertEqual(reply.code, 250, str(reply))
            self.assertIn("TLS", self.peer.commands())
            self.assertEqual(len(self.peer.messages), 1)
            logged = "\n".join(self.logged)
            self.assertIn("Q1: MTA-STS (testing): mx.sts.test", logged)
            self.assertIn("certificate not trusted", logged)
            self.assertIn("enforce mode would not deliver there; delivering anyway", logged)
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_fetch_needs_a_trusted_certificate_and_a_plain_small_200(self):
        from mailserver.delivery.mtasts import FetchError

        def fetcher(trust, **kw):
            return HTTPSPolicyFetcher(reactor(), trust_root=trust, timeout=5, connect_to={
                "mta-sts.sts.test": ("127.0.0.1", self.https_port),
                "mta-sts.nope.test": ("127.0.0.1", self.https_port)}, **kw)

        async def run():
            self.assertEqual(await fetcher(self.trust)("sts.test"), self.policy.decode())
            other = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(
                trustme.CA().cert_pem.bytes())])
            with self.assertRaises(FetchError):  # a CA we do not trust
                await fetcher(other)("sts.test")
            with self.assertRaises(FetchError):  # the certificate names another host
                await fetcher(self.trust)("nope.test")
            with self.assertRaisesRegex(FetchError, "larger than 16"):
                await fetcher(self.trust, max_size=16)("sts.test")
            self.served.status, self.served.ctype = 404, b"text/plain"
            with self.assertRaisesRegex(FetchError, "HTTP 404"):
                await fetcher(self.trust)("sts.test")
            self.served.status, self.served.ctype = 200, b"text/html"
            with self.assertRaisesRegex(FetchError, "not text/plain"):
                await fetcher(self.trust)("sts.test")
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_tlsa_mx_with_the_wrong_certificate_is_deferred_never_sent(self):
        async def run():
            reply = await self.send(self.remote(dane=True), "bob@dane.test")
            self.assertEqual((reply.code, reply.enhanced), (451, (4, 7, 5)), str(reply))
            self.assertIn("DANE", reply.text)
            commands = self.peer.commands()
            self.assertIn("STARTTLS", commands)  # the handshake ran; then we hung up
            for verb in ("MAIL", "RCPT", "DATA"):
                self.assertNotIn(verb, commands)
            self.assertEqual(self.peer.messages, [])
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_tlsa_of_a_host_with_an_insecure_address_is_not_used(self):
        async def run():
            reply = await self.send(self.remote(dane=True), "bob@half.test")
            self.assertEqual(reply.code, 250, str(reply))  # "may": the wrong TLSA ignored
            self.assertEqual(len(self.peer.messages), 1)
            self.assertIn("DANE: the address of mx.half.test is not DNSSEC-authenticated",
                          "\n".join(self.logged))
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_tls_required_no_ignores_dane_and_mta_sts(self):
        """RFC 8689 §4: TLS-Required: No; the wrong TLSA and a policy that
        excludes the MX are both ignored, and TLS is still used where offered."""
        async def run():
            self.served.data = self.policy.replace(b"mx.sts.test", b"*.elsewhere.test")
            remote = self.remote(mta_sts=True, dane=True)
            for rcpt in ("bob@dane.test", "bob@other.test"):
                reply = await self.send(remote, rcpt, b"TLS-Required: No\r\n")
                self.assertEqual(reply.code, 250, str(reply))
            self.assertEqual(len(self.peer.messages), 2)
            self.assertIn("Q1: TLS-Required: No: MTA-STS and DANE not applied",
                          "\n".join(self.logged))
            self.assertIn("TLS", self.peer.commands())
            await _sleep(0.05)
        return defer.ensureDeferred(run())

    def test_tlsa_matching_certificate_is_delivered(self):
        async def run():
            zones = dict(self.dns.zones)
            zones["dane.test"] = dict(zones["dane.test"])
            zones["dane.test"][f"_{self.peer.port}._tcp.mx.dane.test"] = {
                "TLSA": tlsa_for(open(self.mx_pem, "rb").read())}
            self.dns.update(zones)
            reply = await self.send(self.remote(dane=True), "bob@good.test")
            self.assertEqual(reply.code, 250, str(reply))
            self.assertEqual(len(self.peer.messages), 1)
            await _sleep(0.05)
        return defer.ensureDeferred(run())


class TruncatedOverUDPTests(TestCase):
    """SecureDNS asks again over TCP when the UDP answer is truncated."""

    def test_truncated_answer_is_fetched_over_tcp(self):
        import struct

        from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
        from twisted.names import dns

        from tests.support.dns import Record_TLSA

        record = bytes((3, 1, 1)) + b"\x07" * 32

        def answer(query: bytes, truncated: bool) -> bytes:
            q = dns._EDNSMessage()
            q.fromStr(query)
            m = dns._EDNSMessage(id=q.id, answer=True, recDes=True, recAv=True,
                                 authenticData=not truncated, trunc=truncated,
                                 queries=q.queries)
            if not truncated:
                name = q.queries[0].name.name
                m.answers = [dns.RRHeader(name, 52, dns.IN, 60, Record_TLSA(record))]
            return m.toStr()

        class UDP(DatagramProtocol):
            def datagramReceived(self, data, addr):
                self.transport.write(answer(data, True), addr)

        class TCP(Protocol):
            def dataReceived(self, data):
                (size,) = struct.unpack("!H", data[:2])
                reply = answer(data[2:2 + size], False)
                self.transport.write(struct.pack("!H", len(reply)) + reply)

        udp = reactor().listenUDP(0, UDP(), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        port = udp.getHost().port
        tcp = reactor().listenTCP(port, Factory.forProtocol(TCP), interface="127.0.0.1")
        self.addCleanup(tcp.stopListening)

        async def run():
            found = await SecureDNS([("127.0.0.1", port)], reactor(), timeout=5).query(
                "_25._tcp.mx.big.test", 52)
            self.assertTrue(found.secure)
            self.assertEqual([r.data for r in found.records], [record])
            await _sleep(0.05)
        return defer.ensureDeferred(run())


class _Policy:
    """The policy file resource: ``data`` served as text/plain."""

    isLeaf = True

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.status = 200
        self.ctype = b"text/plain"

    def render(self, request) -> bytes:
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.ctype)
        return self.data

    def getChildWithDefault(self, name, request):
        return self

    def putEntity(self, *a):  # pragma: no cover - IResource completeness
        raise NotImplementedError


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor(), seconds, lambda: None)


def test_twistd_defers_a_tlsa_mismatch_and_sends_nothing(tmp_path):
    """The real server with ``[relay] dane = true``: mail for a domain whose MX
    publishes (secure) TLSA records that the MX's certificate does not match
    is deferred with 4.7.5; the MX sees STARTTLS and nothing of the message."""
    import smtplib

    from tests.conftest import embedded_directory
    from tests.support.server import MailServer, wait_for

    ca = trustme.CA()
    pem = tmp_path / "mx.pem"
    ca.issue_cert("mx.dane.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    peer = TLSPeer(str(pem), str(pem), name="mx.dane.test")
    wrong = trustme.CA().issue_cert("mx.dane.test").cert_chain_pems[0].bytes()
    zones = {"dane.test": {"secure": True, "@": {"MX": [[10, "mx"]]},
                           "mx": {"A": "127.0.0.1"},
                           f"_{peer.port}._tcp.mx.dane.test": {"TLSA": tlsa_for(wrong)}}}
    (tmp_path / "dns").mkdir()
    dns = DNSServer(zones, directory=str(tmp_path / "dns"))
    server = None
    try:
        dns.start()
        server = MailServer(
            tmp_path / "sender", directory=embedded_directory(), domains=("sender.test",),
            relay={"trusted_networks": ["127.0.0.0/8"], "nameservers": [dns.nameserver],
                   "dane": True, "transports": {"dane.test": f"smtp:dane.test:{peer.port}"}},
            queue={"min_backoff": 3600.0, "scan_interval": 1.0})
        server.start()
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            s.sendmail("someone@sender.test", ["bob@dane.test"],
                       b"Subject: dane\r\nMessage-ID: <dane@sender.test>\r\n\r\nsecret\r\n")
        line = wait_for(lambda: next((l for l in server.log().splitlines()
                                      if "to=<bob@dane.test>" in l and "status=" in l), None),
                        "the delivery attempt")
        assert "status=deferred" in line and "4.7.5" in line and "DANE" in line, line
        assert "STARTTLS" in peer.commands()
        assert not {"MAIL", "RCPT", "DATA"} & set(peer.commands()) and peer.messages == []
    finally:
        if server is not None:
            server.stop()
        dns.stop()
        peer.stop()


def test_twistd_requiretls_in_and_out(tmp_path, tls_files, client_tls):
    """REQUIRETLS through the real server: offered only after STARTTLS; the
    message goes on, with the parameter, to a verified next hop offering it,
    and bounces with 5.7.30 where the next hop does not offer it."""
    import email
    import email.policy
    import smtplib

    from tests.conftest import embedded_directory
    from tests.support.server import MailServer, wait_for

    offering = TLSPeer(tls_files["certificate"], tls_files["private_key"],
                       extensions=("REQUIRETLS",))
    plain = TLSPeer(tls_files["certificate"], tls_files["private_key"])
    server = MailServer(
        tmp_path / "server", directory=embedded_directory(),
        tls={"certificate": tls_files["certificate"], "private_key": tls_files["private_key"]},
        smtp={"requiretls": True},
        relay={"trusted_networks": ["127.0.0.0/8"], "tls_ca_file": tls_files["ca"],
               "tls_policies": {"near.test": "verify", "far.test": "verify"},
               "transports": {"near.test": f"smtp:[127.0.0.1]:{offering.port}",
                              "far.test": f"smtp:[127.0.0.1]:{plain.port}"}},
        queue={"min_backoff": 3600.0, "scan_interval": 1.0})
    try:
        server.start()
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            s.ehlo("client.test")
            assert not s.has_extn("requiretls")
            s.starttls(context=client_tls)
            s.ehlo("client.test")
            assert s.has_extn("requiretls")
            s.sendmail("alice@example.test", ["carol@near.test", "dave@far.test"],
                       b"Subject: rtls\r\nMessage-ID: <rtls@example.test>\r\n\r\nsecret\r\n",
                       mail_options=["REQUIRETLS"])
        wait_for(lambda: offering.messages, "delivery to the next hop offering REQUIRETLS")
        mail = [l for l in offering.lines if l.upper().startswith(b"MAIL FROM")]
        assert mail and mail[0].endswith(b" REQUIRETLS"), mail

        def bounce():
            for path in server.messages("alice"):
                msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                if msg.get_content_type() == "multipart/report":
                    return msg
            return None

        report = wait_for(bounce, "the REQUIRETLS bounce").as_string()
        assert "dave@far.test" in report and "5.7.30" in report
        assert not {"MAIL", "DATA"} & set(plain.commands())
    finally:
        server.stop()
        offering.stop()
        plain.stop()
