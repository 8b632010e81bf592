"""MTA-STS (RFC 8461): the TXT record, the policy file, MX patterns, the cache
and the decision to fetch, without a network."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.names import dns
from twisted.names import error as dns_error

from mailserver.delivery.mtasts import (
    MTASTS, FetchError, Policy, PolicyCache, mx_matches, parse_policy, parse_txt,
)

POLICY = ("version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\n"
          "mx: *.backup.example.net\r\nmax_age: 86400\r\n")


def test_txt_id():
    assert parse_txt(["v=STSv1; id=20240101T01;"]) == "20240101T01"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two records: none
    assert parse_txt(["v=STSv1; id=bad-char"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=STSv2; id=abc"]) is None
    assert parse_txt([]) is None


def test_policy_parsed():
    p = parse_policy(POLICY)
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mx1.example.net", "*.backup.example.net"),
                                         86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 10\n").mode == "none"
    assert parse_policy(POLICY.replace("86400", "99999999")).max_age == 31557600
    assert parse_policy(POLICY + "future: x\r\n").mode == "enforce"  # unknown keys ignored


@pytest.mark.parametrize("text, words", [
    ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 1\n", "mx"),
    ("version: STSv1\ngarbage\n", "':'"),
])
def test_bad_policies(text, words):
    with pytest.raises(ValueError, match=words):
        parse_policy(text)


@pytest.mark.parametrize("pattern, host, ok", [
    ("mx1.example.net", "MX1.example.net.", True),
    ("mx1.example.net", "mx2.example.net", False),
    ("*.example.net", "mx1.example.net", True),
    ("*.example.net", "example.net", False),
    ("*.example.net", "a.b.example.net", False),
    ("*.example.net", "mx1.example.net.evil.test", False),
])
def test_mx_patterns(pattern, host, ok):
    assert mx_matches(pattern, host) is ok


class TXT:
    """A resolver answering lookupText from a dict; a missing name is NXDOMAIN,
    None a SERVFAIL."""

    def __init__(self, records):
        self.records = records

    def lookupText(self, name, timeout=None):
        if name not in self.records:
            return defer.fail(dns_error.DNSNameError(name))
        if self.records[name] is None:
            return defer.fail(dns_error.DNSServerError(name))
        rr = dns.RRHeader(name, dns.TXT, payload=dns.Record_TXT(self.records[name].encode()))
        return defer.succeed(([rr], [], []))


class Fetch:
    def __init__(self, text=POLICY):
        self.text, self.calls = text, 0

    async def __call__(self, domain):
        self.calls += 1
        if isinstance(self.text, Exception):
            raise self.text
        return self.text


def run(coro):
    """The result of a coroutine that never waits (every fake here answers at once)."""
    return defer.ensureDeferred(coro).result


def test_fetch_cache_and_refresh(tmp_path):
    now = [1000.0]
    path = str(tmp_path / "mta-sts.json")
    txt = TXT({"_mta-sts.example.net": "v=STSv1; id=one"})
    fetch = Fetch()
    sts = MTASTS(txt, fetch, PolicyCache(path, lambda: now[0]), lambda: now[0])
    p = run(sts.policy_for("Example.NET"))
    assert p.mode == "enforce" and p.id == "one" and p.expires == 1000 + 86400
    assert run(sts.policy_for("example.net")) == p and fetch.calls == 1  # same id: cached
    assert json.load(open(path))["example.net"]["id"] == "one"
    # a restart keeps it
    again = MTASTS(txt, Fetch(FetchError("down")), PolicyCache(path, lambda: now[0]),
                   lambda: now[0])
    assert run(again.policy_for("example.net")) == p
    # a new id fetches again
    txt.records["_mta-sts.example.net"] = "v=STSv1; id=two"
    fetch.text = POLICY.replace("enforce", "testing")
    assert run(sts.policy_for("example.net")).mode == "testing" and fetch.calls == 2


def test_failures_keep_the_cached_policy_until_it_expires():
    now = [0.0]
    txt = TXT({"_mta-sts.example.net": "v=STSv1; id=one"})
    fetch = Fetch()
    sts = MTASTS(txt, fetch, PolicyCache(None, lambda: now[0]), lambda: now[0])
    first = run(sts.policy_for("example.net"))
    txt.records["_mta-sts.example.net"] = None  # SERVFAIL
    assert run(sts.policy_for("example.net")) == first
    del txt.records["_mta-sts.example.net"]  # record withdrawn: still cached
    assert run(sts.policy_for("example.net")) == first
    txt.records["_mta-sts.example.net"] = "v=STSv1; id=new"
    fetch.text = FetchError("HTTP 404")
    assert run(sts.policy_for("example.net")) == first
    fetch.text = "not a policy"
    assert run(sts.policy_for("example.net")) == first
    now[0] = 86400.0  # expired, and the fetch still fails
    assert run(sts.policy_for("example.net")) is None


def test_mode_none_removes_the_policy():
    txt = TXT({"_mta-sts.example.net": "v=STSv1; id=one"})
    fetch = Fetch()
    sts = MTASTS(txt, fetch, PolicyCache(None, lambda: 0.0), lambda: 0.0)
    assert run(sts.policy_for("example.net")).mode == "enforce"
    txt.records["_mta-sts.example.net"] = "v=STSv1; id=two"
    fetch.text = "version: STSv1\nmode: none\nmax_age: 600\n"
    assert run(sts.policy_for("example.net")) is None
    assert run(sts.policy_for("example.net")) is None and fetch.calls == 2


def test_no_record_no_policy():
    sts = MTASTS(TXT({}), Fetch(), PolicyCache(None, lambda: 0.0), lambda: 0.0)
    assert run(sts.policy_for("example.org")) is None


def test_unreadable_cache_starts_empty(tmp_path):
    path = tmp_path / "mta-sts.json"
    path.write_text("{not json")
    assert PolicyCache(str(path), lambda: 0.0).get("example.net") is None


def test_policy_matches():
    p = Policy("enforce", ("*.example.net",), 60)
    assert p.matches("mx.example.net") and not p.matches("mx.example.org")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_parsers_only_refuse_with_value_error(text):
    """Whatever a web server or the DNS sends, the answer is a policy, None or ValueError."""
    try:
        parse_policy(text)
    except ValueError:
        pass
    assert parse_txt([text]) is None or _id_ok(parse_txt([text]))


def _id_ok(policy_id: str) -> bool:
    return 1 <= len(policy_id) <= 32 and policy_id.isascii() and policy_id.isalnum()


def test_certificate_problem_checks_trust_and_name():
    """What testing mode reports: the chain's trust and the MX name, as enforce checks them."""
    trustme = pytest.importorskip("trustme")
    from cryptography import x509
    from twisted.internet import ssl

    from mailserver.delivery.mtasts import certificate_problem

    ca = trustme.CA()
    leaf = ca.create_child_ca().issue_cert("mx.example.net")  # leaf, intermediate
    chain = [x509.load_pem_x509_certificate(p.bytes()) for p in leaf.cert_chain_pems]
    trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca.cert_pem.bytes())])
    assert certificate_problem(chain, "mx.example.net", trust) is None
    assert certificate_problem(chain, "MX.example.net", trust) is None
    assert certificate_problem(chain, "mx2.example.net", trust) == (
        "certificate does not name mx2.example.net")
    assert certificate_problem(chain[:1], "mx.example.net", trust).startswith(
        "certificate not trusted")  # the intermediate is missing
    other = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(
        trustme.CA().cert_pem.bytes())])
    assert certificate_problem(chain, "mx.example.net", other).startswith(
        "certificate not trusted")
    assert certificate_problem(chain, "mx.example.net") is not None  # not a public CA
    assert certificate_problem([], "mx.example.net", trust) == "no certificate"
