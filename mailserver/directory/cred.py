# -*- test-case-name: tests.unit.test_directory_cred -*-
"""The directory as a ``twisted.cred`` credentials checker.

Submission (SMTP AUTH) and POP3 log users in through a
:class:`twisted.cred.portal.Portal`; :class:`DirectoryChecker` is the checker
they share.  It accepts ``IUsernamePassword`` credentials and asks the
directory's ``authenticate``.

Three outcomes, kept apart on purpose:

* success: the Deferred fires with an :class:`AccountId`;
* wrong password, unknown login, empty password or a login/password that is
  not UTF-8: ``UnauthorizedLogin``, the same for all of them so a client
  cannot tell which one it hit (535 5.7.8, ``-ERR [AUTH]``);
* the directory cannot answer: :class:`TemporaryAuthFailure`, which is *not*
  an ``UnauthorizedLogin``: the protocols answer 454 4.7.0 or
  ``-ERR [SYS/TEMP]`` and the client retries, rather than telling the user
  their password is wrong.

Avatar IDs.  Twisted's own username/password checkers return the username as
``bytes``, and so does this one: an :class:`AccountId` *is* ``bytes`` (the
directory's canonical login, UTF-8 encoded, which may differ from what the
user typed, e.g. ``alice`` for ``alice@example.test``), and it also carries
the whole :class:`~mailserver.directory.interfaces.Account` as ``.account``
so a realm needs no second lookup to find the address or DN.
"""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from zope.interface import implementer

from mailserver import reply as R
from mailserver.directory.interfaces import Account
from mailserver.errors import DirectoryUnavailable, TempFailure


class TemporaryAuthFailure(TempFailure):
    """The password could not be checked now (directory unavailable): 454 4.7.0."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(R.AUTH_TEMPORARY, reason)


class AccountId(bytes):
    """An avatar ID: the account's login as UTF-8 bytes, plus ``.account``."""

    account: Account

    def __new__(cls, account: Account) -> "AccountId":
        self = super().__new__(cls, account.login.encode("utf-8"))
        self.account = account
        return self

    def __repr__(self) -> str:
        return f"AccountId({bytes(self)!r}, address={self.account.address!r})"


def _text(value) -> str:
    """A credential field as text; bytes must be UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is handled by the caller
    return str(value)


@implementer(ICredentialsChecker)
class DirectoryChecker:
    """Check ``IUsernamePassword`` credentials against an ``IDirectory``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, directory) -> None:
        self.directory = directory

    def requestAvatarId(self, credentials) -> defer.Deferred:
        try:
            login = _text(credentials.username)
            password = _text(credentials.password)
        except UnicodeDecodeError:
            return defer.fail(UnauthorizedLogin("login or password is not UTF-8"))
        if not login or not password:
            # Never let an empty password reach a bind: that is an anonymous
            # bind, and the server would call it a success.
            return defer.fail(UnauthorizedLogin("empty login or password"))
        d = defer.maybeDeferred(self.directory.authenticate, login, password)
        d.addCallbacks(self._checked, self._unavailable)
        return d

    @staticmethod
    def _checked(account) -> AccountId:
        if account is None:
            raise UnauthorizedLogin("wrong login or password")
        return AccountId(account)

    @staticmethod
    def _unavailable(failure):
        failure.trap(DirectoryUnavailable)
        raise TemporaryAuthFailure(failure.value.reason or str(failure.value))
