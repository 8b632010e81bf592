# -*- test-case-name: tests.unit.test_delivery_remote,tests.integration.test_dns_support -*-
"""MX resolution: which hosts, at which addresses, take mail for a domain.

:class:`MXResolver` asks an injected twisted.names ``IResolver`` and answers
:class:`Destination` values, best first, or raises the reply that every
recipient in the domain should get.  :class:`~mailserver.delivery.remote.RemoteDelivery`
uses it for recipient domains and configured next hops, and
:class:`~mailserver.delivery.routing.FixedHostTarget` to find a configured
host's addresses.  Whether a host is this server is decided from
``own_names`` and ``own_endpoint`` (see :mod:`mailserver.delivery.loops`).

Rules (RFC 5321 §5.1, RFC 7505, RFC 2181 §10.3):

* MX hosts by ascending preference, equal preferences shuffled (``rng``); a
  host listed twice keeps its best preference.
* AAAA and A are looked up together; ``families`` (default ``("ipv6",
  "ipv4")``) says which are used and which goes first.  The two lists are
  interleaved (RFC 8305 §4, Postfix ``smtp_balance_inet_protocols``), so a
  dead family cannot use up the address budget; DNS order within a family.
* A lone MX with target ``.`` (null MX): ``556 5.1.10``.  A ``.`` target
  among other MX records is ignored.
* No MX records: the domain is its own mail exchanger (implicit MX) with
  its A/AAAA; with neither, ``550 5.4.4``.
* NXDOMAIN: ``550 5.1.2``.  SERVFAIL, REFUSED, timeouts: ``451 4.4.3``.
* The recipient domain may be a CNAME (followed, at most
  :data:`MAX_CNAME_HOPS`); an MX *target* that is one is skipped and logged,
  as are MX hosts without addresses or whose lookups failed.  Nothing left:
  ``451 4.4.3`` if a lookup failed, else ``451 4.4.4`` (temporary: a DNS fix
  saves the mail).
* Address literals (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``): that address,
  no DNS query.
* Loops: when an MX host is us, hosts at that preference or worse are
  dropped, so a backup MX relays only to better ones.  Nothing left, or an
  implicit MX or literal that is us: ``554 5.4.6``.  A host is us when its
  name or one of its addresses is in ``own_names``, or when ``own_endpoint``
  says one of its addresses, at the port we would connect to, reaches one of
  our own SMTP listeners (:class:`~mailserver.delivery.loops.OwnListeners`:
  an address of this machine and a port we listen on).  The port matters:
  another server on this machine (a test instance, a content filter on
  127.0.0.1:10025) is not us.
"""

from __future__ import annotations

import ipaddress
import random as _random
import socket
from dataclasses import dataclass
from itertools import zip_longest
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error

from mailserver import reply as R
from mailserver.errors import PermFailure, TempFailure
from mailserver.reply import Reply

log = Logger(namespace="mailserver.remote")  # one log namespace for all of remote delivery

MAX_CNAME_HOPS = 8
"""Longest CNAME chain followed for a recipient domain or a configured host."""

MAX_MX_HOSTS = 16
"""MX hosts whose addresses are looked up, best first; the rest are ignored."""

DEFAULT_FAMILIES = ("ipv6", "ipv4")

_LOOKUP = {"ipv6": ("lookupIPV6Address", dns.AAAA), "ipv4": ("lookupAddress", dns.A)}


@dataclass(frozen=True)
class Destination:
    """One mail exchanger: its name, MX preference and addresses (in order).

    ``implicit`` is true when there was no MX record (the domain itself, or
    an address literal).
    """

    host: str
    preference: int
    addresses: Tuple[str, ...]
    implicit: bool = False


def ip_literal(domain: str) -> Optional[str]:
    """The address inside ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``, else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return ipaddress.ip_address(inner).compressed
    except ValueError:
        return None


def _name(value) -> str:
    if isinstance(value, dns.Name):
        value = value.name
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.lower().rstrip(".")


def _alabel(domain: str) -> str:
    """ASCII form of ``domain`` for DNS (IDNA for UTF-8 domains)."""
    try:
        return domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise PermFailure(fill_template(R.DOMAIN_NOT_FOUND, domain=domain)) from None


def canonical_ip(text: str) -> Optional[str]:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return None


def fill_template(template: Reply, **values: str) -> Reply:
    return template.with_text(template.text.format(**values))


class _NotFound(Exception):
    """NXDOMAIN."""


class _Unavailable(Exception):
    """The DNS could not answer (SERVFAIL, REFUSED, timeout...)."""


_TEMPORARY_DNS = (dns_error.DNSServerError, dns_error.DNSQueryRefusedError,
                  dns_error.DNSFormatError, dns_error.DNSNotImplementedError,
                  dns_error.DNSUnknownError)
_NOT_FOUND = (dns_error.DNSNameError, dns_error.AuthoritativeDomainError, dns_error.DomainError)
_DNS_WORDS = (((defer.TimeoutError, net_error.TimeoutError), "timed out"),
              (dns_error.DNSServerError, "server failure"),
              (dns_error.DNSQueryRefusedError, "refused"))


def _describe_dns_error(exc: BaseException) -> str:
    words = (w for kinds, w in _DNS_WORDS if isinstance(exc, kinds))
    return next(words, type(exc).__name__)


class MXResolver:
    """Destinations for a domain, from an injected twisted.names ``IResolver``.

    ``own_names``: host names and IP addresses of this server, for loop
    detection.  ``own_endpoint``: ``(address, port) -> bool``, true when a
    connection to ``address:port`` would reach this server (see
    :class:`~mailserver.delivery.loops.OwnListeners`); consulted when
    :meth:`destinations` is given the port.  ``families``: see the module
    docstring.  ``rng``: a ``random.Random`` for shuffling equal preferences.
    ``timeout``: passed to every lookup (a twisted.names timeout sequence)
    when not None.
    """

    def __init__(self, resolver, *, own_names: Iterable[str] = (),
                 own_endpoint: Optional[Callable[[str, int], bool]] = None,
                 families: Sequence[str] = DEFAULT_FAMILIES,
                 rng: Optional[_random.Random] = None, timeout: Optional[Sequence[int]] = None,
                 max_hosts: int = MAX_MX_HOSTS) -> None:
        bad = [f for f in families if f not in _LOOKUP]
        if bad or not families or len(set(families)) != len(families):
            raise ValueError(f"address families {tuple(families)!r}: use 'ipv6' and/or 'ipv4'")
        self.resolver = resolver
        self.families = tuple(families)
        self.rng = rng or _random.Random()
        self.timeout = timeout
        self.max_hosts = max_hosts
        self.own_addresses = frozenset(filter(None, (canonical_ip(n) for n in own_names)))
        self.own_hosts = frozenset(_name(n) for n in own_names if canonical_ip(n) is None)
        self.own_endpoint = own_endpoint

    # -- queries -----------------------------------------------------------
    async def _lookup(self, method: str, name: str):
        call = getattr(self.resolver, method)
        try:
            if self.timeout is None:
                return await call(name)
            return await call(name, timeout=self.timeout)
        except _TEMPORARY_DNS as e:
            raise _Unavailable(_describe_dns_error(e)) from e
        except _NOT_FOUND as e:
            raise _NotFound(name) from e
        except Exception as e:  # timeouts, network errors, resolver bugs
            raise _Unavailable(_describe_dns_error(e)) from e

    async def _query(self, method: str, qtype: int, name: str) -> Tuple[list, bool]:
        """Records of ``qtype`` for ``name``, following CNAMEs; and whether
        ``name`` turned out to be an alias."""
        current, seen, aliased = name, [name], False
        while True:
            answers = (await self._lookup(method, current))[0]
            queried = current
            while True:
                cname = next((rr for rr in answers
                              if rr.type == dns.CNAME and _name(rr.name) == current), None)
                if cname is None:
                    break
                aliased = True
                current = _name(cname.payload.name)
                if current in seen or len(seen) > MAX_CNAME_HOPS:
                    raise _Unavailable(f"CNAME loop or chain too long at {name}")
                seen.append(current)
            records = [rr.payload for rr in answers
                       if rr.type == qtype and _name(rr.name) == current]
            if records or current == queried:
                return records, aliased

    async def addresses(self, host: str) -> Tuple[Tuple[str, ...], bool, Optional[str]]:
        """``(addresses, aliased, problem)`` for ``host``: addresses in try order,
        whether ``host`` is a CNAME, and the temporary DNS problem if a lookup
        failed (None otherwise; NXDOMAIN is just "no addresses")."""
        async def family(fam: str):
            method, qtype = _LOOKUP[fam]
            try:
                records, aliased = await self._query(method, qtype, host)
            except _NotFound:
                return [], False, None
            except _Unavailable as e:
                return [], False, f"{fam} lookup for {host} failed: {e}"
            if qtype == dns.A:
                found = [r.dottedQuad() for r in records]
            else:
                found = [socket.inet_ntop(socket.AF_INET6, r.address) for r in records]
            return found, aliased, None

        results = await defer.gatherResults(
            [defer.ensureDeferred(family(f)) for f in self.families], consumeErrors=True)
        ordered: List[str] = []
        for a in (a for row in zip_longest(*[r[0] for r in results]) for a in row if a):
            a = ipaddress.ip_address(a).compressed
            if a not in ordered:
                ordered.append(a)
        problems = [r[2] for r in results if r[2]]
        return tuple(ordered), any(r[1] for r in results), "; ".join(problems) or None

    # -- the rules -----------------------------------------------------------
    def is_self(self, host: str, addresses: Iterable[str], port: Optional[int]) -> bool:
        """Is ``host`` (at ``addresses``, reached on ``port``) this server?"""
        return self._is_self(_name(host), [canonical_ip(a) or a for a in addresses], port)

    def _is_self(self, host: str, addresses: Iterable[str], port: Optional[int]) -> bool:
        if host in self.own_hosts:
            return True
        for a in addresses:
            if a in self.own_addresses:
                return True
            if port is not None and self.own_endpoint is not None and self.own_endpoint(a, port):
                return True
        return False

    async def destinations(self, domain: str, port: Optional[int] = None) -> List[Destination]:
        """Where to deliver mail for ``domain``, best first.

        ``port``: where the connections will go, for ``own_endpoint``.
        Raises :class:`PermFailure` or :class:`TempFailure` with the reply
        every recipient in ``domain`` should get.
        """
        domain = domain.lower().rstrip(".")
        literal = ip_literal(domain)
        if literal is not None:
            if self._is_self(literal, (literal,), port):
                raise PermFailure(fill_template(R.MAIL_LOOPS, domain=domain))
            return [Destination(literal, 0, (literal,), implicit=True)]
        if not domain:
            raise PermFailure(fill_template(R.DOMAIN_NOT_FOUND, domain="(none)"))
        qname = _alabel(domain)
        try:
            records, _aliased = await self._query("lookupMailExchange", dns.MX, qname)
        except _NotFound:
            raise PermFailure(fill_template(R.DOMAIN_NOT_FOUND, domain=domain)) from None
        except _Unavailable as e:
            log.warn("MX lookup for {domain} failed: {why}", domain=domain, why=str(e))
            raise TempFailure(fill_template(R.DNS_UNAVAILABLE, domain=domain)) from None

        if not records:
            return await self._implicit(domain, qname, port)
        targets = [(r.preference, _name(r.name)) for r in records]
        if all(t == "" for _p, t in targets):
            raise PermFailure(R.NULL_MX.with_text(f"{R.NULL_MX.text}: {domain} accepts no mail"))
        best: Dict[str, int] = {}
        for pref, target in targets:
            if target and (target not in best or pref < best[target]):
                best[target] = pref
        hosts = sorted(best.items(), key=lambda hp: hp[1])
        grouped: List[Tuple[str, int]] = []
        for pref in sorted(set(best.values())):
            same = [h for h in hosts if h[1] == pref]
            self.rng.shuffle(same)
            grouped.extend(same)
        grouped = grouped[: self.max_hosts]

        found = await defer.gatherResults(
            [defer.ensureDeferred(self.addresses(h)) for h, _p in grouped], consumeErrors=True)
        own_pref = min((p for (h, p), (addrs, _a, _e) in zip(grouped, found)
                        if self._is_self(h, addrs, port)), default=None)
        out: List[Destination] = []
        problems = []
        for (host, pref), (addrs, aliased, problem) in zip(grouped, found):
            if own_pref is not None and pref >= own_pref:
                continue
            if aliased:
                log.warn("MX host {host} for {domain} is a CNAME (RFC 2181 10.3); skipped",
                         host=host, domain=domain)
                continue
            if problem:
                problems.append(problem)
            if not addrs:
                log.warn("MX host {host} for {domain} has no usable address{why}; skipped",
                         host=host, domain=domain, why=f" ({problem})" if problem else "")
                continue
            out.append(Destination(host, pref, addrs))
        if out:
            return out
        if own_pref is not None and not any(p < own_pref for _h, p in grouped):
            raise PermFailure(fill_template(R.MAIL_LOOPS, domain=domain))
        if problems:
            raise TempFailure(fill_template(R.DNS_UNAVAILABLE, domain=domain))
        raise TempFailure(fill_template(R.NO_USABLE_MX, domain=domain))

    async def _implicit(self, domain: str, qname: str,
                        port: Optional[int]) -> List[Destination]:
        addrs, _aliased, problem = await self.addresses(qname)
        if addrs:
            if self._is_self(qname, addrs, port):
                raise PermFailure(fill_template(R.MAIL_LOOPS, domain=domain))
            if problem:
                log.info("{domain}: using what resolved ({why})", domain=domain, why=problem)
            return [Destination(qname, 0, addrs, implicit=True)]
        if problem:
            log.warn("address lookup for {domain} failed: {why}", domain=domain, why=problem)
            raise TempFailure(fill_template(R.DNS_UNAVAILABLE, domain=domain))
        raise PermFailure(fill_template(R.NO_MAIL_ROUTE, domain=domain))
