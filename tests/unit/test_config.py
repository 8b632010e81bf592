"""Configuration loading and validation."""

import dataclasses
import os
import re
import tomllib
from pathlib import Path

import pytest

from mailserver.config import load_config, parse_address, schema_fields
from mailserver.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[domains]
local = ["example.test"]
[directory]
ldif_file = "users.ldif"
[[listeners]]
address = "127.0.0.1:2525"
"""


@pytest.fixture
def cfgdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.ldif").write_text("")
    return tmp_path


def write(d, text):
    p = d / "c.toml"
    p.write_text(text)
    return str(p)


def test_minimal_config_gets_defaults(cfgdir):
    """A minimal file loads; defaults fill the rest and paths become absolute."""
    c = load_config(write(cfgdir, MINIMAL))
    assert c.smtp.max_message_size == 26214400
    assert c.store.maildir_root == str(cfgdir / "var/mail")
    assert c.listeners[0].tls == "none"
    assert c.listeners[0].protocol == "smtp"


@pytest.mark.parametrize("extra, key, problem", [
    ("[smtp]\nmax_recipients = \"ten\"\n", "smtp.max_recipients", "expected an integer"),
    ("[smtp]\nmax_recipientz = 5\n", "smtp.max_recipientz", "unknown key"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "at least 1"),
    ("[bogus]\n", "bogus", "unknown section"),
    ("[tls]\ncertificate = \"nope.pem\"\nprivate_key = \"nope.key\"\n",
     "tls.certificate", "no such file"),
    ("[tls]\ncertificate = \"nope.pem\"\n", "tls.private_key", "go together"),
    ("[directory]\nbackend = \"ldap\"\n", "directory.backend", None),
])
def test_errors_name_file_and_key(cfgdir, extra, key, problem):
    """Each error names the file and the key, and says what is wrong."""
    text = MINIMAL.replace("[directory]\nldif_file = \"users.ldif\"\n", "") + extra
    if "[directory]" not in extra:
        text += "[directory]\nldif_file = \"users.ldif\"\n"
    path = write(cfgdir, text)
    if key == "directory.backend":
        # duplicate table is a TOML error: still names the file
        with pytest.raises(ConfigError) as e:
            load_config(path)
        assert str(e.value).startswith(path)
        return
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert problem in msg


def test_missing_file(tmp_path):
    """A missing file is reported as such."""
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "absent.toml"))


def test_unreadable_certificate(cfgdir):
    """A certificate file that is not PEM is refused before anything binds."""
    (cfgdir / "bad.pem").write_text("garbage")
    text = MINIMAL + '[tls]\ncertificate = "bad.pem"\nprivate_key = "bad.pem"\n'
    with pytest.raises(ConfigError, match="tls.certificate: .*not a usable PEM"):
        load_config(write(cfgdir, text))


def test_listener_address_checked(cfgdir):
    """A malformed listener address names the listener."""
    text = MINIMAL.replace('127.0.0.1:2525', '127.0.0.1:99999')
    with pytest.raises(ConfigError, match=r"listeners\[0\].address"):
        load_config(write(cfgdir, text))


@pytest.mark.parametrize("address, parsed", [
    ("127.0.0.1:25", ("tcp4", "127.0.0.1", 25)),
    (":25", ("tcp4", "", 25)),
    ("[::1]:25", ("tcp6", "::1", 25)),
    ("unix:/run/lmtp", ("unix", "/run/lmtp", None)),
])
def test_parse_address(address, parsed):
    """Listener addresses in every accepted form."""
    assert parse_address(address) == parsed


def _reference():
    """Uncomment the reference file's `# key = value` lines and parse them."""
    lines = []
    for line in (REPO / "etc/mailserver.toml").read_text().splitlines():
        m = re.match(r"^# ?(\[\[?\w+\]\]?|[a-z][a-z0-9_]* = .*)$", line)
        if m:
            lines.append(m.group(1))
        elif re.match(r"^\[\w+\]$", line):
            lines.append(line)
    return tomllib.loads("\n".join(lines))


def test_reference_documents_every_key_with_its_default():
    """etc/mailserver.toml lists every key of every section with its real default."""
    ref = _reference()
    for section, fields in schema_fields().items():
        table = ref[section][0] if section == "listeners" else ref[section]
        for f in fields:
            assert f.name in table, f"{section}.{f.name} missing from etc/mailserver.toml"
            default = f.default
            if default is dataclasses.MISSING:
                default = f.default_factory()
            if isinstance(default, tuple):
                default = list(default)
            assert table[f.name] == default, f"{section}.{f.name}"
        extra = set(table) - {f.name for f in fields}
        assert not extra, f"{section}: documented keys that do not exist: {extra}"


def test_quickstart_config_is_valid(monkeypatch):
    """etc/quickstart.toml loads from the repository root."""
    monkeypatch.chdir(REPO)
    c = load_config("etc/quickstart.toml", check_files=False)
    assert [lc.address for lc in c.listeners] == ["127.0.0.1:2525", "127.0.0.1:2424",
                                                    "127.0.0.1:2587", "127.0.0.1:2465",
                                                    "127.0.0.1:2110", "127.0.0.1:2995"]
    assert c.tls.self_signed
    assert os.path.isabs(c.directory.ldif_file)


def test_bad_directory_filter_names_the_key(cfgdir):
    """A directory filter with an unknown placeholder is refused, naming the key."""
    text = MINIMAL.replace('ldif_file = "users.ldif"\n',
                           'ldif_file = "users.ldif"\naddress_filter = "(mail={bogus})"\n')
    with pytest.raises(ConfigError, match=r"directory.address_filter: .*unknown placeholder"):
        load_config(write(cfgdir, text))


@pytest.mark.parametrize("template, ok", [("{domain}/{login}", True), ("{user}", False),
                                          ("{domain}/../{localpart}", False)])
def test_store_template_checked_like_the_store(cfgdir, template, ok):
    """store.template is validated by the store itself: same fields, same safety rule."""
    text = MINIMAL + f'[store]\ntemplate = "{template}"\n'
    if ok:
        assert load_config(write(cfgdir, text)).store.template == template
    else:
        with pytest.raises(ConfigError, match="store.template"):
            load_config(write(cfgdir, text))


@pytest.mark.parametrize("extra, key", [
    ('[relay]\ntrusted_networks = ["10.0.0.0/33"]\n', "relay.trusted_networks"),
    ('[relay.transports]\n"example.org" = "carrier-pigeon:x"\n', "relay.transports"),
    ('[relay]\ntls_policies = { "bank.example" = "sometimes" }\n', "relay.tls_policies.bank.example"),
    ('[relay]\nnameservers = ["dns.example"]\n', "relay.nameservers"),
    ('[relay]\nsmarthost = "[relay.example:587"\n', "relay.smarthost"),
])
def test_relay_settings_checked(cfgdir, extra, key):
    """Relay settings are validated at start, naming the key."""
    with pytest.raises(ConfigError, match=f"{re.escape(key)}: "):
        load_config(write(cfgdir, MINIMAL + extra))


def test_transport_map_loads(cfgdir):
    """A transport map and a smarthost load as tables of strings."""
    text = MINIMAL + ('[relay]\nsmarthost = "[relay.example.net]:587"\n'
                      '[relay.transports]\n"lists.example.test" = "lmtp:unix:/run/lmtp"\n')
    c = load_config(write(cfgdir, text))
    assert c.relay.transports == {"lists.example.test": "lmtp:unix:/run/lmtp"}
    assert c.relay.smarthost == "[relay.example.net]:587"


@pytest.mark.parametrize("extra, key, problem", [
    ('[queue]\ndirectory = "var/spool"\n', "queue.directory", "is also server.spool_dir"),
    ('[queue]\ndirectory = "./var//spool/"\n', "queue.directory", "is also server.spool_dir"),
    ('[queue]\ndirectory = "var/spool/queue"\n', "queue.directory", "is inside server.spool_dir"),
    ('[queue]\ndirectory = "var"\n', "queue.directory", "contains server.spool_dir"),
    ('[queue]\ndirectory = "var/mail/q"\n', "queue.directory", "is inside store.maildir_root"),
    ('[store]\nmaildir_root = "var/spool"\n', "store.maildir_root", "is also server.spool_dir"),
    ('[server]\nspool_dir = "var/mail/spool"\n', "store.maildir_root", "contains server.spool_dir"),
])
def test_spool_queue_and_maildirs_do_not_overlap(cfgdir, extra, key, problem):
    """The spool, the queue and the maildir root each need their own directory:
    the spool's start-up clean-up would otherwise delete queued envelopes."""
    path = write(cfgdir, MINIMAL + extra)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert problem in msg


def test_overlap_seen_through_a_symlink(cfgdir):
    """A queue directory that is the spool under another name is refused too."""
    (cfgdir / "var/spool").mkdir(parents=True)
    (cfgdir / "q").symlink_to(cfgdir / "var/spool")
    with pytest.raises(ConfigError, match=r"queue.directory: .*is also server.spool_dir"):
        load_config(write(cfgdir, MINIMAL + '[queue]\ndirectory = "q"\n'))


def test_sibling_directories_with_a_common_prefix_are_fine(cfgdir):
    """var/spool and var/spool2 share a prefix, not a directory."""
    c = load_config(write(cfgdir, MINIMAL + '[queue]\ndirectory = "var/spool2"\n'))
    assert c.queue.directory == str(cfgdir / "var/spool2")


def test_postmaster_notice_goes_to_the_first_local_domain_unless_turned_off(cfgdir):
    """[queue] notify_postmaster (default true) sends undeliverable-bounce notices
    to postmaster@<first local domain>; false (or no local domain) only logs them."""
    from mailserver.service import _postmaster

    text = MINIMAL.replace('local = ["example.test"]', 'local = ["example.test", "b.test"]')
    assert _postmaster(load_config(write(cfgdir, text))) == "postmaster@example.test"
    off = text + "[queue]\nnotify_postmaster = false\n"
    assert _postmaster(load_config(write(cfgdir, off))) is None


@pytest.mark.parametrize("address", ["127.0.0.1:25", ":25", "[::1]:25"])
def test_lmtp_on_port_25_is_refused(cfgdir, address):
    """An LMTP listener on TCP port 25 is refused (RFC 2033 section 5), naming its address key."""
    text = MINIMAL + f'[[listeners]]\naddress = "{address}"\nprotocol = "lmtp"\n'
    path = write(cfgdir, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: listeners[1].address: "), str(e.value)
    assert "RFC 2033" in str(e.value)


@pytest.mark.parametrize("address", ["127.0.0.1:24", "unix:lmtp.sock"])
def test_lmtp_elsewhere_is_fine(cfgdir, address):
    """LMTP on port 24 or a UNIX socket still loads."""
    c = load_config(write(cfgdir, MINIMAL + f'[[listeners]]\naddress = "{address}"\n'
                                            'protocol = "lmtp"\n'))
    assert c.listeners[1].protocol == "lmtp"


def test_dane_needs_named_nameservers(cfgdir):
    """DANE trusts the resolvers' AD bit: they must be named, not taken from
    /etc/resolv.conf by accident."""
    with pytest.raises(ConfigError, match="relay.dane: needs relay.nameservers"):
        load_config(write(cfgdir, MINIMAL + "[relay]\ndane = true\n"))
    c = load_config(write(cfgdir, MINIMAL + '[relay]\ndane = true\nnameservers = ["127.0.0.1"]\n'))
    assert c.relay.dane and not c.relay.mta_sts
