# -*- test-case-name: tests.unit.test_msgauth -*-
"""Blocking DNS for the authentication libraries, with a time budget.

dkimpy, pyspf and our DMARC lookup all ask DNS synchronously.  They run on
a worker thread (never the reactor's), each check with one
:class:`Lookups`: a dnspython resolver pointed at the configured
nameservers (``[relay] nameservers``, the queue's servers; none = the
system's resolv.conf) and a deadline shared by every query of the check.
A query past the deadline, a timeout, SERVFAIL or REFUSED raises
:class:`DNSTrouble`, which the checks report as ``temperror``; NXDOMAIN and
an empty answer are simply "no records".

pyspf looks names up through a module-level function; :func:`install_spf_hook`
replaces it once with one that uses the :class:`Lookups` of the current
thread (set by :func:`using`), and pyspf's own lookup everywhere else.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterable, List, Optional, Tuple

import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver


class DNSTrouble(Exception):
    """DNS could not answer now (timeout, SERVFAIL, budget spent)."""


def nameserver_addresses(entries: Iterable[str]) -> List[Tuple[str, int]]:
    """``"ip"`` or ``"ipv4:port"`` entries as ``(host, port)``; a bare IPv6
    address has several colons and no port."""
    out = []
    for entry in entries:
        host, port = entry, 53
        if entry.count(":") == 1:
            host, _, p = entry.partition(":")
            port = int(p)
        out.append((host, port))
    return out


def make_dns_resolver(nameservers: Iterable[str] = (), *, per_try: float = 2.0):
    """A dnspython resolver that asks only ``nameservers`` (or resolv.conf)."""
    servers = nameserver_addresses(nameservers)
    try:
        resolver = dns.resolver.Resolver(configure=not servers)
    except dns.resolver.NoResolverConfiguration:  # no usable resolv.conf: as libc does
        resolver = dns.resolver.Resolver(configure=False)
        servers = [("127.0.0.1", 53)]
    if servers:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    resolver.timeout = per_try
    resolver.cache = None
    return resolver


class Lookups:
    """The DNS queries of one check, all within ``budget`` seconds."""

    def __init__(self, resolver, budget: float, clock: Callable[[], float] = time.monotonic):
        self.resolver = resolver
        self.clock = clock
        self.deadline = clock() + budget
        self.missing: set = set()  # names that had no TXT record (NXDOMAIN or none)

    def query(self, name: str, rdtype: str) -> list:
        """The rdata of ``name``/``rdtype``; [] when there are none."""
        remaining = self.deadline - self.clock()
        if remaining <= 0:
            raise DNSTrouble(f"{name} {rdtype}: time budget spent")
        try:
            answer = self.resolver.resolve(name, rdtype, lifetime=remaining, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.YXDOMAIN):
            return []
        except dns.exception.Timeout:
            raise DNSTrouble(f"{name} {rdtype}: timed out") from None
        except dns.resolver.NoNameservers:
            raise DNSTrouble(f"{name} {rdtype}: no server answered (SERVFAIL or REFUSED)") \
                from None
        except dns.exception.DNSException as e:
            raise DNSTrouble(f"{name} {rdtype}: {e.__class__.__name__}") from None
        return list(answer)

    def txt_strings(self, name: str) -> List[bytes]:
        """Each TXT record of ``name``, its strings joined."""
        records = [b"".join(r.strings) for r in self.query(name, "TXT")]
        if not records:
            self.missing.add(name.lower().rstrip("."))
        return records

    def dkim_txt(self, name, timeout: Optional[float] = None) -> Optional[bytes]:
        """dkimpy's ``dnsfunc``: the first TXT record of ``name`` or None."""
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        records = self.txt_strings(name)
        return records[0] if records else None

    def spf_lookup(self, name: str, qtype: str) -> list:
        """pyspf's ``DNSLookup`` contract: ``[((name, qtype), value)]``."""
        out = []
        for rdata in self.query(name, qtype):
            if qtype in ("A", "AAAA"):
                value = rdata.address
            elif qtype == "MX":
                value = (rdata.preference, rdata.exchange)
            elif qtype == "PTR":
                value = rdata.target.to_text(True)
            elif qtype in ("TXT", "SPF"):
                value = rdata.strings
            else:
                continue
            out.append(((name, qtype), value))
        return out


_current = threading.local()


@contextlib.contextmanager
def using(lookups: Lookups):
    """Let pyspf's lookups on this thread go through ``lookups``."""
    previous = getattr(_current, "lookups", None)
    _current.lookups = lookups
    try:
        yield lookups
    finally:
        _current.lookups = previous


_installed = False
_install_lock = threading.Lock()


def install_spf_hook() -> None:
    """Route pyspf's DNS through the thread's :class:`Lookups` (idempotent)."""
    global _installed
    import spf

    with _install_lock:
        if _installed:
            return
        original = spf.DNSLookup

        def lookup(name, qtype, strict=True, timeout=None, *args, **kwargs):
            lookups = getattr(_current, "lookups", None)
            if lookups is None:
                return original(name, qtype, strict, timeout)
            try:
                return lookups.spf_lookup(name, qtype)
            except DNSTrouble as e:
                raise spf.TempError(f"DNS {e}") from None

        spf.DNSLookup = lookup
        _installed = True
