"""The loopback DNS server (tests.support.dns) answers real queries.

Each check runs a twisted.names client in a child Python process (its own
reactor), pointed at the server with ``client.Resolver(servers=[...])``,
so no reactor runs inside pytest.  The same child also runs
:class:`~mailserver.delivery.mx.MXResolver` against the server, end to
end over the wire.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.dns import ROOT, DNSServer

ZONES = {
    "example.test": {
        "@": {"MX": [[20, "mx2"], [10, "mx1"]]},
        "mx1": {"A": "127.0.0.1", "AAAA": "::1"},
        "mx2": {"A": ["127.0.0.2", "127.0.0.3"]},
        "flat": {"A": "127.0.0.4"},
        "www": {"CNAME": "mx1"},
        "aliased": {"CNAME": "example.test"},
        "cnamemx": {"MX": [[10, "www"], [20, "mx2"]]},
        "null": {"MX": [[0, "."]]},
        "slow": {"timeout": True},
        "bad": {"servfail": ["MX"], "A": "127.0.0.9"},
        "shut": {"refused": True},
        "txt": {"TXT": ["v=spf1 -all"]},
    },
    "other.test": {"@": {"MX": "5 mx1.example.test"}},
}

CHILD = r'''
import json, sys
from twisted.internet import defer, task
from twisted.names import client, dns

from mailserver.delivery.mx import MXResolver


def show(rr):
    p = rr.payload
    if rr.type == dns.MX:
        value = [p.preference, p.name.name.decode()]
    elif rr.type == dns.CNAME:
        value = p.name.name.decode()
    elif rr.type == dns.A:
        value = p.dottedQuad()
    elif rr.type == dns.TXT:
        value = [d.decode() for d in p.data]
    else:
        value = str(p)
    return [rr.name.name.decode(), dns.QUERY_TYPES[rr.type], value]


async def run(reactor, port, ops):
    resolver = client.Resolver(servers=[("127.0.0.1", port)], reactor=reactor, timeout=(1,))
    mx = MXResolver(resolver, timeout=(1,))
    out = []
    for op, name in ops:
        try:
            if op == "mx":
                found = await mx.destinations(name)
                out.append([[d.host, d.preference, list(d.addresses), d.implicit] for d in found])
            elif op == "tcp":
                message = await resolver.queryTCP([dns.Query(name, dns.MX)])
                out.append([show(rr) for rr in message.answers])
            else:
                answers, _authority, _additional = await getattr(resolver, op)(name)
                out.append([show(rr) for rr in answers])
        except Exception as e:
            reply = getattr(e, "reply", None)
            out.append(str(reply) if reply is not None else type(e).__name__)
    print(json.dumps(out))


port, ops = int(sys.argv[1]), json.loads(sys.argv[2])
task.react(lambda reactor: defer.ensureDeferred(run(reactor, port, ops)))
'''


def ask(server: DNSServer, *ops):
    done = subprocess.run([sys.executable, "-c", CHILD, str(server.port), json.dumps(ops)],
                          cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory):
    server = DNSServer(ZONES, directory=str(tmp_path_factory.mktemp("dns")))
    server.start()
    yield server
    server.stop()


def test_records(dns_server):
    mx, a, aaaa, cname, txt, other = ask(
        dns_server, ("lookupMailExchange", "example.test"), ("lookupAddress", "mx2.example.test"),
        ("lookupIPV6Address", "mx1.example.test"), ("lookupCanonicalName", "www.example.test"),
        ("lookupText", "txt.example.test"), ("lookupMailExchange", "other.test"))
    assert sorted(mx) == [["example.test", "MX", [10, "mx1.example.test"]],
                          ["example.test", "MX", [20, "mx2.example.test"]]]
    assert a == [["mx2.example.test", "A", "127.0.0.2"], ["mx2.example.test", "A", "127.0.0.3"]]
    assert aaaa[0][:2] == ["mx1.example.test", "AAAA"]
    assert cname[0] == ["www.example.test", "CNAME", "mx1.example.test"]  # then mx1's addresses
    assert txt == [["txt.example.test", "TXT", ["v=spf1 -all"]]]
    assert other == [["other.test", "MX", [5, "mx1.example.test"]]]


def test_null_mx_nodata_and_failures(dns_server):
    null, nodata, nxdomain, outside, servfail, bad_a, refused, timeout = ask(
        dns_server, ("lookupMailExchange", "null.example.test"),
        ("lookupMailExchange", "flat.example.test"),
        ("lookupAddress", "nosuch.example.test"), ("lookupAddress", "nowhere.invalid"),
        ("lookupMailExchange", "bad.example.test"), ("lookupAddress", "bad.example.test"),
        ("lookupAddress", "shut.example.test"), ("lookupAddress", "slow.example.test"))
    assert null == [["null.example.test", "MX", [0, ""]]]
    assert nodata == []
    assert nxdomain == outside == "DNSNameError"
    assert servfail == "DNSServerError"
    assert bad_a == [["bad.example.test", "A", "127.0.0.9"]]
    assert refused == "DNSQueryRefusedError"
    assert timeout in ("TimeoutError", "DNSQueryTimeoutError")


def test_tcp(dns_server):
    assert len(ask(dns_server, ("tcp", "example.test"))[0]) == 2


def test_mx_resolver_over_the_wire(dns_server):
    mx, implicit, aliased, cname_target, null, nxdomain, servfail = ask(
        dns_server, ("mx", "example.test"), ("mx", "flat.example.test"),
        ("mx", "aliased.example.test"), ("mx", "cnamemx.example.test"),
        ("mx", "null.example.test"), ("mx", "nosuch.example.test"), ("mx", "bad.example.test"))
    assert mx == [["mx1.example.test", 10, ["::1", "127.0.0.1"], False],
                  ["mx2.example.test", 20, ["127.0.0.2", "127.0.0.3"], False]]
    assert implicit == [["flat.example.test", 0, ["127.0.0.4"], True]]
    assert aliased == mx  # the domain's CNAME is followed
    assert cname_target == [["mx2.example.test", 20, ["127.0.0.2", "127.0.0.3"], False]]
    assert null.startswith("556 5.1.10 ")
    assert nxdomain.startswith("550 5.1.2 ")
    assert servfail.startswith("451 4.4.3 ")


def test_update_and_query_log(tmp_path):
    with DNSServer({"upd.test": {"@": {"A": "127.0.0.1"}}}, directory=str(tmp_path)) as server:
        assert ask(server, ("lookupAddress", "upd.test")) == [[["upd.test", "A", "127.0.0.1"]]]
        server.update({"upd.test": {"@": {"A": "127.0.0.2"}, "new": {"MX": [[1, "upd.test"]]}}})
        got = ask(server, ("lookupAddress", "upd.test"), ("lookupMailExchange", "new.upd.test"))
        assert got == [[["upd.test", "A", "127.0.0.2"]], [["new.upd.test", "MX", [1, "upd.test"]]]]
        assert ("new.upd.test", "MX") in server.queries()
        # a broken file keeps the old zones
        (server.dir / "zones.json").write_text("{not json")
        server.process.send_signal(1)
        assert ask(server, ("lookupAddress", "upd.test")) == [[["upd.test", "A", "127.0.0.2"]]]
        port = server.port
        server.stop()
        server.start()
        assert server.port == port
        assert ask(server, ("lookupAddress", "upd.test")) == [[["upd.test", "A", "127.0.0.2"]]]


def test_bad_zone_data_is_refused_in_the_test_process():
    with pytest.raises(ValueError, match="outside the zone"):
        DNSServer({"a.test": {"b.test": {"A": "127.0.0.1"}}})
    with pytest.raises(ValueError, match="unknown key"):
        DNSServer({"a.test": {"@": {"SRV": "x"}}})
