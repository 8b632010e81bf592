# -*- test-case-name: tests.unit.test_routing -*-
"""Routing: which delivery target gets each recipient.

The queue manager calls :meth:`Router.group` with a message and gets back
``(target, part)`` pairs, where each ``part`` is the message cut down to the
recipients that go to one next hop: local recipients together, remote
recipients per domain (MX delivery), and every recipient behind one
configured relay together whatever their domains.

Transport map (Postfix ``transport(5)`` style), ``{key: value}``:

Keys, matched in this order: the exact domain (``example.org``), then its
parents written with a leading dot, closest first (``.example.org`` matches
``a.example.org`` and ``b.a.example.org``, not ``example.org`` itself), then
``*``.  Exact and dot keys also override local domains; ``*`` (and the
smarthost) applies only to domains that are not local.

Values:

``smtp:[host]:port`` / ``smtp:[host]``
    SMTP to that host, no MX lookup (port 25 by default).  ``host`` may be
    an IP address, ``[192.0.2.1]`` or ``[2001:db8::1]``.
``smtp:host:port`` / ``smtp:host``
    SMTP to the mail exchangers of ``host`` (MX lookup on ``host``).
``smtp:``
    Ordinary MX delivery to the recipient's domain (undoes a ``*`` entry).
``lmtp:host:port`` / ``lmtp:[host]:port`` / ``lmtp:inet:host:port``
    LMTP to that host, never an MX lookup (port 24 by default).
``lmtp:unix:/path``
    LMTP over a UNIX socket.
``local``
    The local maildir delivery, as for local domains.
``error:[code] [x.y.z] text``
    Refuse: every recipient gets that reply (default ``550 5.0.0``), so the
    queue bounces them.
``defer:[code] [x.y.z] text``
    Hold: every recipient gets a temporary reply (default ``451 4.3.0``).

A smarthost is the ``*`` entry with its own AUTH credentials and TLS policy:
``smtp:[relay.example.org]:587``, or a Postfix ``relayhost`` value such as
``[relay.example.org]:587`` (``smtp:`` is implied).  Giving both a smarthost
and a ``*`` entry is an error.

A configured next hop that does not resolve is a temporary failure (the
administrator must fix it); only DNS verdicts about a recipient's own domain
bounce mail.  Parse errors are :class:`ValueError` whose text names the
entry; the config loader turns them into ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace
from inspect import isawaitable
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Tuple, Union

from twisted.logger import Logger
from zope.interface import implementer

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, IDeliveryTarget, OutboundMessage
from mailserver.delivery.mx import fill_template, ip_literal
from mailserver.delivery.remote import (
    Hop, NexthopDelivery, TLSPolicy, TLSPolicySpec, attempt_delivery, domain_of,
    domain_tls_policy, lookup_keys, same_reply, soften, stricter, tls_policy_for,
)
from mailserver.errors import ReplyError, TempFailure
from mailserver.reply import Reply

KINDS = ("local", "smtp", "lmtp", "error", "defer")
SMTP_PORT = 25
LMTP_PORT = 24

log = Logger(namespace="mailserver.routing")

_HOSTNAME = re.compile(r"(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
                       r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?)*")
_REPLY_HEAD = re.compile(r"(?:([245]\d\d)(?:\s+|$))?(?:([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$))?")


@dataclass(frozen=True)
class Transport:
    """A parsed transport map value.

    ``kind``: one of :data:`KINDS`.  For ``smtp``/``lmtp``: ``host`` (None for
    plain ``smtp:``, meaning the recipient domain), ``port``, ``mx`` (look up
    MX records for ``host``) or ``unix_path``.  For ``error``/``defer``:
    ``reply``.  ``text`` is the value as written.
    """

    kind: str
    host: Optional[str] = None
    port: Optional[int] = None
    mx: bool = False
    unix_path: Optional[str] = None
    reply: Optional[Reply] = None
    text: str = ""

    @property
    def nexthop(self) -> str:
        """``[host]:port``, ``host:port``, ``unix:/path``, or the kind."""
        if self.unix_path:
            return f"unix:{self.unix_path}"
        if self.host is None:
            return self.kind
        host = self.host if self.mx else f"[{self.host}]"
        return f"{host}:{self.port}"


def _parse_host_port(rest: str, entry: str, default_port: int) -> Tuple[str, int, bool]:
    """``[host]:port`` / ``host:port`` / ``host`` -> (host, port, bracketed)."""
    bracketed = rest.startswith("[")
    if bracketed:
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"transport {entry!r}: missing ']'")
        if tail and not tail.startswith(":"):
            raise ValueError(f"transport {entry!r}: expected ':port' after ']'")
        port_text = tail[1:] if tail else ""
        if host[:5].lower() == "ipv6:":
            host = host[5:]
    else:
        host, _sep, port_text = rest.partition(":")
    if not port_text and rest.endswith(":"):
        raise ValueError(f"transport {entry!r}: empty port")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"transport {entry!r}: bad port {port_text!r}")
        port = int(port_text)
    host = host.lower().rstrip(".")
    try:
        host = ipaddress.ip_address(host).compressed
        bracketed = True  # an address has no MX records
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"transport {entry!r}: bad host name {host!r}") from None
    return host, port, bracketed


def _parse_reply(rest: str, entry: str, temporary: bool) -> Reply:
    """``[code] [x.y.z] text`` for error:/defer: entries."""
    default = R.TRANSPORT_DEFER if temporary else R.TRANSPORT_ERROR
    head = _REPLY_HEAD.match(rest.strip())
    code_text, klass = head.group(1), head.group(2)
    text = rest.strip()[head.end():].strip() or default.text
    want = 4 if temporary else 5
    code = int(code_text) if code_text else default.code
    if klass:
        enhanced = (int(klass), int(head.group(3)), int(head.group(4)))
    else:
        enhanced = (want, *default.enhanced[1:])
    if code // 100 != want or enhanced[0] != want:
        raise ValueError(f"transport {entry!r}: {'defer' if temporary else 'error'} needs "
                         f"{want}xx codes")
    try:
        return Reply(code, enhanced, text)
    except ValueError as e:
        raise ValueError(f"transport {entry!r}: {e}") from None


def parse_transport(entry: str) -> Transport:
    """Parse one transport map value (see the module docstring)."""
    text = entry.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise ValueError(f"transport {entry!r}: unknown transport {kind!r} "
                         f"(use {', '.join(KINDS)})")
    if kind == "local":
        if rest:
            raise ValueError(f"transport {entry!r}: 'local' takes no next hop")
        return Transport("local", text=text)
    if kind in ("error", "defer"):
        return Transport(kind, reply=_parse_reply(rest, entry, kind == "defer"), text=text)
    if kind == "smtp":
        if not rest:
            return Transport("smtp", text=text)
        host, port, bracketed = _parse_host_port(rest, entry, SMTP_PORT)
        return Transport("smtp", host=host, port=port, mx=not bracketed, text=text)
    if rest.startswith("unix:"):
        path = rest[len("unix:"):]
        if not path.startswith("/"):
            raise ValueError(f"transport {entry!r}: the socket path must be absolute")
        return Transport("lmtp", unix_path=path, text=text)
    if rest.startswith("inet:"):
        rest = rest[len("inet:"):]
    if not rest:
        raise ValueError(f"transport {entry!r}: lmtp needs a host or unix:/path")
    host, port, _bracketed = _parse_host_port(rest, entry, LMTP_PORT)
    return Transport("lmtp", host=host, port=port, text=text)


def parse_smarthost(value: str) -> Transport:
    """A smarthost: a transport value, or a relayhost like ``[relay]:587``."""
    text = value.strip()
    if text.partition(":")[0].lower() not in KINDS:
        text = "smtp:" + text
    transport = parse_transport(text)
    no_hop = transport.host is None and not transport.unix_path
    if transport.kind not in ("smtp", "lmtp") or no_hop:
        raise ValueError(f"smarthost {value!r}: needs an smtp or lmtp next hop")
    return transport


def parse_transport_map(entries: Mapping[str, str]) -> Dict[str, Transport]:
    """Check keys and parse values; keys come back lower-cased."""
    out: Dict[str, Transport] = {}
    for key, value in entries.items():
        k = key.strip().lower().rstrip(".")
        name = k[1:] if k.startswith(".") else k
        if k != "*" and not _HOSTNAME.fullmatch(name):
            raise ValueError(f"transport map key {key!r}: use a domain, .domain or *")
        if not isinstance(value, str):
            raise ValueError(f"transport map {key!r}: the value must be a string")
        if k in out:
            raise ValueError(f"transport map key {key!r} appears twice")
        out[k] = parse_transport(value)
    return out


@implementer(IDeliveryTarget)
class RefuseTarget:
    """Answers every recipient with one reply (``error:`` and ``defer:``)."""

    def __init__(self, reply: Reply, name: str = "") -> None:
        self.reply = reply
        self.name = name or ("error" if reply.is_permanent else "defer")

    async def deliver(self, message: OutboundMessage) -> DeliveryReport:
        report = same_reply(message, self.reply, remote=self.name)
        return report

    def __repr__(self) -> str:
        return f"<RefuseTarget {self.reply}>"


@implementer(IDeliveryTarget)
class FixedHostTarget:
    """Deliver over SMTP or LMTP to one configured host (or UNIX socket).

    ``host`` is a name or an IP address.  A name is resolved to addresses
    through ``resolver`` (an :class:`~mailserver.delivery.mx.MXResolver`,
    A/AAAA only, CNAMEs allowed) and each address tried in turn.  Without a
    resolver, or when the DNS knows no address for it (``localhost`` and
    other ``/etc/hosts`` names), the name goes to ``connect`` as it is, for
    the system resolver.  A DNS failure is a temporary ``451 4.4.3``.
    ``auth`` and ``tls`` are passed on to ``connect``.
    """

    def __init__(self, connect, host: Optional[str] = None,
                 port: Optional[int] = SMTP_PORT, *, helo: str, reactor=None, lmtp: bool = False,
                 unix_path: Optional[str] = None, tls: Union[str, TLSPolicy] = "may",
                 auth: Any = None, resolver=None, max_addresses: int = 5) -> None:
        if not host and not unix_path:
            raise ValueError("FixedHostTarget needs a host or a unix_path")
        self.connect = connect
        self.host = host
        self.port = port
        self.helo = helo
        self.reactor = reactor
        self.lmtp = lmtp
        self.unix_path = unix_path
        self.tls = tls if isinstance(tls, TLSPolicy) else TLSPolicy(tls)
        self.auth = auth
        self.resolver = resolver
        self.max_addresses = max_addresses

    def with_tls(self, tls: TLSPolicy) -> "FixedHostTarget":
        """The same next hop under another TLS policy."""
        return FixedHostTarget(
            self.connect, self.host, self.port, helo=self.helo, reactor=self.reactor,
            lmtp=self.lmtp, unix_path=self.unix_path, tls=tls, auth=self.auth,
            resolver=self.resolver, max_addresses=self.max_addresses)

    async def _hops(self) -> List[Hop]:
        hops = await self._find_hops()
        is_self = getattr(self.resolver, "is_self", None)
        if is_self is not None and not self.unix_path:
            for hop in hops:
                addresses = [hop.address]
                if hop.address == "localhost":
                    addresses = ["127.0.0.1", "::1"]
                if is_self(hop.host, addresses, hop.port):
                    log.error("configured next hop {host}:{port} is this server (mail loop); "
                              "fix the transport map, smarthost or relay.internal",
                              host=self.host, port=self.port)
                    raise TempFailure(soften(fill_template(R.MAIL_LOOPS, domain=self.host)))
        return hops

    async def _find_hops(self) -> List[Hop]:
        if self.unix_path:
            return [Hop(self.unix_path, None, None, unix_path=self.unix_path)]
        literal = ip_literal(f"[{self.host}]")
        if literal is not None:
            return [Hop(literal, literal, self.port)]
        by_name = [Hop(self.host, self.host, self.port, tls_hostname=self.host)]
        if self.resolver is None:
            return by_name
        addresses, _aliased, problem = await self.resolver.addresses(self.host)
        if not addresses and problem:
            log.warn("next hop {host}: {why}", host=self.host, why=problem)
            raise TempFailure(R.DNS_UNAVAILABLE.with_text(
                R.DNS_UNAVAILABLE.text.format(domain=self.host)))
        if not addresses:
            log.info("next hop {host} has no address in the DNS; asking the system resolver",
                     host=self.host)
            return by_name
        return [Hop(self.host, a, self.port, tls_hostname=self.host) for a in addresses]

    async def deliver(self, message: OutboundMessage) -> DeliveryReport:
        try:
            hops = await self._hops()
        except ReplyError as e:
            report = same_reply(message, e.reply)
        else:
            report = await attempt_delivery(
                self.connect, self.reactor, message, hops, helo=self.helo, tls=self.tls,
                auth=self.auth, lmtp=self.lmtp, max_addresses=self.max_addresses)
        return report

    def __repr__(self) -> str:
        where = f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"
        return f"<FixedHostTarget {'lmtp' if self.lmtp else 'smtp'} {where}>"


@dataclass(frozen=True)
class Route:
    """Where one recipient goes: ``kind`` (a transport kind), the delivery
    ``target``, and ``nexthop`` (recipients with the same target and
    nexthop travel together)."""

    kind: str
    target: Any
    nexthop: str


LocalDomains = Union[Collection[str], Callable[[str], Any]]


class Router:
    """Routes recipients to delivery targets.

    ``local_domains``: a collection of domains, or a callable ``domain ->
    bool`` (or a Deferred/awaitable of one, like the directory's
    ``is_local_domain``).  ``local_target``/``remote_target``: the local
    delivery and the MX delivery (a
    :class:`~mailserver.delivery.remote.RemoteDelivery`; its ``via`` serves
    ``smtp:host`` entries and its resolver names in ``smtp:[host]``).
    ``transports``: the transport map as written (see the module
    docstring).  ``smarthost``: the ``*`` next hop, with ``smarthost_auth``
    and ``smarthost_tls``.  ``connect``, ``helo``, ``reactor`` and
    ``tls_policy`` serve the fixed-host targets built here.  ``tls_policy``
    is looked up by next-hop host name and by recipient domain: a domain's
    own entry holds on every route (transport map, relay domain, smarthost),
    the stricter of the two winning (see :func:`~mailserver.delivery.remote.stricter`).
    Every configured SMTP/LMTP next hop is checked against our own names and
    listeners (the MX resolver's ``is_self``): one that is us defers its mail
    with ``451 4.4.6``.
    """

    def __init__(self, local_domains: LocalDomains, local_target, remote_target,
                 transports: Optional[Mapping[str, str]] = None,
                 smarthost: Optional[str] = None, *, connect=None, helo: str = "localhost",
                 reactor=None, tls_policy: TLSPolicySpec = None, smarthost_auth: Any = None,
                 smarthost_tls: Union[None, str, TLSPolicy] = None,
                 max_addresses: int = 5,
                 relay_domains: Optional[Mapping[str, Union[str, Transport]]] = None) -> None:
        if callable(local_domains):
            self._is_local = local_domains
        else:
            domains = frozenset(d.lower().rstrip(".") for d in local_domains)
            self._is_local = domains.__contains__
        self.local_target = local_target
        self.remote_target = remote_target
        self.transports = parse_transport_map(transports or {})
        self._connect = connect
        self._helo = helo
        self._reactor = reactor
        self._tls_policy = tls_policy
        self._max_addresses = max_addresses
        self._targets: Dict[Tuple, Any] = {}
        self._entries: Dict[str, Tuple[str, Any, str]] = {}
        if smarthost is not None:
            if "*" in self.transports:
                raise ValueError("give either a smarthost or a '*' transport map entry, not both")
            relay = parse_smarthost(smarthost)
            tls = smarthost_tls
            if tls is None:
                tls = tls_policy_for(tls_policy, relay.host or "")
            self._entries["*"] = self._build(relay, auth=smarthost_auth, tls=tls)
        for key, transport in self.transports.items():
            self._entries[key] = self._build(transport)
        self._relay: Dict[str, Tuple[str, Any, Optional[str]]] = {}
        for domain, hop in (relay_domains or {}).items():
            if isinstance(hop, str):
                from mailserver.delivery.relaydomains import parse_internal_host

                hop = parse_internal_host(hop, domain)
            self._relay[domain.lower().rstrip(".")] = self._build(hop)

    def _build(self, t: Transport, auth: Any = None, tls=None) -> Tuple[str, Any, Optional[str]]:
        """(kind, target, fixed nexthop or None for per-domain) for ``t``."""
        if t.kind == "local":
            return "local", self.local_target, "local"
        if t.kind in ("error", "defer"):
            return t.kind, RefuseTarget(t.reply, name=t.kind), t.text
        if t.kind == "smtp" and t.host is None:
            return "smtp", self.remote_target, None
        if t.kind == "smtp" and t.mx:
            via = getattr(self.remote_target, "via", None)
            if via is None:
                raise ValueError(f"transport {t.text!r}: MX delivery to a next hop needs "
                                 "a RemoteDelivery")
            if isinstance(tls, str):
                tls = TLSPolicy(tls)
            key = ("via", t.host, t.port, tls)
            if key not in self._targets:
                self._targets[key] = via(t.host, t.port, tls) if tls is not None else via(
                    t.host, t.port)
            return "smtp", self._targets[key], t.nexthop
        if self._connect is None:
            raise ValueError(f"transport {t.text!r}: no connect callable to deliver with")
        if tls is None:
            tls = tls_policy_for(self._tls_policy, t.host or "localhost")
        key = ("fixed", t.kind, t.host, t.port, t.unix_path, id(auth), tls)
        if key not in self._targets:
            resolver = getattr(self.remote_target, "mx", None)
            self._targets[key] = FixedHostTarget(
                self._connect, t.host, t.port, helo=self._helo, reactor=self._reactor,
                lmtp=t.kind == "lmtp", unix_path=t.unix_path, tls=tls, auth=auth,
                resolver=resolver, max_addresses=self._max_addresses)
        return t.kind, self._targets[key], t.nexthop

    async def is_local(self, domain: str) -> bool:
        answer = self._is_local(domain)
        if isawaitable(answer):
            answer = await answer
        return bool(answer)

    async def route(self, address: str) -> Route:
        """The route for one recipient address."""
        domain = domain_of(address)
        if not domain:  # <postmaster> and other domainless recipients are ours
            return Route("local", self.local_target, "local")
        if domain in self._relay:  # a corporate relay domain: its internal host, always
            return self._route(self._relay[domain], domain)
        for key in lookup_keys(domain):
            if key in self._entries:
                return self._route(self._entries[key], domain)
        if await self.is_local(domain):
            return Route("local", self.local_target, "local")
        if "*" in self._entries:
            return self._route(self._entries["*"], domain)
        return Route("smtp", self.remote_target, domain)

    def _route(self, entry: Tuple[str, Any, Optional[str]], domain: str) -> Route:
        kind, target, nexthop = entry
        return Route(kind, self._secured(target, domain),
                     nexthop if nexthop is not None else domain)

    def _secured(self, target: Any, domain: str) -> Any:
        """``target``, or a copy of it under the recipient domain's TLS policy
        when that is stricter than the next hop's: a policy for a domain
        holds whichever route its mail takes.  UNIX sockets, local delivery
        and refusals have no network to protect."""
        wanted = domain_tls_policy(self._tls_policy, domain)
        if wanted is None:
            return target
        if isinstance(target, FixedHostTarget) and not target.unix_path:
            tls = stricter(target.tls, wanted)
            if tls == target.tls:
                return target
            key = ("tls", id(target), tls)
            if key not in self._targets:
                self._targets[key] = target.with_tls(tls)
            return self._targets[key]
        if isinstance(target, NexthopDelivery):
            tls = stricter(target.tls, wanted)
            if tls == target.tls:
                return target
            key = ("tls", id(target), tls)
            if key not in self._targets:
                self._targets[key] = NexthopDelivery(target.remote, target.nexthop, target.port,
                                                     tls)
            return self._targets[key]
        return target

    async def group(self, message: OutboundMessage) -> List[Tuple[Any, str, OutboundMessage]]:
        """``(target, nexthop, part)`` per next hop, in the order recipients
        first reach each one; each ``part`` keeps its recipients in message
        order."""
        groups: Dict[Tuple[int, str], Tuple[Any, str, list]] = {}
        for rcpt in message.recipients:
            route = await self.route(rcpt.address)
            key = (id(route.target), route.nexthop)
            groups.setdefault(key, (route.target, route.nexthop, []))[2].append(rcpt)
        return [(target, nexthop, replace(message, recipients=tuple(rcpts)))
                for target, nexthop, rcpts in groups.values()]
