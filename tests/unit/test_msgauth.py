"""SPF, DKIM, ARC and DMARC on the MX, with fake DNS (no network)."""

from __future__ import annotations

import itertools
import os

import dns.resolver
import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from mailserver import reply as R
from mailserver.incoming import IncomingMessage
from mailserver.msgauth.dkim_verify import (ARCResult, DKIMResult, header_fields, verify_arc,
                                            verify_dkim)
from mailserver.msgauth.dmarc import (DMARCResult, author_domains, evaluate,
                                      organisational_domain, parse_record)
from mailserver.msgauth.inbound import InboundAuth, Settings, decide
from mailserver.msgauth.lookups import DNSTrouble, Lookups, nameserver_addresses
from mailserver.msgauth.results import authentication_results, authserv_id
from mailserver.msgauth.spf_check import SPFResult, check_spf
from mailserver.msgauth.strip import ARFilter, rewrite_without
from mailserver.pipeline.session import Session, Transaction
from mailserver.policy import Networks
from tests.support.msgauth import Ed25519Key, FakeResolver, RSAKey, arc_seal, message, sign

OURS = "mx.example.test"


def lookups(records: dict, budget: float = 5.0) -> Lookups:
    return Lookups(FakeResolver(records), budget)


@pytest.fixture(scope="module")
def keys():
    return {"ed": Ed25519Key(), "rsa": RSAKey()}


# -- DNS -------------------------------------------------------------------------------
def test_lookups_kinds_of_answer():
    lk = lookups({("a.test", "TXT"): ["x" * 300], ("bad.test", "TXT"): "servfail",
                  ("slow.test", "TXT"): "timeout"})
    assert lk.txt_strings("a.test") == [b"x" * 300]  # strings of one record joined
    assert lk.txt_strings("none.test") == [] and "none.test" in lk.missing
    with pytest.raises(DNSTrouble):
        lk.query("bad.test", "TXT")
    with pytest.raises(DNSTrouble):
        lk.query("slow.test", "TXT")


def test_lookups_budget_is_shared():
    now = [100.0]
    lk = Lookups(FakeResolver({}), 2.0, clock=lambda: now[0])
    assert lk.query("a.test", "TXT") == []
    now[0] += 2.5
    with pytest.raises(DNSTrouble, match="budget"):
        lk.query("a.test", "TXT")


def test_nameserver_addresses():
    assert nameserver_addresses(["192.0.2.1", "127.0.0.1:5353", "::1"]) == [
        ("192.0.2.1", 53), ("127.0.0.1", 5353), ("::1", 53)]


# -- SPF --------------------------------------------------------------------------------
SPF_ZONE = {
    ("example.org", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("soft.example", "TXT"): ["v=spf1 ~all"],
    ("helo.example", "TXT"): ["v=spf1 a -all"],
    ("helo.example", "A"): ["192.0.2.7"],
    ("broken.example", "TXT"): "servfail",
    ("neutral.example", "TXT"): ["v=spf1 ?all"],
}


@pytest.mark.parametrize("ip,sender,helo,result", [
    ("192.0.2.1", "a@example.org", "x.example", "pass"),
    ("192.0.2.9", "a@example.org", "x.example", "fail"),
    ("192.0.2.9", "a@soft.example", "x.example", "softfail"),
    ("192.0.2.9", "a@neutral.example", "x.example", "neutral"),
    ("192.0.2.9", "a@broken.example", "x.example", "temperror"),
    ("192.0.2.9", "a@nothing.example", "x.example", "none"),
])
def test_spf_results(ip, sender, helo, result):
    spf = check_spf(lookups(SPF_ZONE), ip, sender, helo)
    assert spf.result == result
    assert spf.identity == "mailfrom" and spf.domain == sender.split("@")[1]


def test_spf_null_sender_checks_helo():
    spf = check_spf(lookups(SPF_ZONE), "192.0.2.7", "", "helo.example")
    assert (spf.result, spf.identity, spf.value, spf.domain) == (
        "pass", "helo", "helo.example", "helo.example")
    assert check_spf(lookups(SPF_ZONE), "192.0.2.8", "", "helo.example").result == "fail"
    assert check_spf(lookups(SPF_ZONE), "192.0.2.8", "", "[192.0.2.8]").result == "none"


# -- DKIM and ARC ----------------------------------------------------------------------
def dkim_zone(keys, extra=None):
    zone = {("sel._domainkey.example.org", "TXT"): [keys["ed"].record],
            ("rsa._domainkey.example.org", "TXT"): [keys["rsa"].record],
            ("sel._domainkey.broken.example", "TXT"): "servfail"}
    zone.update(extra or {})
    return zone


def test_dkim_every_signature_has_its_result(keys):
    data = sign(message(), keys["ed"], "example.org")
    data = sign(data, keys["rsa"], "example.org", selector="rsa")
    data = sign(data, keys["ed"], "other.example")  # no key published
    data = sign(data, keys["ed"], "broken.example")  # DNS trouble
    results = verify_dkim(data, lookups(dkim_zone(keys)))
    assert [(r.result, r.domain, r.selector) for r in results] == [
        ("temperror", "broken.example", "sel"), ("permerror", "other.example", "sel"),
        ("pass", "example.org", "rsa"), ("pass", "example.org", "sel")]
    assert results[2].algorithm == "rsa-sha256" and results[3].algorithm == "ed25519-sha256"
    assert results[3].b and len(results[3].b) == 8


def test_dkim_altered_body_fails(keys):
    data = sign(message(), keys["ed"], "example.org") + b"P.S. added on the way\r\n"
    [result] = verify_dkim(data, lookups(dkim_zone(keys)))
    assert result.result == "fail" and "body hash" in result.reason


def test_dkim_altered_header_fails(keys):
    data = sign(message(), keys["ed"], "example.org").replace(b"Subject: hello",
                                                              b"Subject: HELLO there")
    [result] = verify_dkim(data, lookups(dkim_zone(keys)))
    assert result.result == "fail"


def test_dkim_unsigned_message_has_no_results(keys):
    assert verify_dkim(message(), lookups(dkim_zone(keys))) == []


def test_arc_chain_verified(keys):
    sealer = RSAKey()
    zone = dkim_zone(keys, {("arc._domainkey.list.example", "TXT"): [sealer.record]})
    first = b"Authentication-Results: list.example; dkim=pass\r\n" + sign(
        message(), keys["ed"], "example.org")
    sealed = arc_seal(first, sealer, "list.example", "list.example")
    arc = verify_arc(sealed, lookups(zone))
    assert (arc.result, arc.instance) == ("pass", 1)
    tampered = sealed.replace(b"Hello there.", b"Hello, changed.")
    assert verify_arc(tampered, lookups(zone)).result == "fail"
    assert verify_arc(message(), lookups(zone)).result == "none"
    assert verify_arc(b"garbage line\r\n" + sealed, lookups(zone)).result == "fail"
    broken = dict(zone)
    broken[("arc._domainkey.list.example", "TXT")] = "servfail"
    assert verify_arc(sealed, lookups(broken)).result == "temperror"


# -- DMARC -------------------------------------------------------------------------------
def test_parse_record():
    r = parse_record("v=DMARC1; p=reject; sp=quarantine; pct=50; adkim=s; rua=mailto:x@y")
    assert (r.policy, r.subdomain_policy, r.pct, r.adkim, r.aspf) == (
        "reject", "quarantine", 50, "s", "r")
    assert parse_record("v=DMARC1; p=none").subdomain_policy == "none"
    assert parse_record("p=reject; v=DMARC1") is None  # v= first
    assert parse_record("v=DMARC1; p=bogus") is None
    assert parse_record("v=DMARC1; p=bogus; rua=mailto:a@b").policy == "none"
    assert parse_record("v=spf1 -all") is None


def test_organisational_domain():
    assert organisational_domain("mail.example.co.uk") == "example.co.uk"
    assert organisational_domain("a.b.example.org") == "example.org"
    assert organisational_domain("example.org") == "example.org"


def test_author_domains():
    assert author_domains(["Alice <alice@Example.ORG>"]) == ["example.org"]
    assert author_domains([]) == []
    assert author_domains(["a@x.example", "b@y.example", "c@x.example"]) == [
        "x.example", "y.example"]
    assert author_domains(["a@x.example, b@y.example"]) == ["x.example", "y.example"]
    assert author_domains(["no address"]) == []


DMARC_ZONE = {
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=reject; sp=quarantine"],
    ("_dmarc.strict.example", "TXT"): ["v=DMARC1; p=reject; adkim=s; aspf=s"],
    ("_dmarc.q.example", "TXT"): ["v=DMARC1; p=quarantine; pct=50"],
    ("_dmarc.n.example", "TXT"): ["v=DMARC1; p=none"],
    ("_dmarc.two.example", "TXT"): ["v=DMARC1; p=reject", "v=DMARC1; p=none"],
    ("_dmarc.down.example", "TXT"): "servfail",
}


def spf(result, domain):
    return SPFResult(result, "mailfrom", f"x@{domain}", domain)


def dk(result, domain):
    return DKIMResult(result, domain=domain, selector="sel")


@pytest.mark.parametrize("from_domain,spf_r,dkim_r,want", [
    # aligned DKIM (relaxed: a sub-domain signature counts) or aligned SPF pass
    ("example.org", spf("fail", "example.org"), [dk("pass", "mail.example.org")],
     ("pass", "reject", "none")),
    ("example.org", spf("pass", "bounces.example.org"), [], ("pass", "reject", "none")),
    # unaligned passes do not count
    ("example.org", spf("pass", "evil.example"), [dk("pass", "evil.example")],
     ("fail", "reject", "reject")),
    # strict alignment: a sub-domain is not enough
    ("strict.example", spf("pass", "mail.strict.example"), [dk("pass", "a.strict.example")],
     ("fail", "reject", "reject")),
    ("strict.example", None, [dk("pass", "strict.example")], ("pass", "reject", "none")),
    # sp= for a sub-domain of the organisational domain
    ("news.example.org", None, [], ("fail", "quarantine", "quarantine")),
    ("n.example", None, [dk("fail", "n.example")], ("fail", "none", "none")),
    # no record, several records
    ("nothing.example", None, [], ("none", "", "none")),
    ("two.example", None, [], ("none", "", "none")),
    # DNS trouble: of the record, of an aligned check
    ("down.example", None, [dk("pass", "evil.example")], ("temperror", "", "none")),
    ("example.org", spf("temperror", "example.org"), [], ("temperror", "reject", "reject")),
    ("example.org", None, [dk("temperror", "example.org"), dk("fail", "example.org")],
     ("temperror", "reject", "reject")),
])
def test_dmarc(from_domain, spf_r, dkim_r, want):
    result = evaluate(lookups(DMARC_ZONE), [f"Someone <a@{from_domain}>"], spf_r, dkim_r)
    assert (result.result, result.policy, result.disposition) == want
    assert result.from_domain == from_domain


def test_dmarc_pct_samples():
    # pct=50: below the share the policy applies, above it the next milder one
    args = ([" <a@q.example>"], None, [])
    assert evaluate(lookups(DMARC_ZONE), *args, chance=lambda: 0.2).disposition == "quarantine"
    assert evaluate(lookups(DMARC_ZONE), *args, chance=lambda: 0.7).disposition == "none"


def test_dmarc_without_from_or_with_several():
    assert evaluate(lookups(DMARC_ZONE), ["undisclosed"], None, []).result == "permerror"
    # a second From: cannot dodge a reject policy: the strictest result counts
    result = evaluate(lookups(DMARC_ZONE), ["a@n.example", "b@example.org"], None,
                      [dk("pass", "n.example")])
    assert (result.result, result.disposition, result.from_domain) == (
        "fail", "reject", "example.org")
    both = evaluate(lookups(DMARC_ZONE), ["a@n.example, b@example.org"], None,
                    [dk("pass", "n.example"), dk("pass", "example.org")])
    assert both.result == "pass"


def test_header_fields_are_parsed_leniently():
    data = (b"From: a@example.org\r\nnot a field\r\n continued\r\n"
            b"Authentication-Results : mx.example.test; none\r\nX-A:\r\n\tfolded\r\n"
            b"\r\nBody: not a header\r\n")
    assert header_fields(data) == [(b"from", b" a@example.org\r\n"),
                                   (b"authentication-results", b" mx.example.test; none\r\n"),
                                   (b"x-a", b"\r\n\tfolded\r\n")]


def test_malformed_header_line_does_not_hide_from(keys, tmp_path):
    data = message("ceo@forged.example", extra=b"garbage line\r\n")
    zone = dict(ZONE_ALL)
    zone[("_dmarc.forged.example", "TXT")] = ["v=DMARC1; p=reject"]
    txn = transaction(tmp_path, "x@forged.example", data)
    assert run_check(make_check(keys, zone=zone), session(), txn) == R.DMARC_REJECTED


# -- policy ------------------------------------------------------------------------------
SETTINGS = Settings(authserv_id=OURS)


@pytest.mark.parametrize("result,disposition,settings,want", [
    ("fail", "reject", SETTINGS, (R.DMARC_REJECTED, False)),
    ("fail", "reject", Settings(OURS, dmarc_reject=False), (None, True)),
    ("fail", "quarantine", SETTINGS, (None, True)),
    ("fail", "quarantine", Settings(OURS, dmarc_quarantine=False), (None, False)),
    ("fail", "none", SETTINGS, (None, False)),
    ("temperror", "reject", SETTINGS, (R.DMARC_TEMPORARY, False)),
    ("temperror", "quarantine", SETTINGS, (None, False)),
    ("temperror", "none", SETTINGS, (None, False)),
    ("pass", "none", SETTINGS, (None, False)),
])
def test_decide(result, disposition, settings, want):
    verdict = decide(settings, DMARCResult(result, "x.example", "reject", disposition))
    assert (verdict.reply, verdict.junk) == want
    assert R.DMARC_REJECTED.code == 550 and R.DMARC_REJECTED.enhanced == (5, 7, 1)
    assert R.DMARC_TEMPORARY.code == 451 and R.DMARC_TEMPORARY.enhanced[0] == 4


# -- the header ----------------------------------------------------------------------------
def test_authentication_results_header():
    value = authentication_results(
        OURS, spf=SPFResult("pass", "mailfrom", 'odd "user"@example.org', "example.org",
                            "matched (ip4) \\ here"),
        dkim=[DKIMResult("pass", "example.org", "sel", "ed25519-sha256", "@example.org",
                         "abcdefgh")],
        arc=ARCResult("pass", 2), dmarc=DMARCResult("pass", "example.org", "reject"))
    lines = value.split("\r\n\t")
    assert lines[0] == f"{OURS};"
    assert lines[1] == r'spf=pass (matched ip4 here) smtp.mailfrom="odd \"user\"@example.org";'
    assert lines[2] == "dkim=pass header.d=example.org header.i=@example.org header.s=sel"
    assert lines[3] == "  header.a=ed25519-sha256 header.b=abcdefgh;"
    assert lines[4] == "arc=pass (i=2);"
    assert lines[5] == "dmarc=pass (p=reject dis=none) header.from=example.org"
    assert all(8 + len(line) <= 78 for line in lines)
    helo = authentication_results(OURS, spf=SPFResult("none", "helo", "h.example", ""))
    assert helo == f"{OURS};\r\n\tspf=none smtp.helo=h.example;\r\n\tdkim=none"


@pytest.mark.parametrize("value,ident", [
    (" mx.example.test; spf=pass", "mx.example.test"),
    ("MX.Example.Test 1; none", "mx.example.test"),
    (" (comment (nested)) mx.example.test;none", "mx.example.test"),
    (' "mx.example.test"; none', "mx.example.test"),
    (" other.example; dkim=pass", "other.example"),
    ("", ""),
])
def test_authserv_id(value, ident):
    assert authserv_id(value) == ident


# -- forged headers removed -------------------------------------------------------------
FORGED = (b"Received: from a\r\n"
          b"Authentication-Results: mx.example.test;\r\n\tdkim=pass header.d=bank.example\r\n"
          b"Authentication-Results: other.example; spf=pass\r\n"
          b"authentication-results : (x) MX.EXAMPLE.TEST ; none\r\n"
          b"Authentication-Results: (" + b"c" * 200 + b") mx.example.test; dmarc=pass\r\n"
          b"Subject: hi\r\n\r\n"
          b"Authentication-Results: mx.example.test; in the body stays\r\n")
CLEAN = (b"Received: from a\r\nAuthentication-Results: other.example; spf=pass\r\n"
         b"Subject: hi\r\n\r\nAuthentication-Results: mx.example.test; in the body stays\r\n")


@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 64, 100000])
def test_filter_removes_ours_in_any_chunking(chunk):
    f = ARFilter(OURS, max_field=100)
    out = b"".join(f.feed(FORGED[i:i + chunk]) for i in range(0, len(FORGED), chunk))
    assert out + f.flush() == CLEAN
    assert f.removed == 3


def test_rewrite_without(tmp_path):
    path = tmp_path / "msg"
    path.write_bytes(FORGED)
    assert rewrite_without(str(path), OURS, chunk_size=7) == len(CLEAN)
    assert path.read_bytes() == CLEAN
    assert rewrite_without(str(path), OURS) is None  # nothing to remove: untouched
    assert path.read_bytes() == CLEAN and not (tmp_path / "msg.ar").exists()


# -- the pipeline check --------------------------------------------------------------
ZONE_ALL = {**SPF_ZONE, **DMARC_ZONE,
            ("_dmarc.q2.example", "TXT"): ["v=DMARC1; p=quarantine"]}


def run_sync(f, *args):
    try:
        return defer.succeed(f(*args))
    except Exception:
        return defer.fail()


def make_check(keys, settings=SETTINGS, zone=None, trusted=()):
    zone = dict(zone or ZONE_ALL)
    zone.update(dkim_zone(keys))
    return InboundAuth(settings, run=run_sync, clock=Clock(), resolver=FakeResolver(zone),
                       trusted=Networks(trusted))


def session(ip="192.0.2.1", login=None, kind="smtp"):
    return Session(listener="smtp", kind=kind, hostname=OURS, client_ip=ip, client_key=ip,
                   helo="client.example", login=login)


_ids = itertools.count()


def transaction(tmp_path, sender, data):
    (tmp_path / "incoming").mkdir(exist_ok=True)
    txn = Transaction(sender=sender)
    txn.message = IncomingMessage(str(tmp_path), f"Q{next(_ids)}")
    txn.message.write(data)
    txn.message.finish()
    return txn


def call(coro):
    result = []
    defer.ensureDeferred(coro).addBoth(result.append)
    assert result, "the check did not finish synchronously"
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


def run_check(check, sess, txn):
    first = call(check.on_mail(sess, txn))
    if first is not None:
        return first
    return call(check.on_data(sess, txn))


def test_check_passes_and_labels(keys, tmp_path):
    data = sign(message(), keys["ed"], "example.org")
    txn = transaction(tmp_path, "alice@example.org", data)
    assert run_check(make_check(keys), session(), txn) is None
    [header] = txn.headers
    assert header.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=pass")
    assert b"dkim=pass header.d=example.org" in header
    assert b"dmarc=pass (p=reject dis=none) header.from=example.org" in header
    assert header.endswith(b"\r\n") and txn.folder == ""


def test_check_rejects_dmarc_reject_failure(keys, tmp_path):
    txn = transaction(tmp_path, "alice@example.org", message())
    assert run_check(make_check(keys), session("192.0.2.9"), txn) == R.DMARC_REJECTED


def test_check_quarantine_marks_junk(keys, tmp_path):
    settings = Settings(OURS, junk_folder="Junk")
    txn = transaction(tmp_path, "x@q2.example", message("a@q2.example"))
    assert run_check(make_check(keys, settings), session(), txn) is None
    assert txn.headers[1] == b"X-Spam-Flag: YES\r\n" and txn.folder == "Junk"


def test_check_spf_reject_is_configuration(keys, tmp_path):
    data = sign(message(), keys["ed"], "example.org")
    txn = transaction(tmp_path, "alice@example.org", data)
    assert call(make_check(keys).on_mail(session("192.0.2.9"), txn)) is None
    strict = make_check(keys, Settings(OURS, spf_reject=True))
    assert call(strict.on_mail(session("192.0.2.9"), txn)) == R.SPF_FAILED
    assert call(strict.on_mail(session("192.0.2.9"), Transaction(sender="a@soft.example"))) \
        is None  # softfail never


def test_check_temperror_of_reject_domain_defers(keys, tmp_path):
    zone = dict(ZONE_ALL)
    zone[("example.org", "TXT")] = "servfail"
    txn = transaction(tmp_path, "alice@example.org", message())
    assert run_check(make_check(keys, zone=zone), session(), txn) == R.DMARC_TEMPORARY


def test_check_dns_down_is_never_a_refusal_without_policy(keys, tmp_path):
    zone = {k: "servfail" for k in ZONE_ALL}
    zone[("n.example", "TXT")] = "servfail"
    data = sign(message("a@n.example"), keys["ed"], "broken.example")
    txn = transaction(tmp_path, "a@n.example", data)
    assert run_check(make_check(keys, zone=zone), session(), txn) is None
    header = txn.headers[0]
    assert b"spf=temperror" in header and b"dkim=temperror" in header
    assert b"dmarc=temperror" in header


def test_check_removes_forged_results(keys, tmp_path):
    data = (b"Authentication-Results: mx.example.test; dmarc=pass header.from=bank.example\r\n"
            + sign(message(), keys["ed"], "example.org"))
    txn = transaction(tmp_path, "alice@example.org", data)
    assert run_check(make_check(keys), session(), txn) is None
    stored = open(txn.message.path, "rb").read()
    assert b"bank.example" not in stored and stored.startswith(b"DKIM-Signature:")
    assert txn.message.size == len(stored)


def test_check_skips_logins_trusted_and_other_kinds(keys, tmp_path):
    check = make_check(keys, trusted=("192.0.2.0/24",))
    for sess in (session("198.51.100.1", login="alice"), session("192.0.2.1"),
                 session("198.51.100.1", kind="submission")):
        txn = transaction(tmp_path, "alice@example.org", message())
        assert run_check(check, sess, txn) is None
        assert txn.headers == [] and txn.checks == {}


def test_check_bug_is_temperror_not_refusal(keys, tmp_path):
    check = make_check(keys)

    def broken(*args):
        raise RuntimeError("bug")

    check._content = broken
    forged = b"Authentication-Results: mx.example.test; dmarc=pass\r\n"
    txn = transaction(tmp_path, "x@n.example", forged + message("a@n.example"))
    assert run_check(check, session(), txn) is None
    assert b"dmarc=temperror" in txn.headers[0]
    assert b"mx.example.test; dmarc=pass" not in open(txn.message.path, "rb").read()


def test_check_stops_waiting_after_the_budget(keys, tmp_path):
    clock = Clock()
    pending = defer.Deferred()
    check = InboundAuth(Settings(OURS, dns_timeout=1.0), run=lambda f, *a: pending,
                        clock=clock, resolver=FakeResolver({}))
    txn = Transaction(sender="a@example.org")
    done = []
    defer.ensureDeferred(check.on_mail(session(), txn)).addBoth(done.append)
    assert not done
    clock.advance(3.1)
    assert done == [None] and txn.checks[check.name].spf.result == "temperror"


# -- where junk goes: a Maildir++ folder -------------------------------------------
def test_store_delivers_into_a_folder(tmp_path):
    from mailserver.directory.interfaces import Mailbox
    from mailserver.store.maildir import MaildirStore

    store = MaildirStore(str(tmp_path / "mail"), hostname="mx.example.test")
    alice = Mailbox(address="alice@example.test", login="alice")
    source = tmp_path / "content"
    source.write_bytes(message())
    path = store.deliver(alice, sender="a@q.example", source_path=str(source), folder="Junk")
    folder = tmp_path / "mail" / "example.test" / "alice" / ".Junk"
    assert os.path.dirname(path) == str(folder / "new")
    assert (folder / "maildirfolder").is_file() and (folder / "cur").is_dir()
    assert not os.listdir(tmp_path / "mail" / "example.test" / "alice" / "new")
    with pytest.raises(ValueError):
        store.deliver(alice, sender="", source_path=str(source), folder="../x")


@pytest.mark.parametrize("folder,ok", [("Junk", True), ("Spam.Today", True), ("", True),
                                       ("../x", False), (".Junk", False), ("a/b", False)])
def test_junk_folder_config(tmp_path, monkeypatch, folder, ok):
    from mailserver.config import load_config
    from mailserver.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.ldif").write_text("")
    (tmp_path / "c.toml").write_text(
        '[domains]\nlocal = ["example.test"]\n[directory]\nldif_file = "users.ldif"\n'
        f'[checks]\njunk_folder = "{folder}"\n[[listeners]]\naddress = "127.0.0.1:2525"\n')
    if ok:
        assert load_config(str(tmp_path / "c.toml")).checks.junk_folder == folder
    else:
        with pytest.raises(ConfigError, match="checks.junk_folder"):
            load_config(str(tmp_path / "c.toml"))


def test_resolver_uses_the_configured_servers(monkeypatch):
    from mailserver.msgauth.lookups import make_dns_resolver

    r = make_dns_resolver(["127.0.0.1:5300", "::1"])
    assert [(n.address, n.port) for n in r.nameservers] == [("127.0.0.1", 5300), ("::1", 53)]

    def no_conf(self, *a, **kw):
        raise dns.resolver.NoResolverConfiguration()

    monkeypatch.setattr(dns.resolver.Resolver, "read_resolv_conf", no_conf)
    r = make_dns_resolver(())  # no resolv.conf: the local resolver, never a crash at start
    assert [(n.address, n.port) for n in r.nameservers] == [("127.0.0.1", 53)]
