"""How MTA-STS, DANE and the configured TLS policy combine per MX host
(delivery/tlsplan.py), and that RemoteDelivery connects only where the plan says."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from mailserver.delivery.dane import TLSA, DANEFailure
from mailserver.delivery.interfaces import DeliveryReport, OutboundMessage, OutboundRecipient
from mailserver.delivery.mtasts import Policy
from mailserver.delivery.remote import RemoteDelivery, TLSPolicy
from mailserver.delivery.tlsplan import OutboundSecurity, combine
from tests.support.dns import FakeResolver

RECORD = TLSA(3, 1, 1, b"x" * 32)
ENFORCE = Policy("enforce", ("mx1.example.net",), 600)
TESTING = Policy("testing", ("mx1.example.net",), 600)


@pytest.mark.parametrize("base, sts, host, tlsa, present, want", [
    ("may", None, "mx1.example.net", (), False, "may"),
    ("none", None, "mx1.example.net", (RECORD,), True, "dane"),       # DANE beats all
    ("verify", ENFORCE, "mx2.example.net", (RECORD,), True, "dane"),  # even a non-matching MX
    ("may", ENFORCE, "mx1.example.net", (), False, "verify"),
    ("encrypt", ENFORCE, "mx1.example.net", (), False, "verify"),
    ("may", ENFORCE, "mx2.example.net", (), False, None),             # excluded
    ("may", TESTING, "mx2.example.net", (), False, "may"),            # testing: only logged
    ("may", None, "mx1.example.net", (), True, "encrypt"),            # TLSA, none usable
    ("verify", None, "mx1.example.net", (), True, "verify"),
])
def test_strictest_wins(base, sts, host, tlsa, present, want):
    got = combine(TLSPolicy(base), sts, host, tlsa, present)
    assert (got.mode if got else None) == want
    if want == "dane":
        assert got.tlsa == (RECORD,)


def test_testing_mode_reports_certificates_where_tls_is_not_verified_anyway():
    root = object()
    got = combine(TLSPolicy("may"), TESTING, "mx1.example.net", sts_trust_root=root)
    assert (got.mode, got.sts_testing, got.trust_root) == ("may", True, root)
    assert combine(TLSPolicy("encrypt"), TESTING, "mx2.example.net").sts_testing
    assert not combine(TLSPolicy("verify"), TESTING, "mx1.example.net").sts_testing
    assert not combine(TLSPolicy("none"), TESTING, "mx1.example.net").sts_testing
    assert not combine(TLSPolicy("may"), None, "mx1.example.net").sts_testing


class FakeSTS:
    def __init__(self, policy):
        self.policy = policy

    async def policy_for(self, domain):
        return self.policy


class FakeDANE:
    def __init__(self, secure, tlsa):
        self.secure, self.records = secure, tlsa

    async def mx_secure(self, domain):
        return self.secure

    async def tlsa(self, host, port):
        found = self.records.get(host, ())
        if isinstance(found, Exception):
            raise found
        return found, bool(found)


ZONES = {"example.net": {"@": {"MX": [[10, "mx1"], [20, "mx2"]]},
                         "mx1": {"A": "192.0.2.1"}, "mx2": {"A": "192.0.2.2"}}}


def deliver(tmp_path, security):
    calls = []

    def connect(reactor, host, port, msg, **kw):
        calls.append((host, kw["tls"], kw.get("tlsa")))
        return DeliveryReport({r.address: _ok() for r in msg.recipients}, remote=host), False

    remote = RemoteDelivery(FakeResolver(ZONES), connect, helo="us.test", reactor=object(),
                            security=security, families=("ipv4",))
    content = tmp_path / "m"
    content.write_bytes(b"Subject: x\r\n\r\nhi\r\n")
    msg = OutboundMessage("Q1", "a@us.test", (OutboundRecipient("b@example.net"),),
                          str(content), 20)
    report = defer.ensureDeferred(remote.deliver(msg)).result
    return report.replies["b@example.net"], calls


def _ok():
    from mailserver.reply import Reply

    return Reply(250, (2, 0, 0), "ok")


def test_enforce_skips_unlisted_mx(tmp_path):
    reply, calls = deliver(tmp_path, OutboundSecurity(FakeSTS(
        Policy("enforce", ("mx2.example.net",), 60))))
    assert reply.code == 250 and calls == [("192.0.2.2", "verify", None)]


def test_enforce_without_matching_mx_defers_unsent(tmp_path):
    reply, calls = deliver(tmp_path, OutboundSecurity(FakeSTS(
        Policy("enforce", ("mx.other.example",), 60))))
    assert (reply.code, reply.enhanced) == (451, (4, 7, 5)) and "MTA-STS" in reply.text
    assert calls == []


def test_dane_records_reach_connect(tmp_path):
    reply, calls = deliver(tmp_path, OutboundSecurity(None, FakeDANE(True, {
        "mx1.example.net": (RECORD,)})))
    assert calls[0] == ("192.0.2.1", "dane", (RECORD,))


def test_insecure_mx_means_no_dane(tmp_path):
    reply, calls = deliver(tmp_path, OutboundSecurity(None, FakeDANE(False, {
        "mx1.example.net": (RECORD,)})))
    assert calls[0] == ("192.0.2.1", "may", None)


def test_failed_tlsa_lookup_skips_the_host(tmp_path):
    dane = FakeDANE(True, {"mx1.example.net": DANEFailure("SERVFAIL"),
                           "mx2.example.net": DANEFailure("SERVFAIL")})
    reply, calls = deliver(tmp_path, OutboundSecurity(None, dane))
    assert (reply.code, reply.enhanced) == (451, (4, 7, 5)) and calls == []
    dane.records["mx2.example.net"] = ()
    reply, calls = deliver(tmp_path, OutboundSecurity(None, dane))
    assert calls == [("192.0.2.2", "may", None)]
