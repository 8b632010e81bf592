"""Corporate relay domains: config checks, directory resolution, RCPT policy,
the delivery step and routing to the internal host."""

from __future__ import annotations

import re

import pytest
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mailserver import reply as R
from mailserver.config import load_config
from mailserver.delivery.local import LocalDelivery
from mailserver.delivery.recipients import Message, RecipientDelivery, Target
from mailserver.delivery.relaydomains import parse_internal_host, relay_next_hops
from mailserver.delivery.routing import FixedHostTarget
from mailserver.directory.interfaces import Resolution
from mailserver.directory.ldap import LDAPSettings
from mailserver.directory.ldif import embedded_directory
from mailserver.errors import ConfigError
from mailserver.policy import RecipientPolicy
from mailserver.store.maildir import MaildirStore
from mailserver.testing import (FakeDirectory, ImmediateReactor, RecordingOutbox,
                                SynchronousThreadPool)
from tests.support.directory import result_of, sync_directory_kwargs
from tests.unit.test_config import MINIMAL, cfgdir, write  # noqa: F401  (fixture)
from tests.unit.test_routing import route, router

_trial = SynchronousTestCase()

CORP = "corp.example.test"

# -- configuration ------------------------------------------------------------


RELAY = MINIMAL.replace('local = ["example.test"]',
                        'local = ["example.test"]\nrelay = ["corp.example.test"]')


@pytest.mark.parametrize("extra, key, problem", [
    ("", "relay.internal", "corp.example.test has no next hop"),
    ('[relay.internal]\n"other.example" = "smtp:[10.0.0.1]"\n', "relay.internal.other.example",
     "is not in domains.relay"),
    ('[relay.internal]\n"corp.example.test" = "local"\n', "relay.internal.corp.example.test",
     "not an smtp: or lmtp: next hop"),
    ('[relay.internal]\n"corp.example.test" = "smtp:"\n', "relay.internal.corp.example.test",
     "not an smtp: or lmtp: next hop"),
    ('[relay]\ninternal_host = "smtp:[exchange"\n', "relay.internal_host", "missing ']'"),
    ('[relay]\ninternal_host = "[10.0.0.1]"\n[relay.transports]\n"corp.example.test" = '
     '"smtp:[10.0.0.2]"\n', "relay.transports.corp.example.test", "give its next hop"),
])
def test_relay_domain_config_errors(cfgdir, extra, key, problem):
    """Every relay domain needs a fixed SMTP/LMTP next hop; errors name the key."""
    with pytest.raises(ConfigError, match=re.escape(f"{key}: ") + ".*" + re.escape(problem)):
        load_config(write(cfgdir, RELAY + extra))


def test_domain_cannot_be_local_and_relay(cfgdir):
    """A domain in both lists is refused at start."""
    text = MINIMAL.replace('local = ["example.test"]',
                           'local = ["example.test"]\nrelay = ["Example.TEST"]')
    with pytest.raises(ConfigError, match="domains.relay: example.test is also in domains.local"):
        load_config(write(cfgdir, text + '[relay]\ninternal_host = "[10.0.0.1]"\n'))


def test_relay_only_configuration_loads(cfgdir):
    """A pure corporate relay needs no local domain; internal_host is the default hop."""
    text = MINIMAL.replace('local = ["example.test"]',
                           'relay = ["corp.example.test", "Sales.Example.TEST."]')
    text += ('[relay]\ninternal_host = "smtp:[exchange.corp.example.test]:25"\n'
             '[relay.internal]\n"sales.example.test" = "lmtp:unix:/run/lmtp"\n')
    c = load_config(write(cfgdir, text))
    assert c.domains.local == () and c.domains.relay == (CORP, "sales.example.test")
    hops = relay_next_hops(c.domains.local, c.domains.relay, c.relay.internal,
                           c.relay.internal_host)
    assert hops[CORP].nexthop == "[exchange.corp.example.test]:25"
    assert hops["sales.example.test"].unix_path == "/run/lmtp"


def test_internal_host_accepts_relayhost_form():
    """``[host]:port`` is taken as smtp:, like Postfix's relayhost."""
    assert parse_internal_host("[10.1.2.3]:2525", "k").nexthop == "[10.1.2.3]:2525"
    assert parse_internal_host("lmtp:10.1.2.3:24", "k").kind == "lmtp"


# -- the directory -------------------------------------------------------------

LDIF = """
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: uid=ann,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: inetLocalMailRecipient
uid: ann
cn: Ann
sn: Archer
mail: ann@corp.example.test
mailLocalAddress: ann.archer@corp.example.test

dn: uid=alice,dc=example,dc=test
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: Liddell
mail: alice@example.test

dn: cn=staff,dc=example,dc=test
objectClass: groupOfNames
objectClass: inetLocalMailRecipient
cn: staff
mailLocalAddress: staff@corp.example.test
member: uid=ann,dc=example,dc=test
member: uid=alice,dc=example,dc=test

dn: cn=friends,dc=example,dc=test
objectClass: nisMailAlias
objectClass: inetLocalMailRecipient
cn: friends
mailLocalAddress: friends@corp.example.test
rfc822MailMember: ann.archer@corp.example.test
rfc822MailMember: pat@partner.example
"""


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "users.ldif"
    path.write_text(LDIF)
    settings = LDAPSettings(local_domains=("example.test",), relay_domains=(CORP,))
    return embedded_directory(str(path), settings, **sync_directory_kwargs())


def resolve(directory, address):
    return result_of(directory.resolve(address))


def test_relay_domain_user_is_relayed_not_a_mailbox(directory):
    """A user whose primary address is in a relay domain is relayed by that
    address, by any of its addresses, and never becomes a maildir."""
    for address in ("ann@corp.example.test", "Ann.Archer@corp.example.test"):
        result = resolve(directory, address)
        assert result.mailboxes == () and result.forwards == ()
        assert result.relayed == ("ann@corp.example.test",)
        assert result.found


def test_group_mixes_relayed_and_local_members(directory):
    """A relay-domain group expands: relay members relayed, local members mailboxes."""
    result = resolve(directory, "staff@corp.example.test")
    assert result.relayed == ("ann@corp.example.test",)
    assert [m.address for m in result.mailboxes] == ["alice@example.test"]


def test_alias_targets_in_a_relay_domain_are_resolved_not_forwarded(directory):
    """An alias target in a relay domain is looked up (relayed); outside ones are forwards."""
    result = resolve(directory, "friends@corp.example.test")
    assert result.relayed == ("ann@corp.example.test",)
    assert result.forwards == ("pat@partner.example",)


def test_unknown_relay_domain_address(directory):
    """An address of a relay domain with no entry is unknown."""
    assert not resolve(directory, "nobody@corp.example.test").found


# -- RCPT policy -----------------------------------------------------------------

def decide(policy, rcpt, **kw):
    return _trial.successResultOf(defer.ensureDeferred(policy.check_rcpt(rcpt, "x@far.example",
                                                                         **kw)))


def test_policy_checks_relay_domain_recipients_from_anyone(directory):
    """Anyone may send to a known relay-domain recipient; unknown is 550 5.1.1."""
    policy = RecipientPolicy(directory, ["example.test"], relay_domains=[CORP])
    ok = decide(policy, "ann@CORP.example.test", client_ip="203.0.113.9")
    assert ok.reply == R.RCPT_OK and ok.resolution.relayed == ("ann@corp.example.test",)
    assert decide(policy, "nobody@corp.example.test").reply == R.RCPT_UNKNOWN
    assert decide(policy, "ann@sub.corp.example.test").reply == R.RELAY_DENIED


def test_policy_outage_in_a_relay_domain_is_temporary():
    """A directory that cannot answer is 451 4.4.3 for relay domains too."""
    fake = FakeDirectory({}, local_domains=("example.test",))
    fake.down = True
    policy = RecipientPolicy(fake, ["example.test"], relay_domains=[CORP])
    assert decide(policy, "ann@corp.example.test").reply == R.DIRECTORY_UNAVAILABLE


def test_lmtp_refuses_relay_domains(directory):
    """LMTP is final delivery here: a relay-domain recipient is 550 5.1.1."""
    policy = RecipientPolicy(directory, ["example.test"], lmtp=True, relay_domains=[CORP])
    assert decide(policy, "ann@corp.example.test").reply == R.RCPT_UNKNOWN


def test_postmaster_of_a_pure_relay(directory):
    """Without local domains, a bare postmaster is the first relay domain's."""
    policy = RecipientPolicy(directory, [], relay_domains=[CORP])
    assert policy.normalise("postmaster") == "postmaster@corp.example.test"


# -- the delivery step -------------------------------------------------------------

def deliver_step(tmp_path, targets, srs=None):
    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
    local = LocalDelivery(store, SynchronousThreadPool(), ImmediateReactor())
    outbox = RecordingOutbox()
    content = tmp_path / "content"
    content.write_bytes(b"Subject: q\r\n\r\nbody\r\n")
    step = RecipientDelivery(local, outbox, srs, clock=ImmediateClock())
    outcomes = _trial.successResultOf(defer.ensureDeferred(step.deliver(
        Message("Q1", "x@far.example", str(content)), targets, requeue="always")))
    return outcomes, outbox.queued


class ImmediateClock:
    def seconds(self):
        return 1_800_000_000.0


def test_relayed_addresses_are_queued_with_the_original_sender(tmp_path, directory):
    """Relayed addresses go into the queue with the sender as it came, never
    through SRS and never into a maildir; forwards still take the SRS sender."""
    from mailserver.srs import SRS

    srs = SRS("secret", "example.test", clock=lambda: 1_800_000_000.0)
    target = Target("friends@corp.example.test", resolve(directory, "friends@corp.example.test"))
    [outcome], queued = deliver_step(tmp_path, [target], srs=srs)
    assert outcome.reply.is_positive and outcome.queued
    by_sender = {q["sender"]: [a for a, _o in q["recipients"]] for q in queued}
    assert by_sender.pop("x@far.example") == ["ann@corp.example.test"]
    [(srs_sender, forwards)] = by_sender.items()
    assert srs_sender.startswith("SRS0=") and forwards == ["pat@partner.example"]
    assert not (tmp_path / "mail").exists() or not any((tmp_path / "mail").rglob("new/*"))


def test_group_member_in_a_relay_domain_gets_no_maildir(tmp_path, directory):
    """Of a group, the local member gets a maildir copy and the relay member is queued."""
    target = Target("staff@corp.example.test", resolve(directory, "staff@corp.example.test"))
    [outcome], queued = deliver_step(tmp_path, [target])
    assert outcome.reply.is_positive
    assert [a for a, _o in queued[0]["recipients"]] == ["ann@corp.example.test"]
    boxes = sorted(p.parent.parent.relative_to(tmp_path / "mail").as_posix()
                   for p in (tmp_path / "mail").rglob("new/*"))
    assert boxes == ["example.test/alice"]


def test_relayed_resolution_is_found_without_mailboxes():
    """A resolution with only relayed addresses counts as found."""
    assert Resolution("a@corp.example.test", relayed=("a@corp.example.test",)).found


# -- routing -----------------------------------------------------------------------

def test_relay_domains_route_to_their_internal_host_first():
    """A relay domain goes to its next hop before the transport map, the
    local domains and MX; its subdomains and other domains do not."""
    r = router({".example.test": "smtp:[transport.example.net]", "*": "smtp:[star.example.net]"},
               local_domains=("example.test", CORP),
               relay_domains={CORP: "smtp:[exchange.corp.example.test]:2525",
                              "lmtp.example.test": "lmtp:unix:/run/internal.sock"})
    hop = route(r, "ann@Corp.Example.Test")
    assert hop.kind == "smtp" and hop.nexthop == "[exchange.corp.example.test]:2525"
    assert isinstance(hop.target, FixedHostTarget) and hop.target.port == 2525
    assert route(r, "x@lmtp.example.test").nexthop == "unix:/run/internal.sock"
    assert route(r, "a@sub.corp.example.test").nexthop == "[transport.example.net]:25"
    assert route(r, "alice@example.test").kind == "local"


def test_lookup_prints_relayed_addresses(directory):
    """``mailserverctl lookup`` lists a relay-domain user under relayed."""
    import io

    from mailserver.ctl import print_resolution

    out = io.StringIO()
    print_resolution(resolve(directory, "ann.archer@corp.example.test"), out)
    text = out.getvalue()
    assert "mailboxes: 0" in text
    assert "relayed (to the relay domain's internal host): 1\n  ann@corp.example.test" in text


def test_mailserverctl_lookup_names_a_relay_domain(tmp_path, capsys):
    """``mailserverctl lookup`` says a relay domain's mail goes to its internal host."""
    from mailserver.ctl import main

    (tmp_path / "users.ldif").write_text(LDIF)
    config = tmp_path / "c.toml"
    config.write_text(f"""
[server]
base_dir = "{tmp_path}"
[domains]
local = ["example.test"]
relay = ["corp.example.test"]
[relay]
internal_host = "[10.0.0.25]:25"
[directory]
ldif_file = "users.ldif"
[[listeners]]
address = "127.0.0.1:2525"
""")
    assert main(["lookup", "Ann@corp.example.test", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "in relay domain corp.example.test: relayed to its internal host" in out
    assert out.endswith("domain corp.example.test: relay (mail goes to its internal host)\n")
