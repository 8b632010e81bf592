"""DKIM key files, the records a domain publishes, their comparison with DNS,
and the ``mailserverctl dkim genkey`` / ``dns`` commands."""

from __future__ import annotations

import os
import stat

import pytest

from mailserver import ctl, dnsrecords
from mailserver.config import load_config
from mailserver.msgauth import keys as K
from tests.conftest import QUICKSTART_LDIF


# -- key files ----------------------------------------------------------------------------

def test_write_key_is_0600_in_0700_directories_and_never_overwrites(tmp_path):
    path = K.key_path(str(tmp_path / "dkim"), "Example.TEST.", "ed1")
    assert path == str(tmp_path / "dkim" / "example.test" / "ed1.key")
    old = os.umask(0)
    try:
        K.write_key(path, K.generate("ed25519"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    with pytest.raises(FileExistsError):
        K.write_key(path, K.generate("ed25519"))


@pytest.mark.parametrize("name", ["../etc", "a/b", "", "-x", "x_y", "a..b"])
def test_selector_must_be_dns_labels(name):
    with pytest.raises(ValueError):
        K.check_name("selector", name)


def test_load_key_refuses_what_cannot_sign(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key")
    with pytest.raises(K.KeyProblem):
        K.load_key(str(bad), "example.test", "bad")
    with pytest.raises(K.KeyProblem):
        K.load_key(str(tmp_path / "none.key"), "example.test", "none")


def test_rsa_record_is_split_into_255_octet_strings(tmp_path):
    path = str(tmp_path / "r.key")
    K.write_key(path, K.generate("rsa"))
    key = K.load_key(path, "example.test", "r")
    assert key.algorithm == "rsa" and key.signature_algorithm == b"rsa-sha256"
    line = K.dns_record(key, 3600)
    owner, rest = line.split(" 3600 IN TXT ")
    assert owner == "r._domainkey.example.test."
    strings = [s for s in rest.split('"') if s.strip()]
    assert len(strings) == 2 and len(strings[0]) == 255
    assert "".join(strings) == key.tags() and key.tags().startswith("v=DKIM1; k=rsa; p=MIIB")


# -- the records -----------------------------------------------------------------------------

def write_config(tmp_path, extra: str = "") -> str:
    path = tmp_path / "mailserver.toml"
    path.write_text(f"""
[server]
hostname = "mx.example.test"
base_dir = "{tmp_path}"
[domains]
local = ["example.test"]
[directory]
ldif_file = "{QUICKSTART_LDIF}"
[relay]
nameservers = ["127.0.0.1:9"]
{extra}
[[listeners]]
protocol = "smtp"
address = "127.0.0.1:2525"
[[listeners]]
protocol = "submission"
address = "127.0.0.1:2587"
plaintext_auth = true
tls = "none"
[[listeners]]
protocol = "lmtp"
address = "unix:lmtp.sock"
""")
    return str(path)


def test_records_for_a_domain(tmp_path):
    config = load_config(write_config(tmp_path, '[dns]\nmx = ["mx1.example.test", '
                                                '"mx2.example.test"]\ndmarc_policy = '
                                                '"quarantine"\nttl = 300\n'), check_files=False)
    key_path = K.key_path(config.dkim.key_dir, "example.test", "ed1")
    K.write_key(key_path, K.generate("ed25519"))
    key = K.load_key(key_path, "example.test", "ed1")
    pub = dnsrecords.records_for(config, "example.test", [key])
    by_what = {r.what: r for r in pub.records}
    assert [r.value for r in pub.records if r.type == "MX"] == ["10 mx1.example.test.",
                                                                 "20 mx2.example.test."]
    assert by_what["SPF"].value == "v=spf1 mx -all"
    assert by_what["DKIM s=ed1"].name == "ed1._domainkey.example.test"
    assert by_what["DMARC"].value == "v=DMARC1; p=quarantine; rua=mailto:postmaster@example.test"
    assert by_what["TLS-RPT"].value == "v=TLSRPTv1; rua=mailto:postmaster@example.test"
    assert by_what["SRV submission"].zone_line() == \
        "_submission._tcp.example.test. 300 IN SRV 0 1 2587 mx.example.test."
    assert pub.mta_sts_policy == ("version: STSv1\r\nmode: testing\r\nmx: mx1.example.test\r\n"
                                  "mx: mx2.example.test\r\nmax_age: 604800\r\n")
    assert by_what["MTA-STS"].value == f"v=STSv1; id={dnsrecords.policy_id(pub.mta_sts_policy)}"
    text = dnsrecords.zone_text(pub)
    assert "https://mta-sts.example.test/.well-known/mta-sts.txt" in text
    assert "_mta-sts.example.test. 300 IN TXT" in text


def test_policy_id_changes_with_the_policy(tmp_path):
    a = load_config(write_config(tmp_path), check_files=False)
    b = load_config(write_config(tmp_path, '[dns]\nmta_sts_mode = "enforce"\n'), check_files=False)
    ida, idb = (dnsrecords.policy_id(dnsrecords.mta_sts_policy(c)) for c in (a, b))
    assert ida != idb and ida.isalnum() and len(ida) <= 32


def test_compare_statuses(tmp_path):
    config = load_config(write_config(tmp_path), check_files=False)
    records = dnsrecords.records_for(config, "example.test").records
    answers = {
        ("example.test", "MX"): ["10 MX.example.test."],
        ("example.test", "TXT"): ["google-site-verification=x", "v=spf1  mx  -all"],
        ("_dmarc.example.test", "TXT"): ["v=DMARC1; p=reject; rua=mailto:postmaster@example.test"],
        ("_mta-sts.example.test", "TXT"): [],
        ("_submission._tcp.example.test", "SRV"): ["5 0 2587 mx.example.test."],
    }

    def lookup(name, rtype):
        if name.startswith("_smtp._tls"):
            raise dnsrecords.LookupFailed("timeout")
        return answers.get((name, rtype), [])

    got = {c.record.what: c.status for c in dnsrecords.compare(records, lookup)}
    assert got == {"MX": "match", "SPF": "match", "DMARC": "different", "MTA-STS": "missing",
                   "TLS-RPT": "error", "SRV submission": "match"}
    comparisons = dnsrecords.compare(records, lookup)
    assert dnsrecords.exit_status(comparisons) == 1
    assert "found:" in dnsrecords.report(comparisons) and "p=reject" in \
        dnsrecords.report(comparisons)
    matching = [c for c in comparisons if c.status in ("match", "error")]
    assert dnsrecords.exit_status(matching) == 75
    assert dnsrecords.exit_status([c for c in matching if c.status == "match"]) == 0


def test_dkim_records_compare_by_key_not_text():
    record = dnsrecords.Record("DKIM s=a", "a._domainkey.x", "TXT", "v=DKIM1; k=ed25519; p=AbC=")
    assert dnsrecords._same(record, "k=ed25519;p=Ab C=; t=s")
    assert not dnsrecords._same(record, "v=DKIM1; k=rsa; p=AbC=")


# -- the commands ------------------------------------------------------------------------------

def test_genkey_then_dns_prints_the_key(tmp_path, capsys):
    path = write_config(tmp_path)
    assert ctl.main(["dkim", "genkey", "example.test", "--selector", "s1", "--config", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith('s1._domainkey.example.test. 3600 IN TXT "v=DKIM1; k=ed25519; p=')
    key_file = tmp_path / "var" / "dkim" / "example.test" / "s1.key"
    assert f"wrote {key_file}" in err and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ctl.main(["dkim", "genkey", "example.test", "-s", "s1", "-c", path]) == 78
    assert "exists" in capsys.readouterr().err
    assert ctl.main(["dkim", "genkey", "example.test", "-s", "r1", "-a", "rsa", "-c", path]) == 0
    capsys.readouterr()
    assert ctl.main(["dns", "example.test", "-c", path]) == 0
    out = capsys.readouterr().out
    assert "s1._domainkey.example.test." in out and "r1._domainkey.example.test." in out
    assert "example.test. 3600 IN MX 10 mx.example.test." in out
    assert "WARNING" not in out


def test_dns_warns_of_a_domain_without_keys(tmp_path, capsys):
    assert ctl.main(["dns", "example.test", "-c", write_config(tmp_path)]) == 0
    assert "; WARNING: no DKIM key for example.test" in capsys.readouterr().out


def test_bad_selector_in_config_names_the_key(tmp_path):
    from mailserver.errors import ConfigError

    with pytest.raises(ConfigError, match="dkim.domain_selectors"):
        load_config(write_config(tmp_path, '[dkim]\ndomain_selectors = {"example.test" = '
                                           '"ok ../bad"}\n'), check_files=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_genkey_as_root_gives_the_key_to_the_service_user(tmp_path, capsys):
    import pwd

    nobody = pwd.getpwnam("nobody")
    path = write_config(tmp_path, "")
    text = open(path).read().replace('[server]\n', '[server]\nuser = "nobody"\n', 1)
    open(path, "w").write(text)
    assert ctl.main(["dkim", "genkey", "example.test", "-s", "s1", "-c", path]) == 0
    key_file = tmp_path / "var" / "dkim" / "example.test" / "s1.key"
    for p in (key_file, key_file.parent, key_file.parent.parent):
        assert p.stat().st_uid == nobody.pw_uid, p
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_txt_strings_escape_quotes_and_split_by_octets():
    assert K.txt_strings('v=spf1 "x" \\ é') == '"v=spf1 \\"x\\" \\\\ \\195\\169"'
    assert K.txt_strings("a" * 256) == f'"{"a" * 255}" "a"'
