# -*- test-case-name: tests.unit.test_dane,tests.integration.test_outbound_security -*-
"""DANE for SMTP (RFC 7672, RFC 7671): TLSA records and the server's certificate.

Two halves:

* Sans-IO: :class:`TLSA` (one record, parsed from its RDATA), :func:`usable`
  (the records RFC 7672 §3.1 lets SMTP use: DANE-TA(2) and DANE-EE(3) with
  selector 0 or 1 and matching type 0, 1 or 2; PKIX-TA(0) and PKIX-EE(1) are
  unusable for SMTP) and :func:`check_chain`, the verdict on the chain a server
  presented.  DANE-EE: the leaf matches a ``3 x x`` record; no name or expiry
  check (RFC 7672 §3.1.1).  DANE-TA: some certificate of the chain matches a
  ``2 x x`` record, every certificate below it is signed by the next one, the
  leaf is within its validity dates and names the MX host (RFC 7672 §3.1.2,
  §3.2.2).
* The DNS: :class:`SecureDNS` asks the configured resolver with the AD
  (authenticated data) bit set (RFC 6840 §5.7) and reports whether the answer
  came back with AD.  We do not validate DNSSEC ourselves; like Postfix's
  ``smtp_dns_support_level = dnssec`` we trust a validating resolver that the
  administrator names (``[relay] nameservers``, which should be on the host or
  reached over a trusted network).  :class:`DANELookup` uses it for the MX
  RRset (DANE applies only when it is secure, RFC 7672 §2.2.1), each MX
  host's A (or AAAA) RRset (TLSA records count only for a host whose
  addresses are secure, §2.2.2) and ``_PORT._tcp.HOST`` TLSA RRsets.

Outcomes of :meth:`DANELookup.tlsa`: usable records (DANE is mandatory for
that host), secure records none of which is usable (TLS mandatory, not
authenticated), none (insecure answer, NXDOMAIN or NODATA), or :class:`DANEFailure`
(SERVFAIL, which is how a validating resolver reports bogus data, a timeout,
a truncated answer that TCP cannot fetch either): that host must not be
used now (RFC 7672 §2.2.3).
"""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol, Protocol
from twisted.logger import Logger
from twisted.names import dns

log = Logger(namespace="mailserver.remote")

TLSA_TYPE = 52
DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)
MATCHING = (0, 1, 2)


@dataclass(frozen=True)
class TLSA:
    """One TLSA record: certificate usage, selector, matching type and data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @classmethod
    def from_rdata(cls, rdata: bytes) -> "TLSA":
        if len(rdata) < 4:
            raise ValueError("TLSA record shorter than 4 octets")
        return cls(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))

    def to_rdata(self) -> bytes:
        return bytes((self.usage, self.selector, self.mtype)) + self.data

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


def usable(records: Iterable[TLSA]) -> Tuple[TLSA, ...]:
    """The records SMTP may use (RFC 7672 §3.1): DANE-TA and DANE-EE, known
    selectors and matching types, data of the right length for a digest."""
    lengths = {1: 32, 2: 64}
    return tuple(r for r in records
                 if r.usage in (DANE_TA, DANE_EE) and r.selector in SELECTORS
                 and r.mtype in MATCHING and len(r.data) == lengths.get(r.mtype, len(r.data))
                 and r.data)


def selected(cert: x509.Certificate, selector: int) -> bytes:
    """The part of ``cert`` a record's selector names: the whole certificate
    (0) or its SubjectPublicKeyInfo (1), DER encoded."""
    if selector == 0:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def association(cert: x509.Certificate, selector: int, mtype: int) -> bytes:
    """The data a ``U selector mtype`` record for ``cert`` holds."""
    data = selected(cert, selector)
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TLSA, cert: x509.Certificate) -> bool:
    return association(cert, record.selector, record.mtype) == record.data


def _names_host(cert: x509.Certificate, hostname: str) -> bool:
    from service_identity import VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    try:
        verify_certificate_hostname(cert, hostname)
    except (VerificationError, ValueError):
        return False
    except Exception:  # a certificate without usable names
        return False
    return True


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:
        return False
    return True


def check_chain(records: Sequence[TLSA], chain: Sequence[x509.Certificate],
                hostname: Optional[str], now: Optional[datetime] = None) -> Optional[str]:
    """None when ``chain`` (the leaf first) satisfies one of ``records``;
    otherwise why not, for the log.  ``hostname``: the MX host name, for
    DANE-TA name checks."""
    if not chain:
        return "the server sent no certificate"
    leaf = chain[0]
    if any(r.usage == DANE_EE and matches(r, leaf) for r in records):
        return None
    anchors = [r for r in records if r.usage == DANE_TA]
    if not anchors:
        return "no DANE-EE record matches the server's certificate"
    at = next((i for i, c in enumerate(chain) if any(matches(r, c) for r in anchors)), None)
    if at is None:
        return "no certificate in the server's chain matches a DANE-TA record"
    for below, above in zip(chain[:at], chain[1:at + 1]):
        if not _signed_by(below, above):
            return "the server's chain does not lead to the DANE-TA trust anchor"
    now = now or datetime.now(timezone.utc)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return "the server's certificate is expired or not yet valid"
    if at > 0 and hostname and not _names_host(leaf, hostname):
        return f"the server's certificate does not name {hostname}"
    return None


# -- the DNS ------------------------------------------------------------------------

class Answer(NamedTuple):
    """A DNS answer: ``rcode``, whether it was authenticated (``secure``, the
    AD bit), and the answer section's records of the queried type."""

    rcode: int
    secure: bool
    records: tuple


class DANEFailure(Exception):
    """The DNS could not give a trustworthy answer; the text says why."""


class _OneQuery(DatagramProtocol):
    def __init__(self, message: bytes, server: Tuple[str, int], qid: int) -> None:
        self.message, self.server, self.qid = message, server, qid
        self.result: defer.Deferred = defer.Deferred()

    def startProtocol(self) -> None:
        self.transport.write(self.message, self.server)

    def datagramReceived(self, data: bytes, addr) -> None:
        if addr[:2] != self.server[:2] or self.result.called:
            return
        m = dns._EDNSMessage()
        try:
            m.fromStr(data)
        except Exception:
            return
        if m.id == self.qid and m.answer:
            self.result.callback(m)


class _TCPQuery(Protocol):
    """One query over TCP (RFC 1035 §4.2.2: each message after a two-octet
    length), for an answer too large for UDP."""

    def __init__(self, message: bytes, qid: int) -> None:
        self.message, self.qid, self.data = message, qid, b""
        self.result: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(struct.pack("!H", len(self.message)) + self.message)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) < 2 or self.result.called:
            return
        (size,) = struct.unpack("!H", self.data[:2])
        if len(self.data) < 2 + size:
            return
        m = dns._EDNSMessage()
        try:
            m.fromStr(self.data[2:2 + size])
        except Exception:
            m = None
        self.transport.loseConnection()
        if m is None or m.id != self.qid:
            self.result.errback(DANEFailure("malformed answer over TCP"))
        else:
            self.result.callback(m)

    def connectionLost(self, reason=None) -> None:
        if not self.result.called:
            self.result.errback(DANEFailure("connection closed before the answer"))


class SecureDNS:
    """Queries with the AD bit set, over UDP with EDNS0 (1232-octet answers),
    to each of ``servers`` (``(host, port)``) in turn until one answers.  A
    truncated answer is asked again over TCP, of the same server."""

    def __init__(self, servers: Sequence[Tuple[str, int]], reactor, timeout: float = 5.0,
                 rng: Optional[random.Random] = None) -> None:
        if not servers:
            raise ValueError("SecureDNS needs at least one name server")
        self.servers = list(servers)
        self.reactor = reactor
        self.timeout = timeout
        self.rng = rng or random.SystemRandom()

    async def query(self, name: str, qtype: int) -> Answer:
        problems = []
        for server in self.servers:
            try:
                m = await self._ask(server, name, qtype)
            except (defer.TimeoutError, defer.CancelledError):
                problems.append(f"{server[0]}:{server[1]} timed out")
                continue
            except OSError as e:
                problems.append(f"{server[0]}:{server[1]}: {e}")
                continue
            if m.trunc:
                try:
                    m = await self._ask(server, name, qtype, tcp=True)
                except (defer.TimeoutError, defer.CancelledError, OSError, DANEFailure) as e:
                    raise DANEFailure(f"truncated answer for {name}, and over TCP: "
                                      f"{type(e).__name__} {e}") from None
            if m.rCode not in (dns.OK, dns.ENAME):
                raise DANEFailure(f"{name}: DNS error {m.rCode} (bogus or unavailable)")
            records = tuple(rr.payload for rr in m.answers
                            if rr.type == qtype and _lower(rr.name.name) == _lower(name))
            return Answer(m.rCode, bool(m.authenticData), records)
        raise DANEFailure(f"no answer for {name}: {'; '.join(problems)}")

    async def _ask(self, server, name: str, qtype: int, tcp: bool = False):
        qid = self.rng.randrange(1, 65536)
        q = dns._EDNSMessage(id=qid, recDes=True, authenticData=True, maxSize=1232,
                             queries=[dns.Query(name, qtype, dns.IN)])
        if tcp:
            from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, \
                connectProtocol

            kind = TCP6ClientEndpoint if ":" in server[0] else TCP4ClientEndpoint
            query = _TCPQuery(q.toStr(), qid)
            connecting = connectProtocol(kind(self.reactor, server[0], server[1],
                                              timeout=self.timeout), query)
            connecting.addTimeout(self.timeout, self.reactor)
            await connecting
            query.result.addTimeout(self.timeout, self.reactor)
            try:
                return await query.result
            finally:
                if query.transport is not None:
                    query.transport.abortConnection()
        proto = _OneQuery(q.toStr(), server, qid)
        port = self.reactor.listenUDP(0, proto, interface="::" if ":" in server[0] else "")
        try:
            d = proto.result
            d.addTimeout(self.timeout, self.reactor)
            return await d
        finally:
            port.stopListening()


def _lower(name) -> str:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


class DANELookup:
    """MX security and TLSA records through a :class:`SecureDNS`-like
    ``dns`` (anything with ``async query(name, qtype) -> Answer``)."""

    def __init__(self, secure_dns) -> None:
        self.dns = secure_dns

    async def mx_secure(self, domain: str) -> bool:
        """Is ``domain``'s MX RRset (or its absence) DNSSEC-authenticated?"""
        try:
            answer = await self.dns.query(domain, dns.MX)
        except DANEFailure as e:
            log.info("DANE: MX lookup for {domain}: {why}; DANE not used", domain=domain,
                     why=str(e))
            return False
        return answer.secure

    async def address_secure(self, host: str) -> bool:
        """Is ``host``'s address RRset authenticated?  The A RRset, or the
        AAAA one when there is no A record.  Raises :class:`DANEFailure`
        (a bogus or failed lookup: the host is not to be used)."""
        answer = await self.dns.query(host, dns.A)
        if not answer.records:
            answer = await self.dns.query(host, dns.AAAA)
        return answer.secure

    async def tlsa(self, host: str, port: int) -> Tuple[Tuple[TLSA, ...], bool]:
        """``(usable records, secure records present)`` for ``host``'s SMTP
        on ``port``: secure records that are all unusable still make TLS
        mandatory, unauthenticated (RFC 7672 §2.2).  TLSA records are only
        sought for a host whose address records are authenticated (RFC 7672
        §2.2.2: an attacker who can forge the address is not to choose the
        DANE policy); raises :class:`DANEFailure`."""
        if not await self.address_secure(host):
            log.info("DANE: the address of {host} is not DNSSEC-authenticated; its TLSA "
                     "records are not used", host=host)
            return (), False
        name = f"_{port}._tcp.{host}"
        answer = await self.dns.query(name, TLSA_TYPE)
        if not answer.secure or answer.rcode != dns.OK:
            return (), False
        found: List[TLSA] = []
        for payload in answer.records:
            data = getattr(payload, "data", None)
            if isinstance(data, bytes):
                try:
                    found.append(TLSA.from_rdata(data))
                except ValueError:
                    continue
        records = usable(found)
        if found and not records:
            log.info("DANE: {name} has only unusable TLSA records; TLS required, "
                     "not authenticated", name=name)
        return records, bool(answer.records)
