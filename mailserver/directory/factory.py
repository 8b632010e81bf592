# -*- test-case-name: tests.unit.test_config -*-
"""Build the configured directory backend from the ``[directory]`` table.

``ldap`` talks to real servers; ``ldif`` loads a file into ldap3's in-process
server.  Both are the same :class:`~mailserver.directory.ldap.LDAPDirectory`
with a different connector, so lookups run the same filters either way.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mailserver.directory.ldap import LDAPDirectory, LDAPSettings


def settings_from_config(dconfig, local_domains: Sequence[str],
                         relay_domains: Sequence[str] = ()) -> LDAPSettings:
    """``LDAPSettings`` from a ``DirectoryConfig``: same-named fields map 1:1."""
    names = {f.name for f in dataclasses.fields(LDAPSettings)}
    values = {f.name: getattr(dconfig, f.name) for f in dataclasses.fields(dconfig)
              if f.name in names}
    return LDAPSettings(local_domains=tuple(local_domains),
                        relay_domains=tuple(relay_domains), **values)


def directory_from_config(dconfig, local_domains: Sequence[str], reactor, threadpool,
                          relay_domains: Sequence[str] = ()):
    """The directory the config names, running its LDAP calls on ``threadpool``."""
    settings = settings_from_config(dconfig, local_domains, relay_domains)
    if dconfig.backend == "ldif":
        from mailserver.directory.ldif import embedded_directory

        return embedded_directory(dconfig.ldif_file, settings, reactor=reactor,
                                  threadpool=threadpool)
    return LDAPDirectory(settings, reactor=reactor, threadpool=threadpool)
