# -*- test-case-name: tests.unit.test_directory_reloadable -*-
"""A directory that can be replaced while the server runs (SIGHUP).

Everything that asks the directory (the recipient policies, later the AUTH
and POP3 checkers) holds one :class:`ReloadableDirectory`.  A reload builds a
new backend from the re-read configuration and swaps it in; lookups already
running finish on the old one, which is closed afterwards.
"""

from __future__ import annotations

from zope.interface import implementer

from mailserver.directory.interfaces import IDirectory


@implementer(IDirectory)
class ReloadableDirectory:
    """Forwards every call to the current backend."""

    def __init__(self, directory) -> None:
        self.current = directory

    def swap(self, directory):
        """Make ``directory`` current; return the previous one (not closed)."""
        previous, self.current = self.current, directory
        return previous

    def resolve(self, address: str):
        return self.current.resolve(address)

    def authenticate(self, login: str, password: str):
        return self.current.authenticate(login, password)

    def is_local_domain(self, domain: str):
        return self.current.is_local_domain(domain)

    def senders_for(self, login: str):
        return self.current.senders_for(login)

    def clear(self) -> None:
        """Forget cached answers, when the backend keeps any."""
        clear = getattr(self.current, "clear", None)
        if clear is not None:
            clear()

    def close(self) -> None:
        self.current.close()
