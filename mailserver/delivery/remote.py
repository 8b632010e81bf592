# -*- test-case-name: tests.unit.test_delivery_remote -*-
"""Remote delivery: find a domain's mail exchangers and hand the message to one.

:class:`~mailserver.delivery.mx.MXResolver` turns a recipient domain into
:class:`~mailserver.delivery.mx.Destination` values (host, preference,
addresses), best first; its module describes the DNS rules and loop
detection.  :class:`RemoteDelivery` walks them, asking an injected
``connect`` (``protocols.outbound.deliver_to_host``) for one transaction per
address until one gives a final answer.

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

import random as _random
from dataclasses import dataclass, replace
from inspect import isawaitable
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.logger import Logger
from zope.interface import implementer

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, IDeliveryTarget, OutboundMessage
from mailserver.delivery.mx import (
    DEFAULT_FAMILIES, Destination, MXResolver, canonical_ip, fill_template,
)
from mailserver.errors import ReplyError
from mailserver.reply import Reply

log = Logger(namespace="mailserver.remote")

TLS_MODES = ("none", "may", "encrypt", "verify", "dane")
"""Outbound TLS levels, weakest first.  ``dane`` is never configured: the
TLSA records of one MX host make it (see :mod:`mailserver.delivery.tlsplan`)."""


@dataclass(frozen=True)
class TLSPolicy:
    """How to use TLS with a next hop; passed through to ``connect``.

    ``mode``: ``none`` (never STARTTLS), ``may`` (STARTTLS when offered,
    certificate not checked), ``encrypt`` (STARTTLS required) or ``verify``
    (required, and the certificate must match the MX host name, checked with
    service_identity).  ``trust_root`` is handed to ``connect`` unchanged.
    ``dane``: required, and the certificate must match one of ``tlsa`` (a
    tuple of :class:`~mailserver.delivery.dane.TLSA`).  ``sts_testing``
    (``may``/``encrypt`` under an MTA-STS ``testing`` policy): after the
    handshake, a certificate that ``enforce`` would refuse (checked against
    ``trust_root``) is logged, and delivery goes on.
    """

    mode: str = "may"
    trust_root: Any = None
    tlsa: tuple = ()
    sts_testing: bool = False

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


def domain_tls_policy(spec: TLSPolicySpec, domain: str) -> Optional[TLSPolicy]:
    """The policy ``spec`` gives recipient ``domain`` itself, or None.

    Like :func:`tls_policy_for`, but a mapping's ``*`` entry (the default for
    every next hop) does not count: only ``domain`` and ``.parent`` keys."""
    if isinstance(spec, Mapping):
        key = next((k for k in lookup_keys(domain.lower()) if k in spec), None)
        if key is None:
            return None
        found = spec[key]
        return found if isinstance(found, TLSPolicy) else TLSPolicy(found)
    return None if spec is None else tls_policy_for(spec, domain)


def stricter(hop: TLSPolicy, domain: Optional[TLSPolicy]) -> TLSPolicy:
    """The stricter of a next hop's policy and the recipient domain's
    (``none < may < encrypt < verify < dane``); the next hop's when they tie."""
    if domain is None or TLS_MODES.index(domain.mode) <= TLS_MODES.index(hop.mode):
        return hop
    return domain


def lookup_keys(domain: str) -> List[str]:
    """Map keys tried for ``domain``: itself, then ``.parent`` keys, closest first."""
    labels = domain.split(".")
    return [domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))]


def domain_of(address: str) -> str:
    """The lower-cased domain of ``address`` ("" when it has none)."""
    return address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""


MAX_TLS_REQUIRED_SCAN = 256 * 1024  # octets of header looked at for TLS-Required


def tls_required_no(message: OutboundMessage) -> bool:
    """RFC 8689 §4: the message's header says ``TLS-Required: No`` (its
    sender asks that the recipient domain's MTA-STS and DANE policies be
    ignored) and the envelope has no REQUIRETLS, which wins (the header
    field is then ignored).  Reads the header section of the content file
    (at most :data:`MAX_TLS_REQUIRED_SCAN` octets; on the reactor thread,
    like the content when it is sent, from the page cache); an unreadable
    file is False (delivery reports it when it sends)."""
    if message.requiretls:
        return False
    field: Optional[bytes] = None
    try:
        with open(message.content_path, "rb") as f:
            size = 0
            for line in f:
                size += len(line)
                if line in (b"\r\n", b"\n") or size > MAX_TLS_REQUIRED_SCAN:
                    break
                if line[:1] in (b" ", b"\t"):
                    if field is not None:
                        field += line
                    continue
                if field is not None:
                    break  # the field (and its continuation lines) is complete
                name, colon, _value = line.partition(b":")
                if colon and name.strip().lower() == b"tls-required":
                    field = line
    except OSError:
        return False
    if field is None:
        return False
    value = field.partition(b":")[2]
    return b" ".join(value.split()).lower() == b"no"


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
    tls: Optional[TLSPolicy] = None  # this hop's own policy (DANE, MTA-STS), else the route's

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
        literal = canonical_ip(dest.host) is not None
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
        policy = hop.tls or tls
        extra: Dict[str, Any] = {"tlsa": policy.tlsa} if policy.mode == "dane" else {}
        if policy.sts_testing:
            extra["sts_testing"] = True
        if message.requiretls and policy.mode not in ("verify", "dane") and not hop.unix_path:
            # RFC 8689 §5: only over TLS with a verified certificate; another MX may have it
            log.info("{id}: REQUIRETLS: TLS to {remote} would not be verified", id=message.queue_id,
                     remote=remote)
            report, elsewhere = same_reply(attempt, R.REQUIRETLS_UNVERIFIED, remote), True
        else:
            try:
                result = connect(reactor, hop.address, hop.port, attempt, helo=helo,
                                 tls=policy.mode, tls_hostname=hop.tls_hostname,
                                 trust_root=policy.trust_root, auth=auth, lmtp=lmtp,
                                 unix_path=hop.unix_path, **extra)
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
        done[r.address] = fallback.get(r.address) or fill_template(R.NO_USABLE_MX,
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
    ``security``: an :class:`~mailserver.delivery.tlsplan.OutboundSecurity`
    (MTA-STS for recipient domains' own MX hosts, DANE for every MX-resolved
    destination), or None.
    """

    def __init__(self, resolver, connect, *, helo: str, reactor=None,
                 tls_policy: TLSPolicySpec = None, own_names: Iterable[str] = (),
                 own_endpoint: Optional[Callable[[str, int], bool]] = None, port: int = 25,
                 max_addresses: int = 5, families: Sequence[str] = DEFAULT_FAMILIES,
                 rng: Optional[_random.Random] = None, dns_timeout: Optional[Sequence[int]] = None,
                 mx_resolver: Optional[MXResolver] = None, security=None) -> None:
        self.security = security
        self.mx = mx_resolver or MXResolver(resolver, own_names=own_names,
                                            own_endpoint=own_endpoint, families=families,
                                            rng=rng, timeout=dns_timeout)
        self.connect = connect
        self.helo = helo
        self.reactor = reactor
        self.tls_policy = tls_policy
        self.port = port
        self.max_addresses = max_addresses

    def via(self, nexthop: str, port: Optional[int] = None,
            tls: Optional[TLSPolicy] = None) -> "NexthopDelivery":
        """A target that delivers through the MX hosts of ``nexthop`` instead
        of the recipient domain's (transport ``smtp:host:port``), with TLS
        policy ``tls`` (default: the one for ``nexthop``)."""
        return NexthopDelivery(self, nexthop.lower().rstrip("."), port or self.port, tls)

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
                         configured: bool, tls: Optional[TLSPolicy] = None) -> DeliveryReport:
        """Deliver ``message`` through the mail exchangers of ``domain``.

        ``configured``: ``domain`` is an administrator's next hop, so DNS
        verdicts about it are temporary.  ``tls``: the policy (default: the
        one for ``domain``)."""
        try:
            destinations = await self.mx.destinations(domain, port)
        except ReplyError as e:
            reply = soften(e.reply) if configured else e.reply
            if configured and e.reply.enhanced == R.MAIL_LOOPS.enhanced:
                log.error("{id}: configured next hop {hop}:{port} is this server (mail loop); "
                          "fix the transport map, smarthost or relay.internal",
                          id=message.queue_id, hop=domain, port=port)
            return same_reply(message, reply)
        policy = tls or tls_policy_for(self.tls_policy, domain)
        hops = hops_for(destinations, port)
        if self.security is not None and tls_required_no(message):
            log.info("{id}: TLS-Required: No: MTA-STS and DANE not applied (RFC 8689)",
                     id=message.queue_id)
        elif self.security is not None:  # MTA-STS is about recipient domains only
            hops, refused = await self.security.plan(domain, destinations, port, policy,
                                                     message.queue_id, mta_sts=not configured)
            if refused is not None:
                return same_reply(message, refused)
        return await attempt_delivery(self.connect, self.reactor, message, hops, helo=self.helo,
                                      tls=policy, max_addresses=self.max_addresses)


@implementer(IDeliveryTarget)
class NexthopDelivery:
    """:meth:`RemoteDelivery.via`: MX delivery to a configured domain."""

    def __init__(self, remote: RemoteDelivery, nexthop: str, port: int,
                 tls: Optional[TLSPolicy] = None) -> None:
        self.remote = remote
        self.nexthop = nexthop
        self.port = port
        self.tls = tls or tls_policy_for(remote.tls_policy, nexthop)

    async def deliver(self, message: OutboundMessage) -> DeliveryReport:
        return await self.remote.deliver_to(message, self.nexthop, self.port,
                                            configured=True, tls=self.tls)

    def __repr__(self) -> str:
        return f"<NexthopDelivery {self.nexthop}:{self.port}>"
