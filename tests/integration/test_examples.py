"""The example deployments in etc/examples/, started as written and used.

Each file is rewritten only where it names this machine (ports, paths, the
directory server, next hops: tests/support/examples.py), started with the
real ``twistd``, and a message is passed through it the way the example is
meant to be used.  Directories: the quick-start slapd for the small
organisation, the Active-Directory-shaped slapd for the corporate relay, and
the quick-start LDIF for LMTP behind Postfix.  Postfix's smtp-sink stands in
for the internet and for the internal mail host.  Each server is then
reloaded (SIGHUP) and stopped (SIGTERM), which must shut it down cleanly.
"""

from __future__ import annotations

import os
import poplib
import pwd
import shutil
import signal
import smtplib
import ssl
import tempfile
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART_LDIF
from tests.support.directory import AD_SUFFIX, ad_dn, ad_slapd  # noqa: F401  (fixture)
from tests.support.examples import ExampleServer, rewrite_example, service_user
from tests.support.server import wait_for, maildir_messages
from tests.support.sink import SmtpSink, require_smtp_sink
from tests.support.slapd import slapd_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
MESSAGE = "Subject: {subject}\r\nMessage-ID: <{subject}@test>\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def sink(tmp_path_factory):
    require_smtp_sink()
    s = SmtpSink(dump_dir=tmp_path_factory.mktemp("examples-sink") / "dumps").start()
    yield s
    s.stop()


@pytest.fixture
def open_dir():
    """A work directory the service user can traverse (pytest's own tmp is
    root-only), so the examples can drop privileges as in production."""
    d = tempfile.mkdtemp(prefix="mailserver-example-", dir="/tmp")
    os.chmod(d, 0o711)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def dropped(server) -> bool:
    """The server runs as the service user when the tests can drop to one."""
    user = service_user()
    if user is None:
        return True
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1]) == pwd.getpwnam(user[0]).pw_uid
    return False


def no_verify() -> ssl.SSLContext:
    """The examples' certificates are made self-signed for the test."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def stopped_cleanly(server) -> bool:
    """The reactor shut down after SIGTERM.  twistd reports the signal as its
    exit status (-15) unless the server itself exits 0."""
    return (server.returncode in (0, -signal.SIGTERM)
            and "Server Shut Down." in server.log() and "Traceback" not in server.log())


def at_sink(sink, subject):
    """The recipients the sink got for ``subject`` (waits for the message)."""
    def found():
        return [r for m in sink.messages() if m.data and m.header("Subject") == subject
                for r in m.recipients]
    return wait_for(found, f"{subject} at the sink")


def maildir_subjects(root, domain, user):
    return [m["Subject"] for m in maildir_messages(root / domain / user)]


def test_small_organisation(open_dir, slapd_server, sink):  # noqa: F811
    """MX into a maildir, submission out to the internet, POP3 over TLS reads it
    back, with privileges dropped."""
    example = rewrite_example(
        "small-organisation.toml", open_dir, user=service_user(), domains={"example.org": "example.test"},
        directory={"uris": [slapd_server.uri], "base_dn": "dc=example,dc=test",
                   "bind_dn": "cn=mailserver,dc=example,dc=test",
                   "bind_password": "mailserver-password"},
        overrides={"relay": {"transports": {"outside.example": f"smtp:[{HOST}]:{sink.port}"}}})
    with ExampleServer(example) as server:
        assert dropped(server)
        with smtplib.SMTP(HOST, example.ports["mx"], timeout=30) as s:
            s.sendmail("someone@far.example", ["alice@example.test"],
                       MESSAGE.format(subject="small-mx"))
        assert maildir_subjects(example.maildir_root, "example.test", "alice") == ["small-mx"]
        with smtplib.SMTP(HOST, example.ports["submission"], timeout=30) as s:
            s.starttls(context=no_verify())
            s.login("alice", "alice-password")
            s.sendmail("alice@example.test", ["someone@outside.example"],
                       MESSAGE.format(subject="small-out"))
        assert at_sink(sink, "small-out") == ["someone@outside.example"]
        pop = poplib.POP3_SSL(HOST, example.ports["pop3s"], context=no_verify(), timeout=30)
        try:
            pop.user("alice")
            pop.pass_("alice-password")
            assert pop.stat()[0] == 1
        finally:
            pop.quit()
        server.reload()
    assert stopped_cleanly(server)


def test_corporate_relay(open_dir, ad_slapd, sink):  # noqa: F811
    """MX mail for the relay domain reaches the internal host (the sink) and no
    maildir; a roaming user sends out through submission on implicit TLS."""
    example = rewrite_example(
        "corporate-relay.toml", open_dir, user=service_user(), domains={"corp.example.org": "corp.example.test"},
        directory={"uris": [ad_slapd.uri], "base_dn": AD_SUFFIX,
                   "bind_dn": ad_dn("Mail Service"), "bind_password": "service-password",
                   "tls_ca_file": None},
        next_hop=f"smtp:[{HOST}]:{sink.port}",
        overrides={"relay": {"trusted_networks": [],
                             "transports": {"outside.example": f"smtp:[{HOST}]:{sink.port}"}}})
    with ExampleServer(example) as server:
        assert dropped(server)
        with smtplib.SMTP(HOST, example.ports["mx"], timeout=30) as s:
            s.sendmail("someone@far.example", ["ann.archer@corp.example.test"],
                       MESSAGE.format(subject="corp-in"))
            s.mail("someone@far.example")
            assert s.rcpt("nobody@corp.example.test")[0] == 550
            s.rset()
        assert at_sink(sink, "corp-in") == ["ann@corp.example.test"]
        with smtplib.SMTP_SSL(HOST, example.ports["submissions"], context=no_verify(),
                              timeout=30) as s:
            s.login("ann", "ann-password")
            s.sendmail("ann@corp.example.test", ["partner@outside.example"],
                       MESSAGE.format(subject="corp-out"))
        assert at_sink(sink, "corp-out") == ["partner@outside.example"]
        assert [p for p in example.maildir_root.rglob("*") if p.is_file()] == []
        server.reload()
    assert stopped_cleanly(server)


def test_lmtp_behind_postfix(open_dir, sink):
    """LMTP over the UNIX socket delivers into the maildir; an outside forward
    leaves through the smarthost (Postfix's place, the sink here)."""
    users = open_dir / "users.ldif"
    users.write_text(open(QUICKSTART_LDIF).read() + """
dn: cn=away,ou=groups,dc=example,dc=test
objectClass: top
objectClass: nisMailAlias
objectClass: inetLocalMailRecipient
cn: away
mailLocalAddress: away@example.test
rfc822MailMember: alice@example.test
rfc822MailMember: far@outside.example
""")
    users.chmod(0o644)
    example = rewrite_example(
        "lmtp-behind-postfix.toml", open_dir / "run", user=service_user(), domains={"example.org": "example.test"},
        directory={"ldif_file": str(users), "base_dn": "dc=example,dc=test"},
        next_hop=f"[{HOST}]:{sink.port}")
    with ExampleServer(example) as server:
        assert dropped(server)
        with smtplib.LMTP(example.sockets["lmtp"], timeout=30) as s:
            refused = s.sendmail("someone@far.example", ["bob@example.test", "away@example.test"],
                                 MESSAGE.format(subject="lmtp-in"))
            assert refused == {}
            # LMTP answers once per recipient after the data; smtplib reads the first.
            assert s.getreply()[0] == 250
            s.mail("someone@far.example")
            assert s.rcpt("nobody@example.test")[0] == 550
            s.rset()
        assert maildir_subjects(example.maildir_root, "example.test", "bob") == ["lmtp-in"]
        assert maildir_subjects(example.maildir_root, "example.test", "alice") == ["lmtp-in"]
        assert at_sink(sink, "lmtp-in") == ["far@outside.example"]
        server.reload()
    assert stopped_cleanly(server)
