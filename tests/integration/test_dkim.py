"""DKIM signing against the real ``twistd -n mailserver`` process.

Keys for example.test (an Ed25519 selector ``ed1`` and an RSA selector
``rs1``) sit in ``[dkim] key_dir``; a loopback DNS server
(:class:`tests.support.dns.DNSServer`) publishes their records, and dkimpy
verifies, fetching the keys from it, what the server stored in a maildir or
sent to Postfix's ``smtp-sink`` (the outside world, ``outside.example``).
``mailserverctl dns --check`` is run against the same DNS server.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from mailserver import ctl, dnsrecords
from mailserver.config import load_config
from mailserver.msgauth import keys as K
from tests.support.dkimverify import signature_tags, verify_signatures
from tests.support.dns import DNSServer
from tests.support.server import REPO, MailServer, free_port, wait_for
from tests.support.sink import SmtpSink, require_smtp_sink

pytestmark = pytest.mark.slow

DOMAIN = "example.test"
OUTSIDE = "outside.example"
FORWARD = f"""
dn: cn=fwd,ou=groups,dc=example,dc=test
objectClass: top
objectClass: nisMailAlias
objectClass: inetLocalMailRecipient
cn: fwd
mailLocalAddress: fwd@example.test
rfc822MailMember: friend@{OUTSIDE}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    require_smtp_sink()
    work = tmp_path_factory.mktemp("dkim")
    key_dir = work / "dkim"
    for selector, algorithm in (("ed1", "ed25519"), ("rs1", "rsa")):
        K.write_key(K.key_path(str(key_dir), DOMAIN, selector), K.generate(algorithm))
    keys, problems = K.KeyStore(str(key_dir)).keys_for(DOMAIN)
    assert not problems and len(keys) == 2
    zones = {DOMAIN: {f"{k.selector}._domainkey.{DOMAIN}": {"TXT": k.tags()}
                     for k in keys}}
    dns = DNSServer(zones).start()
    sink = SmtpSink(dump_dir=work / "sink").start()
    users = work / "users.ldif"
    users.write_text((REPO / "etc" / "quickstart-users.ldif").read_text().rstrip("\n")
                     + "\n" + FORWARD)
    port = free_port()
    server = MailServer(
        work / "server",
        directory={"backend": "ldif", "ldif_file": str(users), "base_dn": "dc=example,dc=test"},
        relay={"transports": {OUTSIDE: f"smtp:[127.0.0.1]:{sink.port}"},
               "nameservers": [dns.nameserver]},
        queue={"min_backoff": 3600.0, "scan_interval": 1.0},
        extra_tables={"dkim": {"key_dir": str(key_dir)}},
        extra_listeners=[{"name": "submission", "protocol": "submission",
                          "address": f"127.0.0.1:{port}", "tls": "none",
                          "plaintext_auth": True}])
    try:
        server.start()
        yield {"server": server, "dns": dns, "sink": sink, "port": port, "zones": zones}
    finally:
        server.stop()
        sink.stop()
        dns.stop()


def message(subject: str, sender: str, to: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"\r\nHello,  with trailing space \r\n\r\nand an empty line.\r\n\r\n").encode()


def sink_copy(sink: SmtpSink, subject: str):
    found = wait_for(lambda: [m for m in sink.messages()
                              if m.data and m.header("Subject") == subject],
                     f"{subject} at the sink")
    assert len(found) == 1
    return found[0]


def stored(server: MailServer, local: str, subject: str) -> bytes:
    def find():
        return [raw for raw in (p.read_bytes() for p in server.messages(local))
                if f"Subject: {subject}\n".encode() in raw]

    [raw] = wait_for(find, f"{subject} in {local}'s maildir")
    return raw


def test_submitted_mail_is_dual_signed_in_the_maildir_and_at_the_sink(env):
    """One message submitted with AUTH to a local and an outside recipient: the
    stored copy and the relayed copy both carry an Ed25519 and an RSA
    signature for example.test that dkimpy verifies; the server added the
    Message-ID and Date before signing, and they are signed."""
    with smtplib.SMTP("127.0.0.1", env["port"], timeout=15) as s:
        s.login("alice", "alice-password")
        assert s.sendmail("alice@example.test", ["bob@example.test", f"friend@{OUTSIDE}"],
                          message("signed-submission", "Alice <alice@example.test>",
                                  "bob@example.test")) == {}
    want = [(DOMAIN, "ed1", "ed25519-sha256", True), (DOMAIN, "rs1", "rsa-sha256", True)]
    local = stored(env["server"], "bob", "signed-submission")
    assert verify_signatures(local, env["dns"].nameserver) == want
    outside = sink_copy(env["sink"], "signed-submission")
    assert verify_signatures(outside.content, env["dns"].nameserver) == want
    h = signature_tags(outside.content)[0]["h"].split(":")
    assert h.count("from") == 2 and "message-id" in h and "date" in h
    assert "dkim: signed d=example.test (s=ed1 a=ed25519-sha256, s=rs1 a=rsa-sha256)" in \
        env["server"].log()


def test_forwarded_mail_is_signed_for_the_forwarding_domain(env):
    """Mail from outside to an alias forwarding outside leaves with a
    signature d=example.test that verifies at the sink."""
    with smtplib.SMTP("127.0.0.1", env["server"].smtp_port, timeout=15) as s:
        assert s.sendmail("someone@elsewhere.example", ["fwd@example.test"],
                          message("forwarded", "someone@elsewhere.example",
                                  "fwd@example.test")) == {}
    copy = sink_copy(env["sink"], "forwarded")
    assert copy.recipients == [f"friend@{OUTSIDE}"]
    assert verify_signatures(copy.content, env["dns"].nameserver) == [
        (DOMAIN, "ed1", "ed25519-sha256", True), (DOMAIN, "rs1", "rsa-sha256", True)]


def test_forward_of_a_from_claiming_our_domain_is_not_signed(env):
    """From: example.test arriving on port 25 and forwarded: we do not vouch for it."""
    with smtplib.SMTP("127.0.0.1", env["server"].smtp_port, timeout=15) as s:
        assert s.sendmail("someone@elsewhere.example", ["fwd@example.test"],
                          message("claims-our-domain", "ceo@example.test",
                                  "fwd@example.test")) == {}
    copy = sink_copy(env["sink"], "claims-our-domain")
    assert signature_tags(copy.content) == []


def test_dns_check_against_the_dns_server(env, tmp_path, capsys):
    """``mailserverctl dns --check``: published records match, a wrong DMARC
    policy is "different", an unpublished record "missing"; exit status 1,
    then 0 once everything is published as printed."""
    config_path = str(env["server"].config_path)
    config = load_config(config_path, check_files=False)
    keys = K.KeyStore(config.dkim.key_dir).keys_for(DOMAIN)[0]
    records = dnsrecords.records_for(config, DOMAIN, keys).records
    by_name: dict = {}
    for r in records:
        if r.type == "SRV":
            continue  # the test DNS server has no SRV records: they stay missing
        label = "@" if r.name == DOMAIN else r.name  # names with a dot are absolute
        value = r.value.replace("p=none", "p=reject") if r.what == "DMARC" else r.value
        if r.what == "TLS-RPT":
            continue
        by_name.setdefault(label, {}).setdefault(r.type, []).append(
            value.split() if r.type == "MX" else value)
    env["dns"].update({DOMAIN: by_name})
    assert ctl.main(["dns", DOMAIN, "--check", "--timeout", "3", "-c", config_path]) == 1
    out = capsys.readouterr().out
    status = {line[10:28].strip(): line.split()[0] for line in out.splitlines()
              if line and not line.startswith((";", " "))}
    assert status == {"MX": "match", "SPF": "match", "DKIM s=ed1": "match",
                      "DKIM s=rs1": "match", "DMARC": "different", "MTA-STS": "match",
                      "TLS-RPT": "missing", "SRV submission": "missing"}, out
    assert "p=reject" in out
