"""Transport map parsing and matching, the router, fixed next hops."""

from __future__ import annotations

import random

import pytest
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.trial.unittest import SynchronousTestCase

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, IDeliveryTarget
from mailserver.delivery.mx import MXResolver
from mailserver.delivery.remote import RemoteDelivery, TLSPolicy
from mailserver.delivery.routing import (
    FixedHostTarget, RefuseTarget, Router, Transport, lookup_keys, parse_smarthost,
    parse_transport, parse_transport_map,
)
from mailserver.reply import Reply
from tests.support.dns import FakeResolver
from tests.unit.test_delivery_remote import OK, FakeConnect, message

_trial = SynchronousTestCase()

ZONES = {"example.test": {
    "@": {"MX": [[10, "mx1"]]},
    "mx1": {"A": "192.0.2.1"},
    "relay": {"A": ["192.0.2.25", "192.0.2.26"], "AAAA": "2001:db8::25"},
    "hub": {"MX": [[10, "mx1"]]},
    "slow": {"timeout": True},
    "local": {"A": "127.0.0.1"},
    "alsome": {"MX": [[10, "local"]]},
}}


def result(coro):
    return _trial.successResultOf(defer.ensureDeferred(coro))


# -- parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, want", [
    ("local", Transport("local")),
    ("smtp:", Transport("smtp")),
    ("smtp:[relay.example.org]:587", Transport("smtp", "relay.example.org", 587)),
    ("smtp:[Relay.Example.ORG]", Transport("smtp", "relay.example.org", 25)),
    ("smtp:mx.example.org", Transport("smtp", "mx.example.org", 25, mx=True)),
    ("smtp:mx.example.org:2525", Transport("smtp", "mx.example.org", 2525, mx=True)),
    ("smtp:192.0.2.1:2525", Transport("smtp", "192.0.2.1", 2525)),
    ("smtp:[2001:db8::1]:25", Transport("smtp", "2001:db8::1", 25)),
    ("smtp:[IPv6:2001:db8::1]", Transport("smtp", "2001:db8::1", 25)),
    ("lmtp:127.0.0.1:2424", Transport("lmtp", "127.0.0.1", 2424)),
    ("lmtp:[mailstore.example.org]", Transport("lmtp", "mailstore.example.org", 24)),
    ("lmtp:inet:mailstore:24", Transport("lmtp", "mailstore", 24)),
    ("lmtp:unix:/run/dovecot/lmtp", Transport("lmtp", unix_path="/run/dovecot/lmtp")),
    ("error:5.1.2 No such domain",
     Transport("error", reply=Reply(550, (5, 1, 2), "No such domain"))),
    ("error:554 5.7.1 Go away", Transport("error", reply=Reply(554, (5, 7, 1), "Go away"))),
    ("error:Closed", Transport("error", reply=Reply(550, (5, 0, 0), "Closed"))),
    ("error:", Transport("error", reply=R.TRANSPORT_ERROR)),
    ("defer:", Transport("defer", reply=R.TRANSPORT_DEFER)),
    ("defer:4.3.5 Maintenance until 6pm",
     Transport("defer", reply=Reply(451, (4, 3, 5), "Maintenance until 6pm"))),
])
def test_parse_transport(text, want):
    assert parse_transport(text) == Transport(**{**want.__dict__, "text": text})


@pytest.mark.parametrize("text, words", [
    ("uucp:host", "unknown transport 'uucp'"),
    ("smtp:[relay.example.org", "missing ']'"),
    ("smtp:[relay]x", "expected ':port'"),
    ("smtp:relay:0", "bad port"),
    ("smtp:relay:70000", "bad port"),
    ("smtp:relay:", "empty port"),
    ("smtp:bad_host!", "bad host name"),
    ("lmtp:", "lmtp needs a host"),
    ("lmtp:unix:run/lmtp", "must be absolute"),
    ("local:somewhere", "takes no next hop"),
    ("error:451 4.3.0 Not an error", "needs 5xx"),
    ("error:5.1.2x", None),  # not an enhanced code: it is all text
    ("defer:5.0.0 No", "needs 4xx"),
])
def test_parse_errors_name_the_entry(text, words):
    if words is None:
        assert parse_transport(text).reply.text == "5.1.2x"
        return
    with pytest.raises(ValueError) as info:
        parse_transport(text)
    assert words in str(info.value)
    assert repr(text) in str(info.value)


def test_transport_map_keys():
    parsed = parse_transport_map({"Example.ORG": "local", ".example.org": "smtp:", "*": "defer:"})
    assert set(parsed) == {"example.org", ".example.org", "*"}
    for bad in ("ex ample.org", "..example.org", "*.example.org", ""):
        with pytest.raises(ValueError, match="transport map key"):
            parse_transport_map({bad: "local"})
    with pytest.raises(ValueError, match="twice"):
        parse_transport_map({"a.test": "local", "A.test": "local"})


def test_lookup_keys_go_from_exact_to_parents():
    assert lookup_keys("a.b.example.org") == ["a.b.example.org", ".b.example.org",
                                              ".example.org", ".org"]


def test_smarthost_forms():
    assert parse_smarthost("[relay.example.org]:587") == Transport(
        "smtp", "relay.example.org", 587, text="smtp:[relay.example.org]:587")
    assert parse_smarthost("smtp:[relay.example.org]").port == 25
    assert parse_smarthost("relay.example.org").mx is True
    assert parse_smarthost("lmtp:unix:/run/lmtp").unix_path == "/run/lmtp"
    for bad in ("smtp:", "error:5.0.0 no", "local"):
        with pytest.raises(ValueError, match="smarthost"):
            parse_smarthost(bad)


# -- routing ---------------------------------------------------------------------------

LOCAL = object()


def router(transports=None, smarthost=None, local_domains=("example.test",), connect=None,
           own_names=(), own_endpoint=None, **kw):
    remote = RemoteDelivery(FakeResolver(ZONES), connect or FakeConnect(), helo="out.example.net",
                            reactor=object(), rng=random.Random(1), own_names=own_names,
                            own_endpoint=own_endpoint)
    return Router(local_domains, LOCAL, remote, transports or {}, smarthost,
                  connect=connect or FakeConnect(), helo="out.example.net", reactor=object(), **kw)


def route(r: Router, address: str):
    return result(r.route(address))


def test_local_and_remote_by_default():
    r = router()
    assert route(r, "alice@example.test") == route(r, "alice@EXAMPLE.test")
    assert route(r, "alice@example.test").kind == "local"
    assert route(r, "alice@example.test").target is LOCAL
    assert route(r, "postmaster").kind == "local"
    far = route(r, "bob@far.test")
    assert (far.kind, far.target, far.nexthop) == ("smtp", r.remote_target, "far.test")


def test_exact_then_subdomain_then_local_then_star():
    r = router({"example.org": "smtp:[exact.example.net]", ".example.org": "smtp:[sub.example.net]",
                "sub.example.test": "error:5.1.2 Gone", "*": "smtp:[star.example.net]:2525"},
               local_domains=("example.test", "x.example.test"))
    assert route(r, "a@example.org").nexthop == "[exact.example.net]:25"
    assert route(r, "a@deep.sub.example.org").nexthop == "[sub.example.net]:25"
    assert route(r, "a@sub.example.test").kind == "error"
    assert route(r, "a@example.test").kind == "local"  # '*' never takes local domains
    assert route(r, "a@x.example.test").kind == "local"
    assert route(r, "a@far.test").nexthop == "[star.example.net]:2525"


def test_exact_entry_overrides_local_and_smtp_undoes_star():
    r = router({"example.test": "lmtp:unix:/run/lmtp", "direct.test": "smtp:", "*": "defer:"})
    assert route(r, "a@example.test").kind == "lmtp"
    direct = route(r, "a@direct.test")
    assert (direct.target, direct.nexthop) == (r.remote_target, "direct.test")
    assert route(r, "a@other.test").kind == "defer"


def test_local_domains_may_be_an_asynchronous_check():
    asked = []

    def is_local(domain):
        asked.append(domain)
        return defer.succeed(domain == "dir.test")

    r = router(local_domains=is_local)
    assert route(r, "a@dir.test").kind == "local"
    assert route(r, "a@far.test").kind == "smtp"
    assert asked == ["dir.test", "far.test"]


def test_group_by_target_and_nexthop_keeping_order():
    r = router({"relayed.test": "smtp:[relay.example.test]",
                "also.test": "smtp:[relay.example.test]"})
    msg = message("a@far.test", "l1@example.test", "b@relayed.test", "c@far.test", "d@near.test",
                  "e@also.test", "l2@example.test")
    groups = result(r.group(msg))
    assert [[x.address for x in part.recipients] for _t, _n, part in groups] == [
        ["a@far.test", "c@far.test"], ["l1@example.test", "l2@example.test"],
        ["b@relayed.test", "e@also.test"], ["d@near.test"]]
    assert [n for _t, n, _part in groups] == ["far.test", "local",
                                               "[relay.example.test]:25", "near.test"]
    targets = [t for t, _n, _part in groups]
    assert targets[0] is r.remote_target and targets[3] is r.remote_target
    assert targets[1] is LOCAL
    assert isinstance(targets[2], FixedHostTarget)
    assert all((part.queue_id, part.content_path) == (msg.queue_id, msg.content_path)
               for _t, _n, part in groups)


def test_error_and_defer_entries_answer_every_recipient():
    r = router({"gone.test": "error:5.1.2 Domain retired", "later.test": "defer:4.3.5 Maintenance"})
    groups = dict((p.recipients[0].address, (t, p)) for t, _n, p in result(r.group(
        message("a@gone.test", "b@later.test"))))
    target, part = groups["a@gone.test"]
    assert isinstance(target, RefuseTarget) and IDeliveryTarget.providedBy(target)
    assert str(result(target.deliver(part)).replies["a@gone.test"]) == "550 5.1.2 Domain retired"
    target, part = groups["b@later.test"]
    assert result(target.deliver(part)).replies["b@later.test"] == Reply(451, (4, 3, 5),
                                                                         "Maintenance")


def test_smtp_host_entry_looks_up_mx_of_that_host():
    connect = FakeConnect()
    r = router({"hubbed.test": "smtp:hub.example.test:2525"}, connect=connect)
    target, _nexthop, part = result(r.group(message("a@hubbed.test")))[0]
    assert route(r, "a@hubbed.test").nexthop == "hub.example.test:2525"
    assert result(target.deliver(part)).replies["a@hubbed.test"] == OK
    assert (connect.calls[0]["host"], connect.calls[0]["port"]) == ("192.0.2.1", 2525)


def test_smarthost_with_auth_and_tls():
    connect = FakeConnect()
    r = router(smarthost="[relay.example.test]:587", connect=connect, smarthost_auth=("user", "pw"),
               smarthost_tls="encrypt")
    assert route(r, "a@example.test").kind == "local"
    relay = route(r, "a@far.test")
    assert (relay.kind, relay.nexthop) == ("smtp", "[relay.example.test]:587")
    report = result(relay.target.deliver(message("a@far.test")))
    assert report.replies["a@far.test"] == OK
    call = connect.calls[0]
    assert (call["host"], call["port"], call["auth"], call["tls"]) == (
        "2001:db8::25", 587, ("user", "pw"), "encrypt")
    assert call["tls_hostname"] == "relay.example.test"
    with pytest.raises(ValueError, match="not both"):
        router({"*": "local"}, smarthost="[relay.example.test]")


def test_same_entry_text_shares_one_target_across_domains():
    r = router({"a.test": "lmtp:[store.example.test]:24", "b.test": "lmtp:[store.example.test]:24"})
    assert route(r, "x@a.test").target is route(r, "x@b.test").target


def test_tls_policy_for_fixed_hosts_by_host_name():
    connect = FakeConnect()
    r = router({"x.test": "smtp:[192.0.2.80]"}, connect=connect, tls_policy={"192.0.2.80": "none"})
    result(route(r, "a@x.test").target.deliver(message("a@x.test")))
    assert connect.calls[0]["tls"] == "none"


# -- FixedHostTarget --------------------------------------------------------------------

def fixed(connect, host="relay.example.test", port=25, **kw) -> FixedHostTarget:
    kw.setdefault("resolver", MXResolver(FakeResolver(ZONES)))
    return FixedHostTarget(connect, host, port, helo="out.example.net", reactor=object(), **kw)


def test_fixed_host_tries_each_address_of_the_name():
    connect = FakeConnect({"2001:db8::25": net_error.ConnectionRefusedError(),
                           "192.0.2.25": net_error.ConnectionRefusedError()})
    report = result(fixed(connect).deliver(message("a@far.test")))
    assert [c["host"] for c in connect.calls] == ["2001:db8::25", "192.0.2.25", "192.0.2.26"]
    assert report.remote == "relay.example.test[192.0.2.26]:25"
    assert report.replies["a@far.test"] == OK


def test_fixed_host_whose_dns_fails_is_temporary():
    connect = FakeConnect()
    report = result(fixed(connect, "slow.example.test").deliver(message("a@far.test")))
    reply = report.replies["a@far.test"]
    assert (reply.code, reply.enhanced) == (451, (4, 4, 3))
    assert connect.calls == []


def test_fixed_host_unknown_to_the_dns_goes_to_the_system_resolver():
    """``localhost`` and names from /etc/hosts are handed over by name."""
    connect = FakeConnect({"nosuch.example.test": net_error.DNSLookupError("nosuch")})
    report = result(fixed(connect, "nosuch.example.test").deliver(message("a@far.test")))
    assert connect.calls[0]["host"] == "nosuch.example.test"
    reply = report.replies["a@far.test"]
    assert (reply.code, reply.enhanced) == (451, (4, 4, 1))
    assert reply.text == "Host not found: nosuch.example.test:25"


def test_fixed_host_without_resolver_passes_the_name_on():
    connect = FakeConnect()
    report = result(fixed(connect, resolver=None, tls=TLSPolicy("verify")).deliver(message()))
    call = connect.calls[0]
    assert (call["host"], call["tls_hostname"], call["tls"]) == (
        "relay.example.test", "relay.example.test", "verify")
    assert report.remote == "relay.example.test:25"


def test_lmtp_over_a_unix_socket():
    connect = FakeConnect()
    target = FixedHostTarget(connect, unix_path="/run/lmtp", port=None, lmtp=True, helo="me",
                             reactor=object())
    report = result(target.deliver(message("a@example.test")))
    call = connect.calls[0]
    assert (call["host"], call["port"], call["unix_path"], call["lmtp"]) == (
        None, None, "/run/lmtp", True)
    assert report.remote == "unix:/run/lmtp"
    with pytest.raises(ValueError):
        FixedHostTarget(connect, helo="me")


def test_fixed_report_can_name_the_remote_itself():
    def connect(reactor, host, port, msg, **kw):
        replies = {r.address: OK for r in msg.recipients}
        return (DeliveryReport(replies, remote="named[192.0.2.1]:25"), False)

    assert result(fixed(connect, "192.0.2.1").deliver(message())).remote == "named[192.0.2.1]:25"


# -- every route keeps the recipient domain's TLS policy (issue 13, item 1) ---------------

STARTTLS_REFUSED = Reply(454, (4, 7, 0), "TLS not available due to temporary reason")


class RefusesStartTLS(FakeConnect):
    """A peer that answers STARTTLS with 454: the client defers when TLS is
    required (and tries the next address), else it sends in clear."""

    def __call__(self, reactor, host, port, msg, **kw):
        self.calls.append(dict(kw, host=host, port=port, rcpts=[r.address for r in msg.recipients]))
        if kw["tls"] in ("encrypt", "verify"):
            replies = {r.address: STARTTLS_REFUSED for r in msg.recipients}
            return defer.succeed((DeliveryReport(replies), True))
        return defer.succeed((DeliveryReport({r.address: OK for r in msg.recipients}), False))


ROUTES = {
    "transport to a fixed host": dict(transports={"bank.test": "smtp:[relay.example.test]"}),
    "transport to a host's MX": dict(transports={"bank.test": "smtp:hub.example.test:2525"}),
    "transport '*'": dict(transports={"*": "smtp:[relay.example.test]:587"}),
    "transport over LMTP": dict(transports={"bank.test": "lmtp:[relay.example.test]:24"}),
    "smarthost": dict(smarthost="[relay.example.test]:587"),
    "smarthost with its own policy": dict(smarthost="[relay.example.test]:587",
                                          smarthost_tls="may"),
    "smarthost by MX": dict(smarthost="hub.example.test"),
    "relay domain's internal host": dict(relay_domains={"bank.test": "smtp:[relay.example.test]"}),
    "plain MX delivery": dict(),
}


@pytest.mark.parametrize("how", list(ROUTES))
def test_recipient_domain_tls_policy_holds_on_every_route(how):
    """Whatever route bank.test's mail takes, its "encrypt" policy applies, so a
    peer answering STARTTLS with 454 defers the mail and never gets it in clear."""
    connect = RefusesStartTLS()
    r = Router(("example.test",), LOCAL,
               RemoteDelivery(FakeResolver({**ZONES, "bank.test": {"@": {"A": "192.0.2.9"}}}),
                              connect, helo="out.example.net", reactor=object(),
                              rng=random.Random(1), tls_policy={"bank.test": "encrypt"}),
               connect=connect, helo="out.example.net", reactor=object(),
               tls_policy={"bank.test": "encrypt"}, **ROUTES[how])
    msg = message("a@bank.test", "b@far.test")
    replies = {}
    for target, _nexthop, part in result(r.group(msg)):
        replies.update(result(target.deliver(part)).replies)
    assert replies["a@bank.test"] == STARTTLS_REFUSED
    assert connect.calls, "something was tried"
    assert all(c["tls"] == "encrypt" for c in connect.calls if "a@bank.test" in c["rcpts"])
    if "smarthost" in how or "'*'" in how:  # far.test shares the hop and keeps its policy
        assert replies["b@far.test"] == OK


@pytest.mark.parametrize("domain_policy, hop_policy, want", [
    ("encrypt", "may", "encrypt"), ("may", "encrypt", "encrypt"), ("verify", "encrypt", "verify"),
    ("encrypt", "verify", "verify"), ("none", "may", "may"), ("may", "none", "may"),
])
def test_stricter_of_the_domain_and_next_hop_policies_wins(domain_policy, hop_policy, want):
    """Where the recipient domain's policy and the next hop's differ, the stricter
    one (none < may < encrypt < verify) is used."""
    connect = FakeConnect()
    r = router({"bank.test": "smtp:[relay.example.test]"}, connect=connect,
               tls_policy={"bank.test": domain_policy, "relay.example.test": hop_policy})
    result(route(r, "a@bank.test").target.deliver(message("a@bank.test")))
    assert connect.calls[0]["tls"] == want


# -- every configured next hop is checked for a loop (issue 13, item 5) -----------------

class Ours:
    """Our SMTP listener is 127.0.0.1:25."""

    def __call__(self, address, port):
        return (address, port) == ("127.0.0.1", 25)


LOOPS = {
    "transport to our address": dict(transports={"x.test": "smtp:[127.0.0.1]:25"}),
    "transport to a name of ours": dict(transports={"x.test": "smtp:[out.example.net]"}),
    "transport to a name at our address": dict(transports={"x.test": "smtp:[local.example.test]"}),
    "transport to our MX": dict(transports={"x.test": "smtp:alsome.example.test"}),
    "LMTP to our SMTP listener": dict(transports={"x.test": "lmtp:127.0.0.1:25"}),
    "smarthost": dict(smarthost="[local.example.test]"),
    "smarthost by MX": dict(smarthost="alsome.example.test"),
    "relay domain's internal host": dict(relay_domains={"x.test": "[127.0.0.1]:25"}),
}


@pytest.mark.parametrize("how", list(LOOPS))
def test_every_configured_next_hop_that_is_us_is_a_loop(how):
    """A transport, smarthost or relay-domain next hop that is this server (one of
    our names, or an address and port of our listener) is deferred as a loop
    (451 4.4.6, a configuration error) without a connection."""
    connect = FakeConnect()
    r = router(connect=connect, own_names=("out.example.net",), own_endpoint=Ours(),
               **LOOPS[how])
    report = result(route(r, "a@x.test").target.deliver(message("a@x.test")))
    reply = report.replies["a@x.test"]
    assert (reply.code, reply.enhanced) == (451, (4, 4, 6)) and "loops back" in reply.text
    assert connect.calls == []


def test_next_hop_on_our_machine_at_another_port_is_not_us():
    """A content filter on 127.0.0.1:10025 is somebody else, not a loop."""
    connect = FakeConnect()
    r = router({"x.test": "smtp:[127.0.0.1]:10025"}, connect=connect, own_endpoint=Ours())
    assert result(route(r, "a@x.test").target.deliver(message("a@x.test"))).replies[
        "a@x.test"] == OK
