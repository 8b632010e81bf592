"""DANE (RFC 7672): which TLSA records SMTP may use and whether a certificate
chain made with trustme satisfies them."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from datetime import timedelta

import pytest
from cryptography import x509

from mailserver.delivery.dane import (
    TLSA, Answer, DANEFailure, DANELookup, association, check_chain, selected, usable,
)

trustme = pytest.importorskip("trustme")


@pytest.fixture(scope="module")
def pki():
    ca = trustme.CA()
    issuing = ca.create_child_ca()
    leaf = issuing.issue_cert("mx.example.net")
    chain = [x509.load_pem_x509_certificate(b.bytes()) for b in leaf.cert_chain_pems]
    root = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    other = x509.load_pem_x509_certificate(
        trustme.CA().issue_cert("mx.example.net").cert_chain_pems[0].bytes())
    return {"chain": chain, "root": root, "other": other}


def record(usage, selector, mtype, cert):
    return TLSA(usage, selector, mtype, association(cert, selector, mtype))


def test_rdata_round_trip():
    r = TLSA.from_rdata(bytes((3, 1, 1)) + b"\x01" * 32)
    assert (r.usage, r.selector, r.mtype, len(r.data)) == (3, 1, 1, 32)
    assert TLSA.from_rdata(r.to_rdata()) == r
    with pytest.raises(ValueError):
        TLSA.from_rdata(b"\x03\x01")


def test_usable_records():
    good = [TLSA(3, 1, 1, b"a" * 32), TLSA(2, 0, 2, b"b" * 64), TLSA(3, 0, 0, b"der")]
    bad = [TLSA(0, 1, 1, b"a" * 32), TLSA(1, 1, 1, b"a" * 32),  # PKIX usages: unusable
           TLSA(3, 2, 1, b"a" * 32), TLSA(3, 1, 3, b"a" * 32),  # unknown selector, mtype
           TLSA(3, 1, 1, b"short")]  # a SHA-256 digest is 32 octets
    assert usable(good + bad) == tuple(good)


def test_selectors_and_matching(pki):
    leaf = pki["chain"][0]
    spki = selected(leaf, 1)
    assert association(leaf, 1, 1) == hashlib.sha256(spki).digest()
    assert association(leaf, 0, 2) == hashlib.sha512(selected(leaf, 0)).digest()
    assert association(leaf, 1, 0) == spki


@pytest.mark.parametrize("selector, mtype", [(0, 0), (0, 1), (1, 1), (1, 2)])
def test_dane_ee_matches_the_leaf(pki, selector, mtype):
    leaf = pki["chain"][0]
    assert check_chain([record(3, selector, mtype, leaf)], pki["chain"], "mx.example.net") is None
    # DANE-EE ignores names and expiry (RFC 7672 3.1.1)
    assert check_chain([record(3, selector, mtype, leaf)], [leaf], "other.example") is None
    before = leaf.not_valid_before_utc - timedelta(days=1)
    assert check_chain([record(3, selector, mtype, leaf)], [leaf], None, now=before) is None


def test_dane_ee_wrong_certificate(pki):
    why = check_chain([record(3, 1, 1, pki["other"])], pki["chain"], "mx.example.net")
    assert "DANE-EE" in why


def test_dane_ta_intermediate(pki):
    chain = pki["chain"]
    ta = record(2, 1, 1, chain[1])
    assert check_chain([ta], chain, "mx.example.net") is None
    assert "does not name" in check_chain([ta], chain, "mx.other.example")
    before = chain[0].not_valid_before_utc - timedelta(days=1)
    assert "not yet valid" in check_chain([ta], chain, "mx.example.net", now=before)


def test_dane_ta_not_in_chain_or_chain_broken(pki):
    chain = pki["chain"]
    assert "DANE-TA" in check_chain([record(2, 0, 1, pki["root"])], chain, "mx.example.net")
    # a leaf from another CA followed by our intermediate: the signature fails
    broken = [pki["other"], chain[1]]
    assert "does not lead" in check_chain([record(2, 1, 1, chain[1])], broken, "mx.example.net")


def test_no_certificate():
    assert "no certificate" in check_chain([TLSA(3, 1, 1, b"a" * 32)], [], "mx.example.net")


class _Answers:
    """A SecureDNS stand-in: ``{(name, qtype): Answer or exception}``."""

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    async def query(self, name, qtype):
        self.asked.append((name, qtype))
        found = self.answers.get((name, qtype))
        if isinstance(found, Exception):
            raise found
        return found or Answer(3, True, ())


def _run(coro):
    from twisted.internet import defer

    out = []
    defer.ensureDeferred(coro).addBoth(out.append)
    return out[0]


def test_tlsa_needs_a_secure_address():
    """RFC 7672 2.2.2: no TLSA records are used for a host with an insecure address."""
    from twisted.names import dns

    rdata = SimpleNamespace(data=TLSA(3, 1, 1, b"a" * 32).to_rdata())
    tlsa = ("_25._tcp.mx.example.net", 52)
    secure = {("mx.example.net", dns.A): Answer(0, True, ("a",)), tlsa: Answer(0, True, (rdata,))}
    records, present = _run(DANELookup(_Answers(secure)).tlsa("mx.example.net", 25))
    assert present and records == (TLSA(3, 1, 1, b"a" * 32),)
    insecure = dict(secure)
    insecure[("mx.example.net", dns.A)] = Answer(0, False, ("a",))
    lookup = _Answers(insecure)
    assert _run(DANELookup(lookup).tlsa("mx.example.net", 25)) == ((), False)
    assert tlsa not in lookup.asked  # not even asked
    v6 = dict(secure)
    v6[("mx.example.net", dns.A)] = Answer(0, True, ())  # no A: the AAAA RRset decides
    v6[("mx.example.net", dns.AAAA)] = Answer(0, False, ("aaaa",))
    assert _run(DANELookup(_Answers(v6)).tlsa("mx.example.net", 25)) == ((), False)
    bogus = dict(secure)
    bogus[("mx.example.net", dns.A)] = DANEFailure("mx.example.net: DNS error 2")
    failure = _run(DANELookup(_Answers(bogus)).tlsa("mx.example.net", 25))
    assert failure.check(DANEFailure)
