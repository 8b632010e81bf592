"""MXResolver and RemoteDelivery over a fake resolver and a fake connect."""

from __future__ import annotations

import ipaddress
import random
from typing import Dict, Optional

import pytest
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from mailserver import reply as R
from mailserver.delivery.interfaces import (
    DeliveryReport, IDeliveryTarget, OutboundMessage, OutboundRecipient,
)
from mailserver.delivery.loops import LocalAddresses, OwnListeners
from mailserver.delivery.mx import Destination, MXResolver
from mailserver.delivery.remote import RemoteDelivery, TLSPolicy, soften, tls_policy_for
from mailserver.errors import PermFailure, TempFailure
from mailserver.reply import Reply
from tests.support.dns import FakeResolver

_trial = SynchronousTestCase()

ZONES = {
    "example.test": {
        "@": {"MX": [[20, "mx2"], [10, "mx1"], [30, "mx3"]]},
        "mx1": {"A": "192.0.2.1", "AAAA": "2001:db8::1"},
        "mx2": {"A": ["192.0.2.2"]},
        "mx3": {"A": ["192.0.2.3", "192.0.2.33"]},
        "flat": {"A": "192.0.2.10", "AAAA": ["2001:db8::10", "2001:db8::11"]},
        "bare": {"TXT": "no mail here"},
        "null": {"MX": [[0, "."]]},
        "nullmix": {"MX": [[0, "."], [10, "mx2"]]},
        "bad": {"servfail": ["MX"]},
        "slow": {"timeout": True},
        "shut": {"refused": True},
        "alias": {"MX": [[10, "www"], [20, "mx2"]]},
        "www": {"CNAME": "mx1"},
        "onlyalias": {"MX": [[10, "www"]]},
        "noaddr": {"MX": [[10, "ghost"], [20, "void"]]},
        "void": {"TXT": "nothing"},
        "halfslow": {"MX": [[10, "slow"], [20, "mx2"]]},
        "allslow": {"MX": [[10, "slow"]]},
        "eq": {"MX": [[10, "a"], [10, "b"], [10, "c"], [10, "d"], [5, "mx1"]]},
        "a": {"A": "192.0.2.51"}, "b": {"A": "192.0.2.52"}, "c": {"A": "192.0.2.53"},
        "d": {"A": "192.0.2.54"},
        "dup": {"MX": [[30, "mx1"], [10, "mx1"], [20, "mx2"]]},
        "cnamedomain": {"CNAME": "example.test"},
        "loop": {"MX": [[10, "me"], [20, "mx2"]]},
        "backup": {"MX": [[10, "mx1"], [20, "me"], [20, "mx2"], [30, "mx3"]]},
        "me": {"A": "198.51.100.7"},
        "myaddr": {"MX": [[10, "mine"]]},
        "mine": {"A": "198.51.100.7"},
        "alsome": {"MX": [[10, "local"]]},
        "local": {"A": "127.0.0.1"},
        "backup2": {"MX": [[10, "mx1"], [20, "local"], [30, "mx3"]]},
    },
}

OWN = ("me.example.test", "198.51.100.7")


def result(coro):
    return _trial.successResultOf(defer.Deferred.fromCoroutine(coro))


def failure(coro, *kinds):
    return _trial.failureResultOf(defer.Deferred.fromCoroutine(coro), *kinds).value


def mx(zones=ZONES, **kw) -> MXResolver:
    kw.setdefault("rng", random.Random(1))
    return MXResolver(FakeResolver(zones, chase_cnames=kw.pop("chase", True)), **kw)


def hosts(destinations):
    return [d.host for d in destinations]


# -- MXResolver -------------------------------------------------------------------------

def test_mx_hosts_in_preference_order_with_addresses():
    got = result(mx().destinations("example.test"))
    assert got == [
        Destination("mx1.example.test", 10, ("2001:db8::1", "192.0.2.1")),
        Destination("mx2.example.test", 20, ("192.0.2.2",)),
        Destination("mx3.example.test", 30, ("192.0.2.3", "192.0.2.33")),
    ]


def test_equal_preferences_shuffled_by_the_injected_random():
    orders = {tuple(hosts(result(mx(rng=random.Random(seed)).destinations("eq.example.test"))))
              for seed in range(20)}
    assert len(orders) > 1
    for order in orders:
        assert order[0] == "mx1.example.test"  # preference 5 stays first
        assert sorted(order[1:]) == [f"{c}.example.test" for c in "abcd"]
    same = [tuple(hosts(result(mx(rng=random.Random(7)).destinations("eq.example.test"))))
            for _ in range(2)]
    assert same[0] == same[1]


def test_a_host_listed_twice_keeps_its_best_preference():
    got = result(mx().destinations("dup.example.test"))
    assert [(d.host, d.preference) for d in got] == [("mx1.example.test", 10),
                                                     ("mx2.example.test", 20)]


def test_null_mx_is_permanent_556():
    e = failure(mx().destinations("null.example.test"), PermFailure)
    assert (e.reply.code, e.reply.enhanced) == (R.NULL_MX.code, (5, 1, 10))
    assert "null.example.test" in e.reply.text


def test_null_target_among_other_mx_records_is_ignored():
    assert hosts(result(mx().destinations("nullmix.example.test"))) == ["mx2.example.test"]


def test_no_mx_falls_back_to_the_domains_own_addresses():
    got = result(mx().destinations("flat.example.test"))
    assert got == [Destination("flat.example.test", 0,
                               ("2001:db8::10", "192.0.2.10", "2001:db8::11"), implicit=True)]


def test_no_mx_and_no_address_is_permanent():
    e = failure(mx().destinations("bare.example.test"), PermFailure)
    assert (e.reply.code, e.reply.enhanced) == (550, (5, 4, 4))


def test_nxdomain_is_permanent_550_5_1_2():
    e = failure(mx().destinations("nosuch.example.test"), PermFailure)
    assert (e.reply.code, e.reply.enhanced) == (550, (5, 1, 2))
    assert "nosuch.example.test" in e.reply.text


@pytest.mark.parametrize("domain", ["bad.example.test", "slow.example.test", "shut.example.test"])
def test_servfail_timeout_and_refused_are_temporary_4_4_3(domain):
    e = failure(mx().destinations(domain), TempFailure)
    assert (e.reply.code, e.reply.enhanced) == (451, (4, 4, 3))


def test_mx_target_that_is_a_cname_is_skipped():
    resolver = mx()
    assert hosts(result(resolver.destinations("alias.example.test"))) == ["mx2.example.test"]
    e = failure(resolver.destinations("onlyalias.example.test"), TempFailure)
    assert (e.reply.code, e.reply.enhanced) == (451, (4, 4, 4))


def test_mx_hosts_without_addresses_skipped_then_no_usable_mx():
    e = failure(mx().destinations("noaddr.example.test"), TempFailure)
    assert e.reply.enhanced == (4, 4, 4)


def test_mx_host_whose_lookup_fails_is_skipped_and_reported_as_dns_trouble():
    assert hosts(result(mx().destinations("halfslow.example.test"))) == ["mx2.example.test"]
    e = failure(mx().destinations("allslow.example.test"), TempFailure)
    assert e.reply.enhanced == (4, 4, 3)


def test_recipient_domain_may_be_an_alias():
    """The domain's CNAME is followed, from a recursive answer or by asking again."""
    for chase in (True, False):
        got = result(mx(chase=chase).destinations("cnamedomain.example.test"))
        assert hosts(got) == ["mx1.example.test", "mx2.example.test", "mx3.example.test"]


def test_address_family_order_and_choice():
    ipv4_first = result(mx(families=("ipv4", "ipv6")).destinations("flat.example.test"))
    assert ipv4_first[0].addresses == ("192.0.2.10", "2001:db8::10", "2001:db8::11")
    only4 = result(mx(families=("ipv4",)).destinations("example.test"))
    assert only4[0].addresses == ("192.0.2.1",)
    with pytest.raises(ValueError):
        mx(families=("ipv5",))


@pytest.mark.parametrize("domain, address", [
    ("[192.0.2.9]", "192.0.2.9"),
    ("[IPv6:2001:db8::9]", "2001:db8::9"),
    ("[ipv6:2001:DB8:0::9]", "2001:db8::9"),
])
def test_address_literal_needs_no_dns(domain, address):
    fake = FakeResolver(ZONES)
    got = result(MXResolver(fake).destinations(domain))
    assert got == [Destination(address, 0, (address,), implicit=True)]
    assert fake.queries == []


def test_loop_when_we_are_the_best_mx():
    e = failure(mx(own_names=OWN).destinations("loop.example.test"), PermFailure)
    assert (e.reply.code, e.reply.enhanced) == (554, (5, 4, 6))


def test_backup_mx_relays_only_to_better_hosts():
    got = result(mx(own_names=OWN).destinations("backup.example.test"))
    assert hosts(got) == ["mx1.example.test"]


def test_loop_detected_by_address_and_for_literals():
    by_address = failure(mx(own_names=OWN).destinations("myaddr.example.test"), PermFailure)
    assert by_address.reply.enhanced == (5, 4, 6)
    assert failure(mx(own_names=OWN).destinations("[198.51.100.7]"), PermFailure).reply.code == 554
    assert failure(mx(own_names=["me.example.test"]).destinations("me.example.test"),
                   PermFailure).reply.code == 554


class FakeEndpoints:
    """``own_endpoint`` for tests: ``(address, port)`` pairs that are us."""

    def __init__(self, *ours):
        self.ours = set(ours)
        self.asked = []

    def __call__(self, address, port):
        self.asked.append((address, port))
        return (address, port) in self.ours


def test_loop_detected_by_address_and_port_of_our_listener():
    """An MX under another name whose address and port reach our listener is us."""
    us = FakeEndpoints(("127.0.0.1", 25))
    e = failure(mx(own_endpoint=us).destinations("alsome.example.test", 25), PermFailure)
    assert (e.reply.code, e.reply.enhanced) == (554, (5, 4, 6))
    assert ("127.0.0.1", 25) in us.asked
    assert hosts(result(mx(own_endpoint=us).destinations("backup2.example.test", 25))) == [
        "mx1.example.test"]
    assert failure(mx(own_endpoint=us).destinations("local.example.test", 25),
                   PermFailure).reply.code == 554  # implicit MX
    assert failure(mx(own_endpoint=us).destinations("[127.0.0.1]", 25),
                   PermFailure).reply.code == 554  # address literal


def test_same_address_at_another_port_is_not_us():
    """Another server on this machine (another port) is a fine destination."""
    us = FakeEndpoints(("127.0.0.1", 25))
    got = result(mx(own_endpoint=us).destinations("alsome.example.test", 2525))
    assert hosts(got) == ["local.example.test"]
    assert hosts(result(mx(own_endpoint=us).destinations("alsome.example.test"))) == [
        "local.example.test"]  # no port given: only own_names count


def test_own_listeners():
    """A wildcard listener is reached through any local address at its port; one
    bound to an address only through that address."""
    local = {"127.0.0.1", "127.0.0.2", "192.0.2.2", "::1"}
    ours = OwnListeners([("", 25), ("127.0.0.1", 2525), ("::", 587), ("unix-like", 9)],
                        is_local=local.__contains__)
    assert ours("192.0.2.2", 25) and ours("127.0.0.2", 25) and ours("::1", 587)
    assert ours("127.0.0.1", 2525) and ours("::ffff:127.0.0.1", 2525)
    assert not ours("127.0.0.2", 2525)   # bound to 127.0.0.1 only
    assert not ours("127.0.0.1", 2526)   # somebody else's port
    assert not ours("192.0.2.99", 25)    # not this machine
    assert not ours("mx.example.test", 25)


def test_local_addresses_loopback_and_bind_test():
    """Loopback and unspecified addresses are local without a socket; others
    are local when a UDP socket can be bound to them."""
    probed = []
    la = LocalAddresses()
    la._bindable = lambda ip: probed.append(ip.compressed) or ip.compressed == "192.0.2.2"
    assert la("127.0.0.5") and la("::1") and la("0.0.0.0") and la("::ffff:127.0.0.1")
    assert probed == []
    assert la("192.0.2.2") and not la("192.0.2.99") and not la("not an address")
    assert probed == ["192.0.2.2", "192.0.2.99"]
    assert LocalAddresses._bindable(ipaddress.ip_address("127.0.0.1"))
    assert not LocalAddresses._bindable(ipaddress.ip_address("198.51.100.254"))


def test_local_addresses_are_cached_for_a_while_and_bounded():
    now = [0.0]
    probed = []
    la = LocalAddresses(ttl=60, max_size=2, clock=lambda: now[0])
    la._bindable = lambda ip: probed.append(ip.compressed) or False
    la("192.0.2.1"), la("192.0.2.1")
    assert probed == ["192.0.2.1"]
    now[0] = 61
    la("192.0.2.1")
    assert probed == ["192.0.2.1"] * 2
    la("192.0.2.2"), la("192.0.2.3")
    assert len(la._cache) == 2


def test_utf8_domain_is_looked_up_as_a_label():
    fake = FakeResolver({"xn--bcher-kva.test": {"@": {"MX": [[10, "mx.example.test"]]}},
                         "example.test": {"mx": {"A": "192.0.2.1"}}})
    assert hosts(result(MXResolver(fake).destinations("bücher.test"))) == ["mx.example.test"]
    assert fake.queries[0] == ("xn--bcher-kva.test", "MX")


# -- RemoteDelivery -------------------------------------------------------------------

def message(*rcpts: str, queue_id: str = "Q1") -> OutboundMessage:
    rcpts = rcpts or ("alice@example.test",)
    return OutboundMessage(queue_id=queue_id, sender="bob@sender.test",
                           recipients=tuple(OutboundRecipient(r) for r in rcpts),
                           content_path="/nonexistent", size=10)


OK = R.R(250, "2.0.0", "Ok: queued as REMOTE")


class FakeConnect:
    """Outcome per address: an exception, ``(reply, retry_elsewhere)``, or a
    dict ``{rcpt: reply}`` (RCPT-level, final).  Unlisted addresses accept."""

    def __init__(self, outcomes: Optional[Dict[str, object]] = None) -> None:
        self.outcomes = outcomes or {}
        self.calls = []

    def __call__(self, reactor, host, port, msg, **kw):
        self.calls.append(dict(kw, host=host, port=port, rcpts=[r.address for r in msg.recipients]))
        outcome = self.outcomes.get(host, (OK, False))
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        if isinstance(outcome, dict):
            replies = {r.address: outcome.get(r.address, OK) for r in msg.recipients}
            details = {a: str(v) for a, v in replies.items()}
            return defer.succeed((DeliveryReport(replies, details=details), False))
        reply, elsewhere = outcome
        replies = {r.address: reply for r in msg.recipients}
        return defer.succeed((DeliveryReport(replies), elsewhere))


def remote(connect, **kw) -> RemoteDelivery:
    kw.setdefault("rng", random.Random(1))
    return RemoteDelivery(FakeResolver(ZONES), connect, helo="out.example.net", reactor=object(),
                          **kw)


def test_provides_idelivery_target():
    assert IDeliveryTarget.providedBy(remote(FakeConnect()))


def test_first_mx_answers():
    connect = FakeConnect()
    report = result(remote(connect).deliver(message("a@example.test", "b@example.test")))
    assert report.replies == {"a@example.test": OK, "b@example.test": OK}
    assert report.remote == "mx1.example.test[2001:db8::1]:25"
    assert connect.calls[0]["helo"] == "out.example.net"
    assert connect.calls[0]["tls_hostname"] == "mx1.example.test"
    assert connect.calls[0]["rcpts"] == ["a@example.test", "b@example.test"]


def test_ipv6_then_ipv4_then_next_mx():
    refused = net_error.ConnectionRefusedError()
    connect = FakeConnect({"2001:db8::1": net_error.NoRouteError(), "192.0.2.1": refused})
    report = result(remote(connect).deliver(message()))
    assert [c["host"] for c in connect.calls] == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]
    assert report.replies["alice@example.test"] == OK
    assert report.remote == "mx2.example.test[192.0.2.2]:25"


def test_every_host_down_gives_the_last_temporary_error_to_all():
    down = {a: net_error.ConnectionRefusedError() for a in
            ("2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.33")}
    connect = FakeConnect(down)
    report = result(remote(connect).deliver(message("a@example.test", "b@example.test")))
    reply = report.replies["a@example.test"]
    assert reply == report.replies["b@example.test"]
    assert (reply.code, reply.enhanced) == (451, (4, 4, 1))
    assert reply.text == "Connection refused by mx3.example.test[192.0.2.33]:25"
    assert len(connect.calls) == 5


def test_address_limit_bounds_an_attempt():
    addresses = ("2001:db8::1", "192.0.2.1", "192.0.2.2")
    connect = FakeConnect({a: net_error.TCPTimedOutError() for a in addresses})
    report = result(remote(connect, max_addresses=2).deliver(message()))
    assert len(connect.calls) == 2
    assert report.replies["alice@example.test"].text == (
        "Connection timed out to mx1.example.test[192.0.2.1]:25")


def test_rcpt_results_are_passed_through_and_final():
    later = R.R(450, "4.2.0", "Mailbox busy")
    unknown = R.R(550, "5.1.1", "No such user")
    connect = FakeConnect({"2001:db8::1": {"b@example.test": later, "c@example.test": unknown}})
    rcpts = ("a@example.test", "b@example.test", "c@example.test")
    report = result(remote(connect).deliver(message(*rcpts)))
    assert report.replies == dict(zip(rcpts, (OK, later, unknown)))
    assert report.details["c@example.test"] == str(unknown)
    assert len(connect.calls) == 1


def test_connection_level_4xx_moves_on():
    busy = R.R(421, "4.3.2", "Too busy")
    connect = FakeConnect({"2001:db8::1": (busy, True)})
    report = result(remote(connect).deliver(message()))
    assert report.replies["alice@example.test"] == OK
    assert len(connect.calls) == 2


def test_backup_refusing_does_not_bounce_while_primary_is_down():
    greeting_5xx = R.R(554, "5.7.1", "Not accepting relay")
    connect = FakeConnect({"2001:db8::1": net_error.ConnectionRefusedError(),
                           "192.0.2.1": net_error.ConnectionRefusedError(),
                           "192.0.2.2": (greeting_5xx, True), "192.0.2.3": (greeting_5xx, True),
                           "192.0.2.33": (greeting_5xx, True)})
    report = result(remote(connect).deliver(message()))
    assert report.replies["alice@example.test"].code == 451
    assert "mx1.example.test[192.0.2.1]" in report.replies["alice@example.test"].text


def test_permanent_everywhere_is_permanent():
    greeting_5xx = R.R(554, "5.3.2", "No mail accepted")
    connect = FakeConnect({a: (greeting_5xx, True) for a in
                           ("2001:db8::1", "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.33")})
    assert result(remote(connect).deliver(message())).replies["alice@example.test"] == greeting_5xx


def test_recipients_accepted_before_a_connection_failure_are_not_sent_again():
    def partial(reactor, host, port, msg, **kw):
        calls.append([r.address for r in msg.recipients])
        if host == "2001:db8::1":
            return (DeliveryReport({"a@example.test": OK,
                                    "b@example.test": R.R(421, "4.4.2", "Lost connection")}), True)
        return (DeliveryReport({r.address: OK for r in msg.recipients}), False)

    calls = []
    report = result(remote(partial).deliver(message("a@example.test", "b@example.test")))
    assert calls == [["a@example.test", "b@example.test"], ["b@example.test"]]
    assert report.replies == {"a@example.test": OK, "b@example.test": OK}


def test_unknown_exception_is_internal_error_and_stops():
    connect = FakeConnect({"2001:db8::1": ZeroDivisionError("bug")})
    with capturedLogs() as events:
        report = result(remote(connect).deliver(message()))
    assert report.replies["alice@example.test"].enhanced == (4, 3, 0)
    assert "Q1" in report.replies["alice@example.test"].text
    assert len(connect.calls) == 1
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [ZeroDivisionError]


def test_unsendable_address_is_a_permanent_refusal_not_an_internal_error():
    """With the real connect, an address no RCPT can carry bounces at once
    (553 5.1.3), without a connection or a logged traceback."""
    from twisted.internet.testing import MemoryReactorClock

    from mailserver.protocols.outbound import deliver_to_host

    reactor = MemoryReactorClock()
    target = RemoteDelivery(FakeResolver(ZONES), deliver_to_host, helo="out.example.net",
                            reactor=reactor, rng=random.Random(1))
    with capturedLogs() as events:
        report = result(target.deliver(message("john doe@example.test")))
    reply = report.replies["john doe@example.test"]
    assert (reply.code, reply.enhanced) == (553, (5, 1, 3))
    assert not reactor.tcpClients
    assert not [e for e in events if "log_failure" in e]


def test_mx_that_reaches_our_own_listener_is_a_loop_without_connecting():
    """RemoteDelivery asks own_endpoint with the port it would connect to."""
    connect = FakeConnect()
    us = FakeEndpoints(("127.0.0.1", 25))
    report = result(remote(connect, own_endpoint=us).deliver(message("x@alsome.example.test")))
    reply = report.replies["x@alsome.example.test"]
    assert (reply.code, reply.enhanced) == (554, (5, 4, 6)) and connect.calls == []
    report = result(remote(connect, own_endpoint=us).via("alsome.example.test", 2525)
                    .deliver(message("x@elsewhere.test")))
    assert report.replies["x@elsewhere.test"] == OK
    assert (connect.calls[0]["host"], connect.calls[0]["port"]) == ("127.0.0.1", 2525)


def test_missing_result_for_a_recipient_is_temporary():
    def forgetful(reactor, host, port, msg, **kw):
        return (DeliveryReport({"a@example.test": OK}), False)

    report = result(remote(forgetful).deliver(message("a@example.test", "b@example.test")))
    assert report.replies["b@example.test"].code == 451


def test_dns_verdict_goes_to_every_recipient_without_connecting():
    connect = FakeConnect()
    report = result(remote(connect).deliver(message("a@null.example.test", "b@null.example.test")))
    assert {r.code for r in report.replies.values()} == {556}
    report = result(remote(connect).deliver(message("a@slow.example.test")))
    assert report.replies["a@slow.example.test"].enhanced == (4, 4, 3)
    assert connect.calls == []


def test_address_literal_delivery_and_port():
    connect = FakeConnect()
    report = result(remote(connect, port=2525).deliver(message("x@[192.0.2.99]")))
    assert connect.calls[0]["host"] == "192.0.2.99" and connect.calls[0]["port"] == 2525
    assert connect.calls[0]["tls_hostname"] is None
    assert report.remote == "192.0.2.99:2525"


def test_tls_policy_by_domain_is_passed_to_connect():
    connect = FakeConnect()
    policy = {"example.test": TLSPolicy("verify", trust_root="ca"), "*": "encrypt"}
    target = remote(connect, tls_policy=policy)
    result(target.deliver(message("a@example.test")))
    result(target.deliver(message("a@flat.example.test")))
    assert [(c["tls"], c["trust_root"]) for c in connect.calls] == [("verify", "ca"),
                                                                    ("encrypt", None)]


def test_mixed_domains_are_delivered_domain_by_domain():
    connect = FakeConnect()
    report = result(remote(connect).deliver(message("a@example.test", "b@flat.example.test")))
    assert set(report.replies) == {"a@example.test", "b@flat.example.test"}
    assert [c["rcpts"] for c in connect.calls] == [["a@example.test"], ["b@flat.example.test"]]


def test_via_a_configured_nexthop():
    connect = FakeConnect()
    target = remote(connect).via("example.test", 587)
    assert IDeliveryTarget.providedBy(target)
    report = result(target.deliver(message("someone@elsewhere.test")))
    assert report.replies["someone@elsewhere.test"] == OK
    assert (connect.calls[0]["host"], connect.calls[0]["port"]) == ("2001:db8::1", 587)


def test_via_a_nexthop_that_does_not_exist_is_temporary():
    target = remote(FakeConnect()).via("nosuch.example.test")
    report = result(target.deliver(message("x@other.test")))
    reply = report.replies["x@other.test"]
    assert (reply.code, reply.enhanced) == (451, (4, 1, 2))


# -- small helpers ---------------------------------------------------------------------

def test_tls_policy_lookup():
    spec = {"example.org": "verify", ".example.org": "encrypt", "*": "none"}
    assert tls_policy_for(spec, "example.org").mode == "verify"
    assert tls_policy_for(spec, "a.b.example.org").mode == "encrypt"
    assert tls_policy_for(spec, "other.net").mode == "none"
    assert tls_policy_for({}, "x.net").mode == "may"
    assert tls_policy_for(None, "x.net").mode == "may"
    assert tls_policy_for(lambda name: "encrypt", "x.net").mode == "encrypt"
    with pytest.raises(ValueError):
        TLSPolicy("sometimes")


def test_soften():
    assert soften(R.NULL_MX) == Reply(451, (4, 1, 10), R.NULL_MX.text)
    assert soften(OK) is OK
