# -*- test-case-name: tests.unit.test_delivery_remote -*-
"""Remote delivery: find a domain's mail exchangers and hand the message to one.

:class:`MXResolver` turns a recipient domain into :class:`Destination` values
(host, preference, addresses), best first, through an injected twisted.names
``IResolver``.  :class:`RemoteDelivery` walks them, asking an injected
``connect`` (``protocols.outbound.deliver_to_host``) for one transaction per
address until one gives a final answer.

DNS (RFC 5321 §5.1, RFC 7505, RFC 2181 §10.3):

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
  our own SMTP listeners (:class:`OwnListeners`: an address of this machine
  and a port we listen on).  The port matters: another server on this
  machine (a test instance, a content filter on 127.0.0.1:10025) is not us.

Attempts (:func:`attempt_delivery`): at most ``max_addresses`` connections
(Postfix ``smtp_mx_address_limit``, 5).  A connection failure, or a report
with ``retry_elsewhere`` (greeting, EHLO, STARTTLS or MAIL failed; ``connect``
sets it for a 5xx greeting too, like Postfix ``smtp_skip_5xx_greeting``),
moves on to the next address with the recipients not yet accepted.  RCPT and
DATA replies are final.  When all fail, each recipient gets the last
temporary reply seen for it; a permanent connection-level reply stands only
if nothing was temporary, so a backup MX refusing us never bounces mail
while the primary is down.  DNS verdicts about next hops the administrator
configured (``RemoteDelivery.via``, the transport map) are made temporary
(``5.x.y`` becomes ``451 4.x.y``): the mail waits for a fix.
"""

from __future__ import annotations

import ipaddress
import random as _random
import socket
import time
from dataclasses import dataclass, replace
from inspect import isawaitable
from itertools import zip_longest
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.logger import Logger
from twisted.names import dns
from twisted.names import error as dns_error
from zope.interface import implementer

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, IDeliveryTarget, OutboundMessage
from mailserver.errors import PermFailure, ReplyError, TempFailure
from mailserver.reply import Reply

log = Logger(namespace="mailserver.remote")

MAX_CNAME_HOPS = 8
"""Longest CNAME chain followed for a recipient domain or a configured host."""

MAX_MX_HOSTS = 16
"""MX hosts whose addresses are looked up, best first; the rest are ignored."""

DEFAULT_FAMILIES = ("ipv6", "ipv4")
TLS_MODES = ("none", "may", "encrypt", "verify")

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


@dataclass(frozen=True)
class TLSPolicy:
    """How to use TLS with a next hop; passed through to ``connect``.

    ``mode``: ``none`` (never STARTTLS), ``may`` (STARTTLS when offered,
    certificate not checked), ``encrypt`` (STARTTLS required) or ``verify``
    (required, and the certificate must match the MX host name, checked with
    service_identity).  ``trust_root`` is handed to ``connect`` unchanged.
    """

    mode: str = "may"
    trust_root: Any = None

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ValueError(f"TLS policy {self.mode!r}: use one of {', '.join(TLS_MODES)}")


TLSPolicySpec = Union[None, str, TLSPolicy, Mapping[str, Union[str, TLSPolicy]],
                      Callable[[str], Union[str, TLSPolicy]]]


def tls_policy_for(spec: TLSPolicySpec, name: str) -> TLSPolicy:
    """The TLS policy for next-hop ``name`` under ``spec``.

    ``spec`` is ``None`` ("may" everywhere), one policy for all, a callable
    ``name -> policy``, or a mapping looked up like the transport map: the
    exact name, then ``.parent`` entries from the closest, then ``*``, then
    ``may``.  Policies may be given as mode strings.
    """
    if spec is None:
        found: Any = "may"
    elif isinstance(spec, (str, TLSPolicy)):
        found = spec
    elif callable(spec) and not isinstance(spec, Mapping):
        found = spec(name)
    else:
        key = next((k for k in lookup_keys(name.lower()) + ["*"] if k in spec), None)
        found = spec[key] if key is not None else "may"
    return found if isinstance(found, TLSPolicy) else TLSPolicy(found)


def lookup_keys(domain: str) -> List[str]:
    """Map keys tried for ``domain``: itself, then ``.parent`` keys, closest first."""
    labels = domain.split(".")
    return [domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


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


def domain_of(address: str) -> str:
    """The lower-cased domain of ``address`` ("" when it has none)."""
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


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
        raise PermFailure(_fill(R.DOMAIN_NOT_FOUND, domain=domain)) from None


def _canonical_ip(text: str) -> Optional[str]:
    try:
        return ipaddress.ip_address(text.strip("[]")).compressed
    except ValueError:
        return None


def _fill(template: Reply, **values: str) -> Reply:
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
    :class:`OwnListeners`); consulted when :meth:`destinations` is given the
    port.  ``families``: see the module docstring.  ``rng``: a
    ``random.Random`` for shuffling equal preferences.  ``timeout``: passed
    to every lookup (a twisted.names timeout sequence) when not None.
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
        self.own_addresses = frozenset(filter(None, (_canonical_ip(n) for n in own_names)))
        self.own_hosts = frozenset(_name(n) for n in own_names if _canonical_ip(n) is None)
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
                raise PermFailure(_fill(R.MAIL_LOOPS, domain=domain))
            return [Destination(literal, 0, (literal,), implicit=True)]
        if not domain:
            raise PermFailure(_fill(R.DOMAIN_NOT_FOUND, domain="(none)"))
        qname = _alabel(domain)
        try:
            records, _aliased = await self._query("lookupMailExchange", dns.MX, qname)
        except _NotFound:
            raise PermFailure(_fill(R.DOMAIN_NOT_FOUND, domain=domain)) from None
        except _Unavailable as e:
            log.warn("MX lookup for {domain} failed: {why}", domain=domain, why=str(e))
            raise TempFailure(_fill(R.DNS_UNAVAILABLE, domain=domain)) from None

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
            raise PermFailure(_fill(R.MAIL_LOOPS, domain=domain))
        if problems:
            raise TempFailure(_fill(R.DNS_UNAVAILABLE, domain=domain))
        raise TempFailure(_fill(R.NO_USABLE_MX, domain=domain))

    async def _implicit(self, domain: str, qname: str,
                        port: Optional[int]) -> List[Destination]:
        addrs, _aliased, problem = await self.addresses(qname)
        if addrs:
            if self._is_self(qname, addrs, port):
                raise PermFailure(_fill(R.MAIL_LOOPS, domain=domain))
            if problem:
                log.info("{domain}: using what resolved ({why})", domain=domain, why=problem)
            return [Destination(qname, 0, addrs, implicit=True)]
        if problem:
            log.warn("address lookup for {domain} failed: {why}", domain=domain, why=problem)
            raise TempFailure(_fill(R.DNS_UNAVAILABLE, domain=domain))
        raise PermFailure(_fill(R.NO_MAIL_ROUTE, domain=domain))


# -- is it us? ----------------------------------------------------------------------

def _unmapped(text: str):
    """The IP address in ``text`` (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped is not None else ip


class LocalAddresses:
    """``address -> bool``: is ``address`` one of this machine's?

    Loopback and unspecified addresses (``0.0.0.0`` and ``::`` connect to
    this machine too) are, without asking; for any other, binding a UDP
    socket to ``(address, 0)`` succeeds only when an interface has it.  No
    packet is sent.  Answers are kept ``ttl`` seconds (addresses come and
    go with DHCP and VPNs), at most ``max_size`` of them.
    """

    def __init__(self, *, ttl: float = 300.0, max_size: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_size = max_size
        self.clock = clock
        self._cache: Dict[str, Tuple[bool, float]] = {}

    def __call__(self, address: str) -> bool:
        ip = _unmapped(address)
        if ip is None:
            return False
        if ip.is_loopback or ip.is_unspecified:
            return True
        key, now = ip.compressed, self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        answer = self._bindable(ip)
        if key not in self._cache and len(self._cache) >= self.max_size:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[key] = (answer, now + self.ttl)
        return answer

    @staticmethod
    def _bindable(ip) -> bool:
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.bind((ip.compressed, 0))
        except OSError:  # EADDRNOTAVAIL; EAFNOSUPPORT without IPv6
            return False
        return True


class OwnListeners:
    """``(address, port) -> bool``: would a connection there reach one of our
    SMTP listeners?

    ``listeners``: ``(host, port)`` of each TCP listener, ``host`` empty (or
    ``0.0.0.0``, ``::``) for one on every address.  Such a listener is
    reached through any address of this machine (``is_local``, by default
    :class:`LocalAddresses`) at its port; one bound to an address only
    through that address.  Another port on this machine is somebody else.
    """

    def __init__(self, listeners: Iterable[Tuple[str, int]], *,
                 is_local: Optional[Callable[[str], bool]] = None) -> None:
        self.is_local = is_local or LocalAddresses()
        self._wildcard_ports = set()
        self._bound = set()
        for host, port in listeners:
            ip = _unmapped(host) if host else None
            if not host or (ip is not None and ip.is_unspecified):
                self._wildcard_ports.add(port)
            elif ip is not None:
                self._bound.add((ip, port))

    def __call__(self, address: str, port: int) -> bool:
        ip = _unmapped(address)
        if ip is None:
            return False
        if (ip, port) in self._bound:
            return True
        return port in self._wildcard_ports and self.is_local(ip.compressed)


# -- trying next hops ------------------------------------------------------------

_CONNECT_REASONS = (
    (net_error.ConnectionRefusedError, "Connection refused by", R.CONNECT_FAILED),
    ((net_error.TCPTimedOutError, net_error.TimeoutError, defer.TimeoutError, defer.CancelledError,
      net_error.ConnectingCancelledError), "Connection timed out to", R.CONNECT_FAILED),
    (net_error.NoRouteError, "No route to", R.CONNECT_FAILED),
    ((net_error.DNSLookupError, net_error.UnknownHostError), "Host not found:",
     R.CONNECT_FAILED),
    (net_error.ConnectionClosed, "Lost connection with", R.CONNECTION_LOST),
    ((net_error.ConnectError, OSError), "Cannot connect to", R.CONNECT_FAILED),
)


def connection_failure(exc: BaseException, remote: str) -> Optional[Reply]:
    """The reply for a connection-level exception from ``connect``; None when
    ``exc`` is not one (a bug, to be logged with its traceback)."""
    for kinds, words, template in _CONNECT_REASONS:
        if isinstance(exc, kinds):
            return template.with_text(f"{words} {remote}")
    return None


def _internal(message: OutboundMessage) -> Reply:
    return R.INTERNAL_ERROR.with_text(f"{R.INTERNAL_ERROR.text} ({message.queue_id})")


def same_reply(message: OutboundMessage, reply: Reply, remote: str = "") -> DeliveryReport:
    """A report giving ``reply`` to every recipient of ``message``."""
    return DeliveryReport({r.address: reply for r in message.recipients}, remote=remote)


def soften(reply: Reply) -> Reply:
    """``reply`` as a temporary failure (5.x.y becomes 451 4.x.y)."""
    if not reply.is_permanent:
        return reply
    enhanced = (4,) + tuple(reply.enhanced[1:]) if reply.enhanced else (4, 0, 0)
    return Reply(451, enhanced, reply.text)


@dataclass(frozen=True)
class Hop:
    """One connection to try: ``host`` for logs and certificate checks,
    ``address`` to connect to (an IP, a name, or None for a UNIX socket)."""

    host: str
    address: Optional[str]
    port: Optional[int]
    tls_hostname: Optional[str] = None
    unix_path: Optional[str] = None

    @property
    def remote(self) -> str:
        if self.unix_path:
            return f"unix:{self.unix_path}"
        if self.address == self.host:
            return f"{self.host}:{self.port}"
        return f"{self.host}[{self.address}]:{self.port}"


def hops_for(destinations: Sequence[Destination], port: int) -> List[Hop]:
    """One :class:`Hop` per address, in order."""
    hops = []
    for dest in destinations:
        literal = _canonical_ip(dest.host) is not None
        for address in dest.addresses:
            hops.append(Hop(dest.host, address, port, None if literal else dest.host))
    return hops


async def attempt_delivery(connect, reactor, message: OutboundMessage, hops: Sequence[Hop], *,
                           helo: str, tls: TLSPolicy, auth: Any = None, lmtp: bool = False,
                           max_addresses: int = 5) -> DeliveryReport:
    """Try ``hops`` in order (at most ``max_addresses``) until every recipient
    has a final answer for this attempt; see the module docstring.  A None
    ``reactor`` is the global one."""
    if reactor is None:
        from twisted.internet import reactor
    done: Dict[str, Reply] = {}
    details: Dict[str, str] = {}
    fallback: Dict[str, Reply] = {}
    remaining = list(message.recipients)
    remote = ""
    for hop in list(hops)[:max_addresses]:
        if not remaining:
            break
        remote = hop.remote
        attempt = replace(message, recipients=tuple(remaining))
        try:
            result = connect(reactor, hop.address, hop.port, attempt, helo=helo,
                             tls=tls.mode, tls_hostname=hop.tls_hostname,
                             trust_root=tls.trust_root, auth=auth, lmtp=lmtp,
                             unix_path=hop.unix_path)
            report, elsewhere = (await result) if isawaitable(result) else result
        except Exception as e:
            reply = connection_failure(e, remote)
            if reply is None:
                log.failure("{id}: delivery to {remote} failed", id=message.queue_id,
                            remote=remote)
                reply = _internal(message)
                done.update((r.address, reply) for r in remaining)
                remaining = []
                break
            log.info("{id}: {why}", id=message.queue_id, why=reply.text)
            report, elsewhere = same_reply(attempt, reply, remote), True
        remote = report.remote or remote
        still = []
        for r in remaining:
            reply = report.replies.get(r.address)
            if reply is None:
                log.error("{id}: {remote} gave no result for <{rcpt}>", id=message.queue_id,
                          remote=remote, rcpt=r.address)
                reply = _internal(message)
            if r.address in report.details:
                details[r.address] = report.details[r.address]
            if reply.is_positive or not elsewhere:
                done[r.address] = reply
            else:
                previous = fallback.get(r.address)
                if previous is None or not (previous.is_temporary and reply.is_permanent):
                    fallback[r.address] = reply
                still.append(r)
        if elsewhere and still:
            log.info("{id}: {remote} did not take the message ({reply}); next address",
                     id=message.queue_id, remote=remote, reply=str(fallback[still[0].address]))
        remaining = still
    for r in remaining:
        done[r.address] = fallback.get(r.address) or _fill(R.NO_USABLE_MX,
                                                           domain=domain_of(r.address))
    return DeliveryReport(replies=done, remote=remote, details=details)


@implementer(IDeliveryTarget)
class RemoteDelivery:
    """Deliver to the mail exchangers of the recipients' domain.

    ``resolver``: a twisted.names ``IResolver`` (or pass ``mx_resolver``).
    ``connect``: ``deliver_to_host``-shaped callable (see
    :func:`attempt_delivery`).  ``reactor``: None means the global reactor,
    looked up at delivery time.  ``tls_policy``: see :func:`tls_policy_for`,
    keyed by recipient domain (or configured next hop).  ``own_names`` and
    ``own_endpoint``: loop detection (see :class:`MXResolver`).
    """

    def __init__(self, resolver, connect, *, helo: str, reactor=None,
                 tls_policy: TLSPolicySpec = None, own_names: Iterable[str] = (),
                 own_endpoint: Optional[Callable[[str, int], bool]] = None, port: int = 25,
                 max_addresses: int = 5, families: Sequence[str] = DEFAULT_FAMILIES,
                 rng: Optional[_random.Random] = None, dns_timeout: Optional[Sequence[int]] = None,
                 mx_resolver: Optional[MXResolver] = None) -> None:
        self.mx = mx_resolver or MXResolver(resolver, own_names=own_names,
                                            own_endpoint=own_endpoint, families=families,
                                            rng=rng, timeout=dns_timeout)
        self.connect = connect
        self.helo = helo
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.port = port
        self.max_addresses = max_addresses

    def via(self, nexthop: str, port: Optional[int] = None) -> "NexthopDelivery":
        """A target that delivers through the MX hosts of ``nexthop`` instead
        of the recipient domain's (transport ``smtp:host:port``)."""
        return NexthopDelivery(self, nexthop.lower().rstrip("."), port or self.port)

    async def deliver(self, message: OutboundMessage) -> DeliveryReport:
        """Deliver to the recipients' domain; recipients of several domains
        (which the router never sends) are delivered domain by domain."""
        by_domain: Dict[str, list] = {}
        for r in message.recipients:
            by_domain.setdefault(domain_of(r.address), []).append(r)
        reports = [await self.deliver_to(replace(message, recipients=tuple(rcpts)), domain,
                                         self.port, configured=False)
                   for domain, rcpts in by_domain.items()]
        if len(reports) == 1:
            return reports[0]
        return DeliveryReport(replies={k: v for r in reports for k, v in r.replies.items()},
                              remote=", ".join(r.remote for r in reports if r.remote),
                              details={k: v for r in reports for k, v in r.details.items()})

    async def deliver_to(self, message: OutboundMessage, domain: str, port: int, *,
                         configured: bool) -> DeliveryReport:
        """Deliver ``message`` through the mail exchangers of ``domain``.

        ``configured``: ``domain`` is an administrator's next hop, so DNS
        verdicts about it are temporary."""
        try:
            destinations = await self.mx.destinations(domain, port)
        except ReplyError as e:
            reply = soften(e.reply) if configured else e.reply
            report = same_reply(message, reply)
        else:
            report = await attempt_delivery(
                self.connect, self.reactor, message, hops_for(destinations, port),
                helo=self.helo, tls=tls_policy_for(self.tls_policy, domain),
                max_addresses=self.max_addresses)
        return report


@implementer(IDeliveryTarget)
class NexthopDelivery:
    """:meth:`RemoteDelivery.via`: MX delivery to a configured domain."""

    def __init__(self, remote: RemoteDelivery, nexthop: str, port: int) -> None:
        self.remote = remote
        self.nexthop = nexthop
        self.port = port

    async def deliver(self, message: OutboundMessage) -> DeliveryReport:
        return await self.remote.deliver_to(message, self.nexthop, self.port,
                                            configured=True)

    def __repr__(self) -> str:
        return f"<NexthopDelivery {self.nexthop}:{self.port}>"
