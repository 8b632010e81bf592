"""SPF, DKIM, ARC and DMARC on the MX: real twistd, smtplib, a loopback DNS server.

The DNS server publishes SPF, DKIM keys (made here, messages signed by
dkimpy) and DMARC records; the MX is pointed at it through
``[relay] nameservers``.  Each test sends one message and checks the reply
and the headers on disk.
"""

from __future__ import annotations

import email
import smtplib

import pytest

from tests.conftest import embedded_directory
from tests.support.dns import DNSServer
from tests.support.msgauth import Ed25519Key, RSAKey, arc_seal, message, sign
from tests.support.server import MailServer

pytestmark = pytest.mark.slow

KEY = Ed25519Key()
SEALER = RSAKey()
HERE = "v=spf1 ip4:127.0.0.1 -all"


def zones() -> dict:
    return {
        "example.org": {
            "@": {"TXT": HERE},
            "sel._domainkey.example.org": {"TXT": KEY.record},
            "_dmarc.example.org": {"TXT": "v=DMARC1; p=reject"},
        },
        "forged.example": {"@": {"TXT": "v=spf1 -all"},
                           "_dmarc.forged.example": {"TXT": "v=DMARC1; p=reject"}},
        "quar.example": {"@": {"TXT": "v=spf1 -all"},
                         "_dmarc.quar.example": {"TXT": "v=DMARC1; p=quarantine"}},
        "soft.example": {"@": {"TXT": "v=spf1 ~all"},
                         "_dmarc.soft.example": {"TXT": "v=DMARC1; p=none"}},
        "down.example": {"@": {"servfail": ["TXT"]},
                         "_dmarc.down.example": {"TXT": "v=DMARC1; p=reject"}},
        "helo.example": {"@": {"TXT": HERE}},
        "list.example": {"arc._domainkey.list.example": {"TXT": SEALER.record}},
    }


@pytest.fixture(scope="module")
def mx(tmp_path_factory):
    with DNSServer(zones()) as dns:
        srv = MailServer(
            tmp_path_factory.mktemp("inbound"), directory=embedded_directory(),
            relay={"nameservers": [dns.nameserver]},
            extra_tables={"checks": {"enabled": True, "dns_timeout": 5.0,
                                     "junk_folder": "Junk"}})
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def send(mx, sender, data, helo="client.example"):
    """(code, text) of the reply to the end of the data."""
    with smtplib.SMTP("127.0.0.1", mx.smtp_port, local_hostname=helo, timeout=30) as s:
        s.ehlo(helo)
        code, text = s.mail(sender)
        assert code == 250, text
        code, text = s.rcpt("alice@example.test")
        assert code == 250, text
        return s.data(data)


def stored(mx, subject, folder=""):
    new = mx.maildir("alice") / folder / "new"
    paths = sorted(new.iterdir()) if new.is_dir() else []
    for path in paths:
        msg = email.message_from_bytes(path.read_bytes())
        if msg["Subject"] == subject:
            return msg
    raise AssertionError(f"no message {subject!r} in {new}")


def ours(msg) -> list:
    return [v for v in msg.get_all("Authentication-Results", [])
            if v.strip().lower().startswith("mx.example.test")]


def test_aligned_dkim_and_spf_pass_forged_header_removed(mx):
    forged = (b"Authentication-Results: mx.example.test; dmarc=pass header.from=bank.example\r\n"
              b"Authentication-Results: other.example; spf=pass smtp.mailfrom=x@other.example\r\n")
    data = sign(message(subject="signed", extra=b""), KEY, "example.org")
    code, text = send(mx, "alice@example.org", forged + data)
    assert code == 250, text
    msg = stored(mx, "signed")
    [header] = ours(msg)
    assert "spf=pass" in header and "smtp.mailfrom=alice@example.org" in header
    assert "dkim=pass" in header and "header.d=example.org" in header
    assert "header.a=ed25519-sha256" in header
    assert "dmarc=pass (p=reject dis=none) header.from=example.org" in header
    assert "arc=none" in header
    assert "bank.example" not in str(msg)
    assert len(msg.get_all("Authentication-Results")) == 2  # ours and other.example's
    # ours on top of the sender's header, just below our Received line
    names = [k.lower() for k in msg.keys()]
    assert names[:4] == ["return-path", "delivered-to", "received", "authentication-results"]
    assert msg["X-Spam-Flag"] is None


def test_dmarc_reject_refused_at_end_of_data(mx):
    before = len(mx.messages("alice"))
    code, text = send(mx, "ceo@forged.example", message("ceo@forged.example", "forged"))
    assert code == 550 and text.startswith(b"5.7.1"), text
    assert len(mx.messages("alice")) == before
    assert "dmarc=fail" in mx.log() and ": reject" in mx.log()


def test_valid_but_unaligned_signature_does_not_pass_dmarc(mx):
    # A good signature by example.org on mail "from" forged.example: DKIM
    # passes, DMARC fails, p=reject refuses it.
    data = sign(message("ceo@forged.example", "unaligned"), KEY, "example.org")
    code, text = send(mx, "bounces@example.org", data)  # SPF passes too, for example.org
    assert code == 550 and text.startswith(b"5.7.1"), text
    assert "spf=pass dkim=pass arc=none dmarc=fail (p=reject) from=forged.example" in mx.log()


def test_dmarc_quarantine_goes_to_junk(mx):
    code, text = send(mx, "a@quar.example", message("a@quar.example", "quarantined"))
    assert code == 250, text
    msg = stored(mx, "quarantined", folder=".Junk")
    assert msg["X-Spam-Flag"] == "YES"
    [header] = ours(msg)
    assert "spf=fail" in header and "dmarc=fail (p=quarantine dis=quarantine)" in header
    assert (mx.maildir("alice") / ".Junk" / "maildirfolder").exists()


def test_softfail_and_p_none_delivered(mx):
    code, text = send(mx, "a@soft.example", message("a@soft.example", "softly"))
    assert code == 250, text
    [header] = ours(stored(mx, "softly"))
    assert "spf=softfail" in header and "dmarc=fail (p=none dis=none)" in header


def test_dns_trouble_of_reject_domain_is_temporary(mx):
    code, text = send(mx, "a@down.example", message("a@down.example", "later"))
    assert code == 451 and text.startswith(b"4.7.1"), text


def test_null_sender_checks_helo(mx):
    code, text = send(mx, "<>", message("MAILER-DAEMON@helo.example", "bounce"),
                      helo="helo.example")
    assert code == 250, text
    [header] = ours(stored(mx, "bounce"))
    assert "spf=pass" in header and "smtp.helo=helo.example" in header


def test_arc_chain_reported(mx):
    hop = (b"Authentication-Results: list.example; dkim=pass header.d=example.org\r\n"
           + sign(message(subject="via list"), KEY, "example.org"))
    code, text = send(mx, "alice@example.org", arc_seal(hop, SEALER, "list.example",
                                                        "list.example"))
    assert code == 250, text
    [header] = ours(stored(mx, "via list"))
    assert "arc=pass (i=1)" in header and "dkim=pass" in header
