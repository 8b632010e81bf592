"""The LDIF reader, the schema mapping, and LDAPDirectory on the embedded
backend or on scripted fake connections (no server, no reactor)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from ldap3.core.exceptions import (
    LDAPInvalidFilterError,
    LDAPResponseTimeoutError,
    LDAPSessionTerminatedByServerError,
    LDAPSocketOpenError,
    LDAPSocketReceiveError,
    communication_exception_factory,
)
from twisted.python.threadpool import ThreadPool

from mailserver.directory.connect import Connector
from mailserver.directory.interfaces import IDirectory, Mailbox
from mailserver.directory.ldap import LDAPDirectory, LDAPSettings
from mailserver.directory.ldif import EmbeddedConnector, LDIFError, embedded_directory, parse_ldif
from mailserver.directory.schema import OPENLDAP, build_mapping, check_template, render_filter
from mailserver.errors import DirectoryUnavailable
from tests.support.directory import (
    QueueReactor,
    cases_settings,
    failure_of,
    result_of,
    sync_directory_kwargs,
)
from tests.support.slapd import QUICKSTART_LDIF, ROOT


# -- the LDIF reader ----------------------------------------------------------

def test_parse_quickstart():
    """The quick-start file parses into its entries, first the base."""
    records = parse_ldif(QUICKSTART_LDIF.read_bytes())
    dns = [dn for dn, _ in records]
    assert dns[0] == "dc=example,dc=test"
    assert "uid=alice,ou=people,dc=example,dc=test" in dns
    alice = dict(records)["uid=alice,ou=people,dc=example,dc=test"]
    assert alice["mailLocalAddress"] == [b"alice.liddell@example.test"]
    assert alice["userPassword"] == [b"alice-password"]


def test_parse_syntax():
    """Comments, folded lines, base64, repeated attributes and CRLF all work."""
    text = textwrap.dedent("""\
        version: 1
        # a comment
         that continues
        dn: uid=x, dc=example,
         dc=test
        objectClass: top
        objectclass: inetOrgPerson
        cn:: Q2Fyb2wgTcO8bGxlcg==
        description: one
          two
        mail:  padded@example.test
        empty:


        dn:: dWlkPXksZGM9ZXhhbXBsZSxkYz10ZXN0
        changetype: add
        uid: y
        """).replace("\n", "\r\n")
    records = parse_ldif(text)
    assert [dn for dn, _ in records] == ["uid=x,dc=example,dc=test", "uid=y,dc=example,dc=test"]
    x = records[0][1]
    assert x["objectClass"] == [b"top", b"inetOrgPerson"]
    assert x["cn"] == ["Carol Müller".encode()]
    assert x["description"] == [b"one two"]
    assert x["mail"] == [b"padded@example.test"]
    assert x["empty"] == [b""]
    assert records[1][1] == {"uid": [b"y"]}


@pytest.mark.parametrize("text, line, problem", [
    ("uid: x\n", 1, "must start with dn:"),
    (" folded\n", 1, "continuation"),
    ("dn: dc=a\ncn:: !!!\n", 2, "base64"),
    ("dn: dc=a\njpegPhoto:< file:///etc/passwd\n", 2, "URL"),
    ("dn: dc=a\nchangetype: modify\n", 2, "content records"),
    ("dn: dc=a\ncn: a\n\ndn: DC=A\ncn: b\n", 4, "duplicate"),
    ("dn: dc=a\nbad name: x\n", 2, "attribute name"),
    ("dn: dc=a\nno colon here\n", 2, "expected"),
    ("dn: dc=a\n", 1, "no attributes"),
    ("dn: not a dn\ncn: x\n", 1, "invalid DN"),
    ("version: 2\n", 1, "version"),
])
def test_parse_errors(text, line, problem):
    """Malformed LDIF raises LDIFError naming the line and the problem."""
    with pytest.raises(LDIFError) as caught:
        parse_ldif(text, source="t.ldif")
    assert caught.value.line == line
    assert problem in str(caught.value)
    assert str(caught.value).startswith(f"t.ldif:{line}:")


# -- schema mapping and settings ----------------------------------------------

def test_render_filter_escapes():
    """Placeholder values are escaped; other braces are left as they are."""
    assert render_filter("(mail={address})", address="*)(uid=*") == r"(mail=\2a\29\28uid=\2a)"
    assert render_filter("(x={login})", login="a\\b\x00") == r"(x=a\5cb\00)"
    assert render_filter("(x={other})", login="y") == "(x={other})"


@pytest.mark.parametrize("template, problem", [
    ("", "empty"),
    ("mail={address}", "parenthesised"),
    ("(&(mail={address})", "unbalanced"),
    ("(mail={login})", "unknown placeholder"),
])
def test_bad_templates(template, problem):
    """Filter templates are checked when a mapping is built."""
    with pytest.raises(ValueError, match=problem):
        check_template("address_filter", template, ("address", "localpart", "domain"))


def test_build_mapping():
    """Empty overrides keep the preset; others replace it; unknown names fail."""
    assert build_mapping("openldap", address_filter="", group_classes=()) is OPENLDAP
    custom = build_mapping("openldap", login_attribute="cn", member_attributes=["member"])
    assert custom.login_attribute == "cn" and custom.member_attributes == ("member",)
    with pytest.raises(ValueError, match="unknown schema preset"):
        build_mapping("nosuch")
    with pytest.raises(ValueError, match="not schema mapping fields"):
        build_mapping("openldap", colour="blue")


def test_requested_attributes_are_unique():
    """A lookup asks for each attribute once."""
    names = [n.lower() for n in OPENLDAP.requested_attributes]
    assert len(names) == len(set(names)) and "mail" in names and "member" in names


def test_settings_normalise():
    """Lists become tuples, domains are lower-cased, the password is not shown."""
    s = LDAPSettings(uris=["ldap://a", "ldap://b"], local_domains=["Example.TEST."],
                     bind_password="secret")
    assert s.uris == ("ldap://a", "ldap://b")
    assert s.local_domains == ("example.test",)
    assert "secret" not in repr(s)
    assert s.schema_mapping() is OPENLDAP


@pytest.mark.parametrize("kwargs", [
    {"scope": "base"}, {"pool_size": 0}, {"max_depth": 0}, {"operation_timeout": 0},
    {"schema": "nosuch"}, {"login_filter": "(uid={address})"},
])
def test_settings_reject(kwargs):
    """Bad settings raise ValueError at construction."""
    with pytest.raises(ValueError):
        LDAPSettings(**kwargs)


def test_import_does_not_touch_the_reactor():
    """Importing the directory modules never installs a reactor."""
    code = ("import sys, mailserver.directory.ldap, mailserver.directory.ldif; "
            "sys.exit('twisted.internet.reactor' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# -- the embedded backend -----------------------------------------------------

def embedded(text_or_path, tmp_path=None, **settings):
    """An embedded directory with synchronous calls; the base is the file's
    first entry unless ``base_dn`` is given."""
    path = text_or_path
    if tmp_path is not None:
        path = tmp_path / "d.ldif"
        path.write_text(text_or_path)
    settings = {"base_dn": "", **settings}
    return embedded_directory(str(path), cases_settings(**settings), **sync_directory_kwargs())


def test_quickstart_out_of_the_box():
    """The quick start needs no settings at all: base from the file, anonymous."""
    directory = embedded_directory(str(QUICKSTART_LDIF), **sync_directory_kwargs())
    try:
        assert IDirectory.providedBy(directory)
        assert directory.settings.base_dn == "dc=example,dc=test"
        team = result_of(directory.resolve("team@example.test"))
        assert [m.login for m in team.mailboxes] == ["alice", "bob"]
        bob = result_of(directory.authenticate("bob", "bob-password"))
        assert bob.address == "bob@example.test"
        assert result_of(directory.authenticate("bob", "BOB-PASSWORD")) is None
    finally:
        directory.close()


QMAIL_LDIF = """\
dn: dc=example,dc=test
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: uid=erin,dc=example,dc=test
objectClass: inetOrgPerson
objectClass: qmailUser
uid: erin
cn: Erin
sn: E
mail: erin@example.test
mailAlternateAddress: e@example.test
mailForwardingAddress: erin@elsewhere.example
mailForwardingAddress: ERIN@example.test
"""


def test_forward_and_keep_a_copy(tmp_path):
    """qmail-style: an alternate address resolves, and forwarding to one's own
    address keeps a local copy beside the forward."""
    directory = embedded(QMAIL_LDIF, tmp_path, bind_dn="")
    result = result_of(directory.resolve("e@example.test"))
    erin = Mailbox("erin@example.test", "erin", "uid=erin,dc=example,dc=test")
    assert result.mailboxes == (erin,)
    assert result.forwards == ("erin@elsewhere.example",)


def test_malformed_member_is_skipped(tmp_path):
    """A member value that is not a DN is skipped, not an outage."""
    text = QUICKSTART_LDIF.read_text() + (
        "\ndn: cn=odd,dc=example,dc=test\nobjectClass: groupOfNames\n"
        "objectClass: inetLocalMailRecipient\ncn: odd\nmailLocalAddress: odd@example.test\n"
        "member: not a dn\nmember: uid=bob,ou=people,dc=example,dc=test\n")
    result = result_of(embedded(text, tmp_path).resolve("odd@example.test"))
    assert [m.login for m in result.mailboxes] == ["bob"]
    assert any("not a valid DN" in step for step in result.trace)


def test_expansion_budget(tmp_path):
    """At most max_expansions entries are read for one address."""
    directory = embedded(QUICKSTART_LDIF, max_expansions=2)
    result = result_of(directory.resolve("team@example.test"))
    assert [m.login for m in result.mailboxes] == ["alice"]
    assert any("expansion limit 2" in step for step in result.trace)


def test_one_level_scope():
    """scope = "one" searches only the entries right below base_dn."""
    directory = embedded(QUICKSTART_LDIF, scope="one", base_dn="ou=groups,dc=example,dc=test")
    assert result_of(directory.resolve("alice@example.test")).mailboxes == ()
    assert [m.login for m in result_of(directory.resolve("team@example.test")).mailboxes] == [
        "alice", "bob"]


def test_closed_directory_is_unavailable():
    """After close(), calls fail temporarily; close() may be called twice."""
    directory = embedded(QUICKSTART_LDIF)
    directory.close()
    directory.close()
    failure_of(directory.resolve("alice@example.test"), DirectoryUnavailable)
    failure_of(directory.authenticate("alice", "alice-password"), DirectoryUnavailable)


def test_real_thread_pool():
    """Concurrent lookups on a real pool give the right answers, one
    connection per thread at most."""
    reactor = QueueReactor()
    pool = ThreadPool(minthreads=0, maxthreads=3, name="test-ldap")
    pool.start()
    directory = embedded_directory(str(QUICKSTART_LDIF), reactor=reactor, threadpool=pool)
    try:
        calls = [directory.resolve(a) for a in ["alice@example.test", "bob@example.test",
                                               "team@example.test"] * 10]
        logins = [tuple(m.login for m in result_of(reactor.wait(d)).mailboxes) for d in calls]
        assert logins == [("alice",), ("bob",), ("alice", "bob")] * 10
        assert 1 <= directory.open_connections <= 3
    finally:
        directory.close()
        pool.stop()


# -- scripted connections: retries and outages --------------------------------

class FakeConnection:
    """Answers searches from a script: an exception to raise, or a result code."""

    def __init__(self, script):
        self.script = script
        self.unbound = False

    def search(self, base, search_filter, scope, **kwargs):
        step = self.script.pop(0) if self.script else 0
        if isinstance(step, BaseException):
            raise step
        self.result = {"result": step, "description": "scripted"}
        self.response = []

    def unbind(self):
        self.unbound = True


class FakeConnector(Connector):
    """Hands out scripted connections, one script per connection.  With
    ``server_count`` > 1, each connection goes to the first fake server
    (``fake0``, ``fake1``...) that the caller has not given up on."""

    def __init__(self, *scripts, open_error=None, password_error=None):
        self.scripts = list(scripts)
        self.open_error = open_error
        self.password_error = password_error
        self.opened = []
        self.failed = []
        self.password_checks = 0

    def server_failed(self, conn, error):
        self.failed.append(error)

    def open(self, failed=None):
        if self.open_error:
            raise self.open_error
        conn = FakeConnection(self.scripts.pop(0) if self.scripts else [])
        uris = [f"fake{n}" for n in range(self.server_count)]
        conn.mailserver_uri = next((u for u in uris if u not in (failed or ())), uris[0])
        self.opened.append(conn)
        return conn

    def check_password(self, dn, password):
        self.password_checks += 1
        if self.password_error:
            raise self.password_error
        return True


def scripted(connector):
    return LDAPDirectory(cases_settings(), connector=connector, **sync_directory_kwargs())


def test_dead_connection_is_retried_once():
    """A kept connection that died is replaced, and the search succeeds."""
    connector = FakeConnector([0, LDAPSessionTerminatedByServerError("gone")], [0])
    directory = scripted(connector)
    assert not result_of(directory.resolve("a@example.test")).found
    assert not result_of(directory.resolve("a@example.test")).found
    assert len(connector.opened) == 2
    assert connector.opened[0].unbound


def receive_timeout():
    """What ldap3 raises when SO_RCVTIMEO expires: its receive error merged
    with the socket's TimeoutError."""
    return communication_exception_factory(LDAPSocketReceiveError, TimeoutError("timed out"))(
        "error receiving data: timed out")


@pytest.mark.parametrize("make_error", [receive_timeout,
                                        lambda: LDAPResponseTimeoutError("no answer"),
                                        lambda: 51])
def test_hung_only_server_is_not_asked_again(make_error):
    """A kept connection to the only server times out (or the server says
    busy): a fresh connection would go to the same server and wait again,
    so the lookup fails at once, after one timeout; the next lookup opens
    a fresh connection."""
    connector = FakeConnector([0, make_error()], [0])
    directory = scripted(connector)
    result_of(directory.resolve("a@example.test"))
    failure_of(directory.resolve("a@example.test"), DirectoryUnavailable)
    assert len(connector.opened) == 1 and connector.opened[0].unbound
    assert not result_of(directory.resolve("a@example.test")).found
    assert len(connector.opened) == 2


def test_hung_server_fails_over_once_to_each_other_server():
    """With two servers, a timed-out operation moves to the other one; when
    that one times out too, every server has failed in this call: no third
    connection, to either."""
    connector = FakeConnector([0, receive_timeout()], [receive_timeout()], [0])
    connector.server_count = 2
    directory = scripted(connector)
    result_of(directory.resolve("a@example.test"))
    failure_of(directory.resolve("a@example.test"), DirectoryUnavailable)
    assert [c.mailserver_uri for c in connector.opened] == ["fake0", "fake1"]

    connector = FakeConnector([0, receive_timeout()], [0])
    connector.server_count = 2
    directory = scripted(connector)
    result_of(directory.resolve("a@example.test"))
    assert not result_of(directory.resolve("a@example.test")).found
    assert [c.mailserver_uri for c in connector.opened] == ["fake0", "fake1"]


def test_fresh_connection_failure_is_not_retried():
    """When the fresh connection fails too, the caller gets DirectoryUnavailable."""
    error = LDAPSessionTerminatedByServerError("gone")
    connector = FakeConnector([0, error], [error], [0])
    directory = scripted(connector)
    result_of(directory.resolve("a@example.test"))
    failure_of(directory.resolve("a@example.test"), DirectoryUnavailable)
    assert len(connector.opened) == 2


@pytest.mark.parametrize("connector", [
    FakeConnector(open_error=LDAPSocketOpenError("refused")),
    FakeConnector([LDAPInvalidFilterError("bad filter")]),
    FakeConnector([52]),
    FakeConnector([80]),
    FakeConnector([32]),
])
def test_outage_is_unavailable(connector):
    """Socket errors, ldap3 errors and server-side failures are all
    DirectoryUnavailable, never an empty (unknown) resolution."""
    failure_of(scripted(connector).resolve("alice@example.test"), DirectoryUnavailable)


def test_outage_during_password_check():
    """An outage while binding as the user is temporary, not a wrong password."""
    connector = FakeConnector(password_error=LDAPSocketOpenError("refused"))
    real = EmbeddedConnector(parse_ldif(QUICKSTART_LDIF.read_bytes()),
                             cases_settings())
    connector.open = real.open
    failure_of(scripted(connector).authenticate("alice", "x"), DirectoryUnavailable)


def test_empty_password_never_reaches_the_server():
    """An empty password is refused before any search or bind."""
    connector = FakeConnector(open_error=LDAPSocketOpenError("must not be called"))
    directory = scripted(connector)
    assert result_of(directory.authenticate("alice", "")) is None
    assert directory.authenticate_sync("alice", "") is None
    assert connector.password_checks == 0


def test_unfit_server_fails_over_to_the_next():
    """busy/unavailable (or a missing base) on one server: the same
    operation is tried on a fresh connection to the next, once per server."""
    connector = FakeConnector([52], [0])
    connector.server_count = 2
    directory = scripted(connector)
    assert not result_of(directory.resolve("a@example.test")).found
    assert len(connector.opened) == 2 and connector.opened[0].unbound
    assert "result 52" in str(connector.failed[0])


def test_referral_for_a_member_is_not_found():
    """Reading one entry held by another server (a referral) is an empty
    answer; the same result for a whole search is an outage."""
    directory = scripted(FakeConnector([10, 10]))
    assert directory.search("(objectClass=*)", base="uid=x,dc=elsewhere",
                            base_scope=True) == ([], False)
    failure_of(directory.resolve("a@example.test"), DirectoryUnavailable)


def test_size_limit_on_an_address_is_temporary():
    """An address search cut short by the server's size limit would leave
    owners out: it defers (451) instead of delivering to some."""
    failure = failure_of(scripted(FakeConnector([4])).resolve("a@example.test"),
                         DirectoryUnavailable)
    assert "size limit" in str(failure.value)


def test_bare_alias_target_takes_the_alias_domain(tmp_path):
    """rfc822MailMember: bob (aliases-file style) means bob in the alias's
    own domain, never a forward to a domainless address."""
    text = QUICKSTART_LDIF.read_text() + (
        "\ndn: cn=bare,dc=example,dc=test\nobjectClass: nisMailAlias\n"
        "objectClass: inetLocalMailRecipient\ncn: bare\nmailLocalAddress: bare@example.test\n"
        "rfc822MailMember: bob\n")
    result = result_of(embedded(text, tmp_path).resolve("bare@example.test"))
    assert [m.login for m in result.mailboxes] == ["bob"]
    assert result.forwards == ()
    assert any("taken as bob@example.test" in step for step in result.trace)


def test_multi_valued_rdn_member(tmp_path):
    """A member DN with a multi-valued RDN (cn=Multi+uid=multi) keeps its
    "+" and is found."""
    from mailserver.directory.entries import clean_dn

    assert clean_dn("cn=Multi + uid=multi , ou=people,dc=x") == "cn=Multi+uid=multi,ou=people,dc=x"
    text = QUICKSTART_LDIF.read_text() + (
        "\ndn: cn=Multi+uid=multi,ou=people,dc=example,dc=test\nobjectClass: inetOrgPerson\n"
        "cn: Multi\nsn: M\nuid: multi\nmail: multi@example.test\n"
        "\ndn: cn=plus,dc=example,dc=test\nobjectClass: groupOfNames\n"
        "objectClass: inetLocalMailRecipient\ncn: plus\nmailLocalAddress: plus@example.test\n"
        "member: cn=Multi+uid=multi,ou=people,dc=example,dc=test\n")
    result = result_of(embedded(text, tmp_path).resolve("plus@example.test"))
    assert [m.login for m in result.mailboxes] == ["multi"]


def test_close_unbinds_off_the_calling_thread():
    """close() hands the unbinds to the pool (a search in flight holds the
    connection's lock) and a connection opened after it is never kept."""
    connector = FakeConnector([0])
    directory = scripted(connector)
    result_of(directory.resolve("a@example.test"))
    directory.close()
    assert connector.opened[0].unbound  # the synchronous pool ran it
    failure_of(directory.resolve("a@example.test"), DirectoryUnavailable)
    with pytest.raises(DirectoryUnavailable):
        directory._keep(FakeConnection([]))
    assert directory.open_connections == 0


def test_failed_server_goes_to_the_back_for_a_while():
    from mailserver.directory.connect import RETRY_AFTER, NetworkConnector
    from mailserver.directory.ldap import LDAPSettings

    now = [1000.0]
    connector = NetworkConnector(LDAPSettings(uris=("ldap://a", "ldap://b")),
                                 clock=lambda: now[0])
    assert connector.order() == ["ldap://a", "ldap://b"]

    class Conn:
        mailserver_uri = "ldap://a"

    connector.server_failed(Conn(), OSError("timed out"))
    assert connector.order() == ["ldap://b", "ldap://a"]
    now[0] += RETRY_AFTER
    assert connector.order() == ["ldap://a", "ldap://b"]
