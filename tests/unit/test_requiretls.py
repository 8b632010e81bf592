"""REQUIRETLS (RFC 8689): offered and accepted only on TLS sessions, kept in the
queue envelope, and sent on only over verified TLS to a server that offers it."""

from __future__ import annotations

from twisted.internet import defer

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport
from mailserver.delivery.remote import Hop, TLSPolicy, attempt_delivery
from mailserver.queue.envelope import Envelope
from mailserver.sansio.smtp_events import MailFrom
from mailserver.sansio.smtp_server import Mode
from tests.unit.test_queue_spool import envelope
from tests.unit.test_smtp_client import Session, ehlo, message
from tests.unit.test_smtp_server import MAIL, new, run


def ehlo_lines(conn) -> str:
    _events, out = run(conn, b"EHLO client.example\r\n")
    return out.decode()


def test_offered_only_over_tls():
    assert "REQUIRETLS" not in ehlo_lines(new(requiretls=True))
    assert "REQUIRETLS" in ehlo_lines(new(requiretls=True, tls_active=True))
    assert "REQUIRETLS" not in ehlo_lines(new(tls_active=True))  # not configured
    assert "REQUIRETLS" not in ehlo_lines(new(Mode.LMTP, requiretls=True, tls_active=True))


def test_mail_parameter():
    conn = new(requiretls=True, tls_active=True)
    run(conn, b"EHLO client.example\r\n")
    events, out = run(conn, MAIL.replace(b"\r\n", b" REQUIRETLS\r\n"))
    mail = [e for e in events if isinstance(e, MailFrom)][0]
    assert "REQUIRETLS" in mail.params and out.startswith(b"250")
    run(conn, b"RSET\r\n")
    _events, out = run(conn, MAIL.replace(b"\r\n", b" REQUIRETLS=YES\r\n"))
    assert out.startswith(b"501 5.5.4")


def test_mail_parameter_refused_without_tls():
    conn = new(requiretls=True)
    run(conn, b"EHLO client.example\r\n")
    _events, out = run(conn, MAIL.replace(b"\r\n", b" REQUIRETLS\r\n"))
    assert out.startswith(b"555 5.5.4")


def test_envelope_keeps_it():
    env = envelope(id="Q1", requiretls=True)
    again = Envelope.from_json(env.to_json())
    assert again.requiretls and again.outbound("/x").requiretls
    plain = envelope(id="Q2")
    assert b"requiretls" not in plain.to_json()  # older readers are not surprised
    assert Envelope.from_json(plain.to_json()).requiretls is False


def test_client_sends_the_parameter_or_refuses():
    s = Session(message(requiretls=True))
    out = s.greet(ehlo("ENHANCEDSTATUSCODES", "REQUIRETLS"))
    assert out.startswith(b"MAIL FROM:<alice@example.test> REQUIRETLS")
    s = Session(message(requiretls=True))
    s.greet(ehlo("ENHANCEDSTATUSCODES"))
    result = s.result
    reply = result.replies["bob@example.org"]
    assert (reply.code, reply.enhanced) == (550, (5, 7, 30)) and result.retry_elsewhere


def test_only_verified_hops_are_tried():
    tried = []

    def connect(reactor, host, port, msg, **kw):
        tried.append((host, kw["tls"]))
        return DeliveryReport({r.address: R.OK for r in msg.recipients}, remote=host), False

    hops = [Hop("mx1.example.org", "192.0.2.1", 25, "mx1.example.org"),
            Hop("mx2.example.org", "192.0.2.2", 25, "mx2.example.org",
                tls=TLSPolicy("verify"))]
    msg = message(requiretls=True)
    report = defer.ensureDeferred(attempt_delivery(
        connect, object(), msg, hops, helo="us.test", tls=TLSPolicy("may"))).result
    assert report.replies["bob@example.org"].code == 250
    assert tried == [("192.0.2.2", "verify")]
    tried.clear()
    report = defer.ensureDeferred(attempt_delivery(
        connect, object(), msg, hops[:1], helo="us.test", tls=TLSPolicy("encrypt"))).result
    reply = report.replies["bob@example.org"]
    assert (reply.code, reply.enhanced) == (550, (5, 7, 30)) and tried == []


def test_tls_required_no_header(tmp_path):
    """RFC 8689 §4: ``TLS-Required: No`` in the header; REQUIRETLS in the envelope wins."""
    from dataclasses import replace

    from mailserver.delivery.remote import tls_required_no

    def check(content: bytes, **kw) -> bool:
        path = tmp_path / "msg"
        path.write_bytes(content)
        return tls_required_no(replace(message(**kw), content_path=str(path)))

    assert check(b"Subject: x\r\nTLS-Required: No\r\n\r\nbody\r\n")
    assert check(b"tls-required:no\r\nSubject: x\r\n\r\n")
    assert check(b"TLS-Required:\r\n  NO \r\nSubject: x\r\n\r\n")  # folded
    assert not check(b"TLS-Required: No\r\n\r\n", requiretls=True)  # REQUIRETLS wins
    assert not check(b"TLS-Required: Yes\r\n\r\n")
    assert not check(b"TLS-Required: No thanks\r\n\r\n")
    assert not check(b"Subject: x\r\n\r\nTLS-Required: No\r\n")  # in the body
    assert not check(b"X-TLS-Required: No\r\n\r\n")
    assert not tls_required_no(replace(message(), content_path=str(tmp_path / "gone")))
