# -*- test-case-name: tests.unit.test_privileges -*-
"""Running as root only long enough to bind ports.

twistd calls ``privilegedStartService`` as root (ports below 1024 are bound
there), then switches to ``--uid``/``--gid``, then calls ``startService``.
Everything the server writes must therefore belong to that user *before* the
switch.  This module decides who the service user is (:func:`identity`) and,
while the service is built, makes the directories and files the server needs
and hands them to that user (:func:`prepare`): what it creates it chowns;
an existing directory the user cannot write, or a file it cannot read, stops
the start with one line naming the path and the fix.  Work that reads or
writes the spool (sweeping scratch files, queue recovery) runs in
``startService``, as the service user.

Started as another user nothing changes hands: the directories are made
(with the same modes) and that user runs the server.
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from mailserver.errors import ConfigError


@dataclass(frozen=True)
class Identity:
    """The user and groups the server runs as after the switch."""

    uid: int
    gid: int
    name: str
    groups: Tuple[int, ...]

    @property
    def group_name(self) -> str:
        try:
            return grp.getgrgid(self.gid).gr_name
        except KeyError:
            return str(self.gid)


def _uid(config, value) -> Tuple[int, str]:
    try:
        entry = pwd.getpwuid(int(value)) if str(value).isdigit() else pwd.getpwnam(value)
    except KeyError:
        raise ConfigError(config.path, "server.user", f"no such user {value!r}") from None
    return entry.pw_uid, entry.pw_name


def _gid(config, value) -> int:
    if str(value).isdigit():
        return int(value)
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(config.path, "server.group", f"no such group {value!r}") from None


def identity(config, uid: Optional[int] = None, gid: Optional[int] = None,
             euid: Optional[int] = None) -> Optional[Identity]:
    """Who the server runs as once the ports are bound, or None (no switch).

    ``uid``/``gid`` are twistd's ``--uid``/``--gid``; they win over
    ``[server] user``/``group``, which count only when started as root.
    Running as root without a switch is refused unless
    ``server.allow_root``.  Raises :class:`ConfigError`.
    """
    euid = os.geteuid() if euid is None else euid
    if euid != 0:
        return None
    name = None
    if uid is None and config.server.user:
        uid, name = _uid(config, config.server.user)
    if gid is None and config.server.group and name is not None:
        gid = _gid(config, config.server.group)
    if uid is None or uid == 0:
        if not config.server.allow_root:
            raise ConfigError(config.path, "server.user",
                              "refusing to run as root: set server.user (or start twistd "
                              "with --uid/--gid), or set server.allow_root = true")
        return None
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    try:
        groups = tuple(os.getgrouplist(name, gid))
    except OSError:
        groups = (gid,)
    return Identity(uid=uid, gid=gid, name=name, groups=groups)


def _allows(st: os.stat_result, who: Identity, bits: int) -> bool:
    """Would ``who`` get ``bits`` (a mix of R_OK, W_OK, X_OK) on a file with ``st``?"""
    if st.st_uid == who.uid:
        shift = 6
    elif st.st_gid in who.groups:
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & bits == bits


def _reachable(path: str, who: Identity) -> Optional[str]:
    """The first ancestor of ``path`` that ``who`` cannot enter, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts)):
        ancestor = os.sep.join(parts[:i]) or os.sep
        try:
            st = os.stat(ancestor)
        except OSError:
            return None  # made below, by us
        if not _allows(st, who, os.X_OK):
            return ancestor
    return None


class Preparer:
    """Makes the server's directories and files and gives them to ``who``."""

    def __init__(self, config, who: Optional[Identity]) -> None:
        self.config = config
        self.who = who

    def _refuse(self, key: str, path: str, problem: str, fix: str) -> None:
        raise ConfigError(self.config.path, key, f"{path}: {problem}; {fix}")

    def _give(self, path: str) -> None:
        if self.who is not None:
            os.chown(path, self.who.uid, self.who.gid, follow_symlinks=False)

    def directory(self, key: str, path: str, mode: int = 0o700, writable: bool = True) -> None:
        """``path`` exists, is a directory the service user can write (or,
        with ``writable=False``, is made for it when missing)."""
        missing: List[str] = []
        p = os.path.abspath(path)
        while not os.path.isdir(p):
            if os.path.lexists(p):
                self._refuse(key, p, "not a directory", "remove it or change the setting")
            missing.append(p)
            p = os.path.dirname(p)
        who = self.who
        if who is not None:
            blocked = _reachable(path, who)
            if blocked is not None:
                self._refuse(key, path, f"user {who.name} cannot reach it ({blocked} is closed "
                             "to it)", f"run: chmod o+x {blocked}, or choose another directory")
        for p in reversed(missing):
            os.mkdir(p, mode)
            os.chmod(p, mode)  # whatever the umask
            self._give(p)
        if who is not None and writable and not missing:
            st = os.stat(path)
            if not _allows(st, who, os.W_OK | os.X_OK):
                self._refuse(key, path, f"not writable by user {who.name}",
                             f"run: chown -R {who.name}:{who.group_name} {path}")

    def readable(self, key: str, path: str) -> None:
        """The service user can read ``path`` (re-read at SIGHUP)."""
        who = self.who
        if who is None or not path or not os.path.exists(path):
            return
        blocked = _reachable(path, who)
        if blocked is not None or not _allows(os.stat(path), who, os.R_OK):
            self._refuse(key, path, f"not readable by user {who.name}, who re-reads it at "
                         "SIGHUP", f"run: chgrp {who.group_name} {path} && chmod g+r {path}")

    def give(self, paths: Iterable[str]) -> None:
        """Hand files the server just made (a self-signed pair) to the user."""
        for p in paths:
            self._give(p)


def prepare(config, who: Optional[Identity]) -> Preparer:
    """Make and hand over every directory the server writes; check the files
    it reads.  Raises :class:`ConfigError` naming the path and the fix."""
    from mailserver.config import parse_address
    from mailserver.queue.spool import STATES

    p = Preparer(config, who)
    spool = config.server.spool_dir
    p.directory("server.spool_dir", spool)
    p.directory("server.spool_dir", os.path.join(spool, "incoming"))
    queue = config.queue.directory
    p.directory("queue.directory", queue)
    for sub in ("data", "tmp", *STATES):
        p.directory("queue.directory", os.path.join(queue, sub))
    p.directory("store.maildir_root", config.store.maildir_root)
    for i, lc in enumerate(config.listeners):
        kind, path, _port = parse_address(lc.address)
        if kind == "unix":  # others (an MTA in our group) connect through it
            p.directory(f"listeners[{i}].address", os.path.dirname(path), 0o750)
    tls = config.tls
    if tls.certificate:
        for key, path in (("tls.certificate", tls.certificate),
                          ("tls.private_key", tls.private_key)):
            if os.path.exists(path):
                p.readable(key, path)
            elif tls.self_signed:
                p.directory(key, os.path.dirname(path), 0o750, writable=False)
        for name, path in tls.sni.items():
            p.readable(f"tls.sni.{name}", path)
    if config.directory.backend == "ldif":
        p.readable("directory.ldif_file", config.directory.ldif_file)
    return p

