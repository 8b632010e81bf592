"""Test support for the directory: synchronous fakes, extra entries, fixtures.

``ImmediateThreadPool`` and ``ImmediateReactor`` make ``LDAPDirectory`` run
its blocking work inline, so a Deferred has its result when the call
returns; :func:`result_of` and :func:`failure_of` read it.  ``QueueReactor``
collects results from real pool threads for tests that want real threads
without running the reactor.

``CASES_LDIF`` adds entries under ``ou=cases`` that exercise every rule of
resolution (nesting, loops, forwards, dangling members).  It loads into slapd
with the stock schemas, so the ``backend`` fixture can give the same
directory on both backends.

``tests/data/ad-tree.ldif`` is an Active-Directory-shaped tree for the
``activedirectory`` preset (``ad_backend``: embedded, or slapd with
``tests/data/ad.schema`` and the memberof overlay), and
``tests/data/openldap-extras.ldif`` adds groups with restrictions, send-as
grants and a directory-listed domain to the quick start (``extras_backend``).
"""

from __future__ import annotations

import base64
import dataclasses
import queue
import time
from pathlib import Path

import pytest
from twisted.trial.unittest import SynchronousTestCase

from mailserver.directory.ldap import LDAPDirectory, LDAPSettings
from mailserver.directory.ldif import embedded_directory
from mailserver.testing import ImmediateReactor, SynchronousThreadPool
from tests.support.slapd import DATA, QUICKSTART_LDIF, SUFFIX, release_shared, shared_slapd

SERVICE_DN = "cn=mailserver,dc=example,dc=test"
SERVICE_PASSWORD = "mailserver-password"
PEOPLE = "ou=people," + SUFFIX
CASES = "ou=cases," + SUFFIX
ALICE_DN = f"uid=alice,{PEOPLE}"
BOB_DN = f"uid=bob,{PEOPLE}"
CAROL_DN = f"uid=carol,{CASES}"
DEEP_LEVELS = 13  # deep0 .. deep12; deep12 holds alice


# One set of synchronous fakes for the whole suite: the ones the product ships.
ImmediateThreadPool = SynchronousThreadPool


class QueueReactor:
    """Collects callFromThread calls from pool threads; :meth:`wait` runs them."""

    def __init__(self):
        self.calls = queue.Queue()

    def callFromThread(self, function, *args, **kwargs):
        self.calls.put((function, args, kwargs))

    def wait(self, deferred, timeout=30.0):
        """Run queued calls until ``deferred`` has fired; return it, result intact."""
        fired = []
        deferred.addBoth(lambda result: (fired.append(True), result)[1])
        deadline = time.monotonic() + timeout
        while not fired:
            function, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            function(*args, **kwargs)
        return deferred


_checker = SynchronousTestCase()


def result_of(deferred):
    """The result a Deferred already has (fails the test otherwise)."""
    return _checker.successResultOf(deferred)


def failure_of(deferred, *types):
    """The Failure a Deferred already has, which must be one of ``types``."""
    return _checker.failureResultOf(deferred, *types)


def sync_directory_kwargs():
    return {"reactor": ImmediateReactor(), "threadpool": ImmediateThreadPool()}


def _entry(dn, *lines):
    return "\n".join([f"dn: {dn}", *lines]) + "\n"


def _person(uid, mail, *extra, ou=CASES, classes=()):
    return _entry(
        f"uid={uid},{ou}", "objectClass: top", "objectClass: person",
        "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
        *[f"objectClass: {c}" for c in classes],
        f"uid: {uid}", f"cn: {uid}", f"sn: {uid}", *([f"mail: {mail}"] if mail else []), *extra)


def _alias(cn, addresses, targets):
    return _entry(
        f"cn={cn},{CASES}", "objectClass: top", "objectClass: nisMailAlias",
        "objectClass: inetLocalMailRecipient", f"cn: {cn}",
        *[f"mailLocalAddress: {a}" for a in addresses],
        *[f"rfc822MailMember: {t}" for t in targets])


def _group(cn, address, members, kind="groupOfNames", attribute="member"):
    return _entry(
        f"cn={cn},{CASES}", "objectClass: top", f"objectClass: {kind}",
        "objectClass: inetLocalMailRecipient", f"cn: {cn}", f"mailLocalAddress: {address}",
        *[f"{attribute}: {m}" for m in members])


def _cases_ldif() -> str:
    carol_cn = base64.b64encode("Carol Müller".encode()).decode()
    entries = [
        "# Entries for the directory tests, on top of etc/quickstart-users.ldif.\n"
        + _entry(CASES, "objectClass: organizationalUnit", "ou: cases"),
        _entry(CAROL_DN, "objectClass: top", "objectClass: person",
               "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
               "uid: carol", f"cn:: {carol_cn}", "sn: M", "mail: Carol@Example.TEST",
               "userPassword: carol-password"),
        _person("dave", "dave@example.test", "mailRoutingAddress: dave@elsewhere.example",
                "userPassword: dave-password", classes=("inetLocalMailRecipient",)),
        _person("nopass", "nopass@example.test"),
        _person("twin", "twin1@example.test", "userPassword: twin-password"),
        _entry(f"cn=twin2,{CASES}", "objectClass: top", "objectClass: person",
               "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
               "cn: twin2", "sn: twin", "uid: twin", "mail: twin2@example.test",
               "userPassword: twin-password"),
        _entry(f"cn=partner,{CASES}", "objectClass: top", "objectClass: person",
               "objectClass: organizationalPerson", "objectClass: inetOrgPerson",
               "cn: partner", "sn: partner", "mail: partner@elsewhere.example"),
        _alias("list", ["list@example.test"],
               ["bob@example.test", "Friend@Elsewhere.Example", "team@example.test"]),
        _alias("ping", ["ping@example.test"], ["pong@example.test"]),
        _alias("pong", ["pong@example.test"], ["ping@example.test"]),
        _alias("ghost", ["ghost@example.test"], ["nobody@example.test"]),
        _group("all", "all@example.test", [f"cn=team,ou=groups,{SUFFIX}", CAROL_DN, ALICE_DN]),
        _group("ops", "ops@example.test", [f"{BOB_DN}#'0101'B", CAROL_DN],
               kind="groupOfUniqueNames", attribute="uniqueMember"),
        _group("loop-a", "loop-a@example.test", [f"cn=loop-b,{CASES}", ALICE_DN]),
        _group("loop-b", "loop-b@example.test", [f"cn=loop-a,{CASES}", BOB_DN]),
        _group("partial", "partial@example.test", [f"uid=gone,{CASES}", BOB_DN]),
        _group("vanished", "vanished@example.test", [f"uid=gone,{CASES}", f"uid=lost,{CASES}"]),
        _alias("halfway", ["halfway@example.test"], ["nobody@example.test", "bob@example.test"]),
        _group("partners", "partners@example.test", [f"cn=partner,{CASES}", BOB_DN]),
        _group("spaced", "spaced@example.test",
               ["UID=Alice, OU=People, DC=Example, DC=Test", ALICE_DN, BOB_DN]),
    ]
    for level in range(DEEP_LEVELS):
        below = f"cn=deep{level + 1},{CASES}" if level + 1 < DEEP_LEVELS else ALICE_DN
        entries.append(_group(f"deep{level}", f"deep{level}@example.test", [below]))
    return "\n".join(entries)


CASES_LDIF = _cases_ldif()


def write_cases(folder: Path) -> Path:
    path = folder / "cases.ldif"
    path.write_text(CASES_LDIF)
    return path


def cases_settings(**overrides) -> LDAPSettings:
    values = dict(base_dn=SUFFIX, bind_dn=SERVICE_DN, bind_password=SERVICE_PASSWORD,
                  local_domains=("example.test",), connect_timeout=2.0, operation_timeout=3.0)
    values.update(overrides)
    return LDAPSettings(**values)


@pytest.fixture(scope="session")
def cases_files(tmp_path_factory):
    """(cases LDIF, quick start + cases in one file) written once."""
    folder = tmp_path_factory.mktemp("directory-cases")
    cases = write_cases(folder)
    combined = folder / "combined.ldif"
    combined.write_text(QUICKSTART_LDIF.read_text() + "\n" + CASES_LDIF)
    return cases, combined


@pytest.fixture(scope="session")
def cases_slapd(cases_files):
    """A shared slapd holding the quick start and the cases."""
    ldif = [QUICKSTART_LDIF, cases_files[0]]
    yield shared_slapd(ldif)
    release_shared(ldif)


@pytest.fixture(params=["embedded", pytest.param("slapd", marks=pytest.mark.ldap)])
def backend(request, cases_files) -> LDAPDirectory:
    """The quick-start + cases directory, embedded or on a real slapd;
    calls complete synchronously."""
    cases, combined = cases_files
    if request.param == "embedded":
        directory = embedded_directory(str(combined), cases_settings(), **sync_directory_kwargs())
    else:
        server = request.getfixturevalue("cases_slapd")
        directory = LDAPDirectory(cases_settings(uris=(server.uri,)), **sync_directory_kwargs())
    yield directory
    directory.close()


# -- the Active-Directory-shaped tree ------------------------------------------

AD_LDIF = DATA / "ad-tree.ldif"
AD_SCHEMA = DATA / "ad.schema"
AD_SUFFIX = "dc=corp,dc=example,dc=test"
AD_USERS = f"cn=Users,{AD_SUFFIX}"
AD_SLAPD_OPTIONS = dict(
    suffix=AD_SUFFIX, schemas=(str(AD_SCHEMA),), memberof="group",
    indexes=("objectClass", "mail", "proxyAddresses", "sAMAccountName", "userPrincipalName",
             "member"),
)
AD_DOMAIN_FILTER = "(&(objectClass=msExchAcceptedDomain)(msExchAcceptedDomainName={domain}))"


def ad_dn(cn: str) -> str:
    return f"cn={cn},{AD_USERS}"


def ad_settings(**overrides) -> LDAPSettings:
    """The activedirectory preset on the AD-shaped tree; corp.example.test
    is local by configuration, sales.example.test by the directory."""
    values = dict(schema="activedirectory", base_dn=AD_SUFFIX,
                  bind_dn=ad_dn("Mail Service"), bind_password="service-password",
                  local_domains=("corp.example.test",), domain_filter=AD_DOMAIN_FILTER,
                  domain_base_dn=f"cn=Configuration,{AD_SUFFIX}",
                  connect_timeout=2.0, operation_timeout=3.0)
    values.update(overrides)
    return LDAPSettings(**values)


@pytest.fixture(scope="session")
def ad_slapd():
    """A shared slapd holding the AD-shaped tree, memberof overlay on."""
    yield shared_slapd([AD_LDIF], **AD_SLAPD_OPTIONS)
    release_shared([AD_LDIF], **AD_SLAPD_OPTIONS)


def make_backend(request, kind: str, ldif: Path, settings: LDAPSettings,
                 slapd_fixture: str) -> LDAPDirectory:
    if kind == "embedded":
        return embedded_directory(str(ldif), settings, **sync_directory_kwargs())
    server = request.getfixturevalue(slapd_fixture)
    return LDAPDirectory(dataclasses.replace(settings, uris=(server.uri,)),
                         **sync_directory_kwargs())


@pytest.fixture(params=["embedded", pytest.param("slapd", marks=pytest.mark.ldap)])
def backend_kind(request):
    """Which backend: "embedded" or "slapd"."""
    return request.param


@pytest.fixture
def ad_backend(request, backend_kind) -> LDAPDirectory:
    """The AD-shaped tree with ``ad_settings()``, embedded or on slapd."""
    directory = make_backend(request, backend_kind, AD_LDIF, ad_settings(), "ad_slapd")
    yield directory
    directory.close()


@pytest.fixture
def ad_directory(request, backend_kind):
    """``make(**overrides)``: AD-tree directories with other settings."""
    made = []

    def make(**overrides) -> LDAPDirectory:
        directory = make_backend(request, backend_kind, AD_LDIF, ad_settings(**overrides), "ad_slapd")
        made.append(directory)
        return directory

    yield make
    for directory in made:
        directory.close()


# -- the quick start with restrictions and grants ---------------------------------

EXTRAS_LDIF = DATA / "openldap-extras.ldif"
EXTRAS_SLAPD_OPTIONS = dict(schemas=(str(AD_SCHEMA),), memberof="groupOfNames")
EXTRAS = "ou=extras," + SUFFIX
LISTS_DOMAIN_FILTER = "(&(objectClass=domainRelatedObject)(associatedDomain={domain}))"


def extras_settings(**overrides) -> LDAPSettings:
    values = dict(member_of_attribute="memberOf",
                  allowed_sender_attributes=("authOrig", "dLMemSubmitPerms"),
                  send_as_attributes=("publicDelegates",),
                  domain_filter=LISTS_DOMAIN_FILTER)
    values.update(overrides)
    return cases_settings(**values)


@pytest.fixture(scope="session")
def extras_files(tmp_path_factory):
    """The quick start and the extras in one file, for the embedded backend."""
    path = tmp_path_factory.mktemp("directory-extras") / "extras.ldif"
    path.write_text(QUICKSTART_LDIF.read_text() + "\n" + EXTRAS_LDIF.read_text())
    return path


@pytest.fixture(scope="session")
def extras_slapd():
    """A shared slapd: quick start + extras, memberof overlay for groupOfNames."""
    ldif = [QUICKSTART_LDIF, EXTRAS_LDIF]
    yield shared_slapd(ldif, **EXTRAS_SLAPD_OPTIONS)
    release_shared(ldif, **EXTRAS_SLAPD_OPTIONS)


@pytest.fixture
def extras_directory(request, backend_kind, extras_files):
    """``make(**overrides)``: quick start + extras directories, embedded or
    on slapd (``backend_kind`` picks)."""
    made = []

    def make(**overrides) -> LDAPDirectory:
        directory = make_backend(request, backend_kind, extras_files, extras_settings(**overrides),
                                 "extras_slapd")
        made.append(directory)
        return directory

    yield make
    for directory in made:
        directory.close()
