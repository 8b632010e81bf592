# -*- test-case-name: tests.unit.test_tlsplan,tests.integration.test_outbound_security -*-
"""Which TLS each mail exchanger gets: configured policy, MTA-STS and DANE combined.

:class:`OutboundSecurity` is consulted by
:class:`~mailserver.delivery.remote.RemoteDelivery` for MX delivery to a
recipient domain, after the MX lookup and before any connection.  For each
MX host the strictest applicable requirement wins (:func:`combine`):

===========================  ==============================================
DANE (secure usable TLSA)    TLS, certificate matches a TLSA record
DANE (secure, none usable)   TLS, certificate not checked (RFC 7672 §2.2)
MTA-STS ``enforce``          MX host matches the policy, TLS, certificate
                             verified (PKIX) for the MX host name
configured ``verify``        TLS, certificate verified (``tls_ca_file``)
configured ``encrypt``       TLS, certificate not checked
configured ``may``           STARTTLS when offered
configured ``none``          no TLS
===========================  ==============================================

A host with DANE records is judged by them even under MTA-STS (RFC 8461
§2: DANE takes precedence); hosts without them still need to match the
MTA-STS policy.  MTA-STS ``testing`` only logs: hosts that do not match,
and (under ``may``/``encrypt``) certificates that ``enforce`` would refuse,
checked after the handshake
(:func:`~mailserver.delivery.mtasts.certificate_problem`).  MX hosts that
are excluded are never contacted; when none is left every
recipient gets a temporary ``451 4.7.5`` (retried, then bounced when the
queue lifetime ends): never a delivery in clear or to an unverified host.
A TLSA lookup that fails for a host of a secure MX RRset (SERVFAIL, which
is how a validating resolver reports bogus data) excludes that host.

MTA-STS applies to MX delivery for a recipient's own domain.  DANE applies
to every destination found through MX records, also a transport map's
``smtp:host:port`` next hop (its TLSA records are looked up at that port);
fixed hosts (``smtp:[host]``, a bracketed smarthost) use the configured
``tls_policies`` only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

from twisted.logger import Logger

from mailserver import reply as R
from mailserver.delivery.dane import DANEFailure
from mailserver.delivery.mtasts import Policy
from mailserver.delivery.mx import Destination, canonical_ip, fill_template
from mailserver.delivery.remote import Hop, TLSPolicy, stricter
from mailserver.reply import Reply

log = Logger(namespace="mailserver.remote")


def combine(base: TLSPolicy, sts: Optional[Policy], host: str,
            tlsa: Tuple = (), tlsa_present: bool = False,
            sts_trust_root=None) -> Optional[TLSPolicy]:
    """The policy for MX ``host``, or None when it must not be used.

    ``base``: the configured policy for the domain; ``sts``: its MTA-STS
    policy (None, or mode enforce/testing); ``tlsa``: usable secure TLSA
    records for the host, ``tlsa_present``: secure TLSA records exist
    (perhaps none usable); ``sts_trust_root``: the CAs for MTA-STS
    verification (None: the system's)."""
    if tlsa:
        return TLSPolicy("dane", tlsa=tuple(tlsa))
    if tlsa_present:
        return stricter(base, TLSPolicy("encrypt"))
    if sts is not None and sts.mode == "enforce":
        if not sts.matches(host):
            return None
        return TLSPolicy("verify", sts_trust_root)
    if sts is not None and sts.mode == "testing" and base.mode in ("may", "encrypt"):
        return replace(base, trust_root=sts_trust_root, sts_testing=True)
    return base


class OutboundSecurity:
    """MTA-STS and DANE for MX delivery.  ``mta_sts``: an
    :class:`~mailserver.delivery.mtasts.MTASTS` or None; ``dane``: a
    :class:`~mailserver.delivery.dane.DANELookup` or None; ``sts_trust_root``:
    see :func:`combine`."""

    def __init__(self, mta_sts=None, dane=None, sts_trust_root=None) -> None:
        self.mta_sts = mta_sts
        self.dane = dane
        self.sts_trust_root = sts_trust_root

    async def plan(self, domain: str, destinations: Sequence[Destination], port: int,
                   base: TLSPolicy, queue_id: str = "",
                   mta_sts: bool = True) -> Tuple[List[Hop], Optional[Reply]]:
        """The hops to try (each with its policy), or ``([], reply)`` when
        no MX host may be used.  ``mta_sts``: false for a configured next
        hop (``smtp:host`` in the transport map), where only DANE applies."""
        sts = None
        if self.mta_sts is not None and mta_sts:
            sts = await self.mta_sts.policy_for(domain)
        secure_mx = False
        if self.dane is not None:
            secure_mx = await self.dane.mx_secure(domain)
        hops: List[Hop] = []
        excluded = None
        for dest in destinations:
            literal = canonical_ip(dest.host) is not None
            tlsa: Tuple = ()
            present = False
            if secure_mx and not literal:
                try:
                    tlsa, present = await self.dane.tlsa(dest.host, port)
                except DANEFailure as e:
                    log.warn("{id}: DANE: TLSA lookup for {host} failed ({e}); host skipped",
                             id=queue_id, host=dest.host, e=str(e))
                    excluded = fill_template(R.DANE_LOOKUP_FAILED, domain=dest.host)
                    continue
            policy = combine(base, sts, dest.host, tlsa, present, self.sts_trust_root)
            if policy is None:
                log.warn("{id}: MTA-STS: MX host {host} does not match the policy of {domain}; "
                         "host skipped", id=queue_id, host=dest.host, domain=domain)
                excluded = excluded or fill_template(R.MTA_STS_NO_MX, domain=domain)
                continue
            if sts is not None and sts.mode == "testing" and not sts.matches(dest.host):
                log.warn("{id}: MTA-STS (testing): MX host {host} does not match the policy "
                         "of {domain}; delivering anyway", id=queue_id, host=dest.host,
                         domain=domain)
            hint = None if literal else dest.host
            hops.extend(Hop(dest.host, a, port, hint, tls=policy) for a in dest.addresses)
        if not hops:
            return [], excluded or fill_template(R.NO_USABLE_MX, domain=domain)
        return hops, None


def _servers_of(resolver) -> List[Tuple[str, int]]:
    """The configured name servers of a twisted.names ``client.Resolver``."""
    return [tuple(server) for server in getattr(resolver, "servers", ())]


def build_security(relay, reactor, resolver, state_dir: str) -> Optional[OutboundSecurity]:
    """The :class:`OutboundSecurity` for a ``[relay]`` config section, or
    None when both MTA-STS and DANE are off.  ``resolver``: the configured
    twisted.names resolver (MX, TXT; its name servers answer DANE queries
    with the AD bit); ``state_dir``: where the MTA-STS cache file lives."""
    import os

    from mailserver.delivery.dane import DANELookup, SecureDNS
    from mailserver.delivery.mtasts import MTASTS, HTTPSPolicyFetcher, PolicyCache

    if not relay.mta_sts and not relay.dane:
        return None
    sts = trust = None
    if relay.mta_sts:
        if relay.mta_sts_ca_file:
            from mailserver.protocols.outbound import _trust_root

            trust = _trust_root(relay.mta_sts_ca_file)
        cache = PolicyCache(os.path.join(state_dir, "mta-sts.json"), reactor.seconds)
        sts = MTASTS(resolver, HTTPSPolicyFetcher(reactor, trust_root=trust), cache,
                     reactor.seconds)
    dane = None
    if relay.dane:
        dane = DANELookup(SecureDNS(_servers_of(resolver), reactor))  # relay.nameservers
    return OutboundSecurity(sts, dane, trust)
