"""DirectoryChecker through a twisted.cred Portal."""

from __future__ import annotations

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from mailserver.directory.cache import CachingDirectory
from mailserver.directory.cred import AccountId, DirectoryChecker, TemporaryAuthFailure
from mailserver.directory.interfaces import Account
from mailserver.errors import TempFailure, to_reply
from mailserver import reply as R
from mailserver.testing import FakeDirectory


class IAvatar(Interface):
    pass


@implementer(IRealm)
class Realm:
    def __init__(self):
        self.ids = []

    def requestAvatar(self, avatarId, mind, *interfaces):
        self.ids.append(avatarId)
        return IAvatar, avatarId, lambda: None


def outcome(d: defer.Deferred):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


@pytest.fixture
def fake():
    return FakeDirectory(passwords={"alice": "alice-password", "bob": "bob-pässword"})


@pytest.fixture
def portal(fake):
    realm = Realm()
    p = Portal(realm, [DirectoryChecker(fake)])
    p.realm_ = realm
    return p


def login(portal, user, password):
    return outcome(portal.login(UsernamePassword(user, password), None, IAvatar))


def test_interfaces(fake):
    checker = DirectoryChecker(fake)
    assert ICredentialsChecker.providedBy(checker)
    assert checker.credentialInterfaces == (IUsernamePassword,)
    assert IUsernameHashedPassword not in checker.credentialInterfaces


def test_success_gives_bytes_avatar_id_with_account(portal):
    result = login(portal, b"alice", b"alice-password")
    assert not isinstance(result, Failure), result
    interface, avatar_id, _logout = result
    assert interface is IAvatar
    assert avatar_id == b"alice" and isinstance(avatar_id, bytes)
    assert isinstance(avatar_id, AccountId)
    assert avatar_id.account == Account(login="alice", address="alice")
    assert portal.realm_.ids == [b"alice"]


def test_text_credentials_and_utf8_passwords(portal):
    assert login(portal, "alice", "alice-password")[1] == b"alice"
    assert login(portal, b"bob", "bob-pässword".encode("utf-8"))[1] == b"bob"


@pytest.mark.parametrize("user,password", [
    (b"alice", b"wrong"),
    (b"nobody", b"alice-password"),
    (b"alice", b""),
    (b"", b"alice-password"),
    (b"alice", b"alice-password\xff"),  # not UTF-8
    (b"\xffalice", b"alice-password"),
])
def test_refusals_are_unauthorized_login(portal, user, password):
    result = login(portal, user, password)
    assert isinstance(result, Failure)
    assert result.check(UnauthorizedLogin)
    assert not result.check(TemporaryAuthFailure)


def test_empty_password_never_reaches_the_directory(portal, fake):
    login(portal, b"alice", b"")
    assert ("authenticate", "alice") not in fake.calls


def test_outage_is_a_temporary_failure_not_unauthorized(portal, fake):
    fake.down = True
    result = login(portal, b"alice", b"alice-password")
    assert isinstance(result, Failure)
    assert result.check(TemporaryAuthFailure)
    assert not result.check(UnauthorizedLogin)
    assert isinstance(result.value, TempFailure)
    assert to_reply(result.value) == R.AUTH_TEMPORARY
    assert (to_reply(result.value).code, to_reply(result.value).enhanced) == (454, (4, 7, 0))


def test_other_errors_pass_through(fake):
    def broken(login, password):
        raise RuntimeError("bug")

    fake.authenticate = broken
    result = outcome(DirectoryChecker(fake).requestAvatarId(UsernamePassword(b"a", b"b")))
    assert result.check(RuntimeError)


def test_works_through_the_cache(fake):
    checker = DirectoryChecker(CachingDirectory(fake, clock=object()))
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"alice-password"))
    assert outcome(d) == b"alice"
    fake.passwords["alice"] = "new"
    result = outcome(checker.requestAvatarId(UsernamePassword(b"alice", b"alice-password")))
    assert result.check(UnauthorizedLogin)


def test_avatar_id_is_the_canonical_login(fake):
    fake.authenticate = lambda login, password: defer.succeed(
        Account(login="alice", address="alice@example.test", dn="uid=alice,dc=example,dc=test"))
    avatar_id = outcome(DirectoryChecker(fake).requestAvatarId(
        UsernamePassword(b"Alice@Example.Test", b"x")))
    assert avatar_id == b"alice"
    assert avatar_id.account.dn == "uid=alice,dc=example,dc=test"
    assert "alice@example.test" in repr(avatar_id)
