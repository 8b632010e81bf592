# -*- test-case-name: tests.unit.test_mtasts,tests.integration.test_outbound_security -*-
"""MTA-STS (RFC 8461): a recipient domain's published wish for verified TLS.

* Sans-IO: :func:`parse_txt` (the ``_mta-sts.DOMAIN`` TXT record's ``id``),
  :func:`parse_policy` (the policy file), :func:`mx_matches` (RFC 8461 §4.1
  patterns: exact names, or ``*.example.net`` for exactly one more label) and
  :class:`PolicyCache` (policies by domain with their id and expiry, kept in
  a JSON file so a restart keeps them).
* :class:`HTTPSPolicyFetcher`: GET ``https://mta-sts.DOMAIN/.well-known/mta-sts.txt``
  with twisted.web's Agent, the certificate verified against the system's CAs
  (or an injected trust root), no redirects, at most :data:`MAX_POLICY_SIZE`
  octets within ``timeout`` seconds, ``200`` and ``text/plain`` only.
  ``connect_to`` maps a policy host to another ``(address, port)``; it exists
  for tests (a local HTTPS server), the name checked in the certificate
  stays ``mta-sts.DOMAIN``.
* :class:`MTASTS`: :meth:`MTASTS.policy_for` answers the policy in force for
  a domain: the TXT record is looked up every time (through the configured
  twisted.names resolver); the same id as the cached policy keeps it, a new
  id (or no cached policy) fetches; a failed fetch or lookup keeps a cached
  policy until its ``max_age`` runs out (RFC 8461 §5.1); ``mode: none``
  removes the domain's policy.
* :func:`certificate_problem`: why a server's certificate chain would fail
  the verification ``enforce`` mode does (OpenSSL's chain check against the
  same trust root, service_identity for the MX host name), for the
  after-handshake report ``testing`` mode makes (RFC 8461 §5: report, do not
  enforce).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger(namespace="mailserver.remote")

MODES = ("enforce", "testing", "none")
MAX_AGE_LIMIT = 31557600
MAX_POLICY_SIZE = 64 * 1024
_ID = re.compile(r"[A-Za-z0-9]{1,32}")


@dataclass(frozen=True)
class Policy:
    """A parsed policy: ``mode``, ``mx`` patterns (lower case), ``max_age``
    seconds; ``id`` (from the TXT record) and ``expires`` (a clock time)
    once cached."""

    mode: str
    mx: Tuple[str, ...]
    max_age: int
    id: str = ""
    expires: float = 0.0

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def parse_txt(strings) -> Optional[str]:
    """The policy id from the TXT records at ``_mta-sts.DOMAIN`` (each a
    record's text); None unless exactly one record starts ``v=STSv1`` and
    has a valid id (RFC 8461 §3.1)."""
    found = [s for s in strings if s.startswith("v=STSv1;") or s.strip() == "v=STSv1"]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def parse_policy(text: str) -> Policy:
    """Parse a policy file (RFC 8461 §3.2); ValueError names what is wrong."""
    fields: Dict[str, str] = {}
    mx = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"policy line without ':': {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise ValueError("policy version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise ValueError(f"policy mode {mode!r} is not one of {', '.join(MODES)}")
    age = fields.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise ValueError(f"policy max_age {age!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise ValueError("policy has no mx lines")
    return Policy(mode, tuple(mx), min(int(age), MAX_AGE_LIMIT))


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: ``mail.example.com`` matches itself; ``*.example.com``
    matches ``mx1.example.com`` but neither ``example.com`` nor
    ``a.b.example.com``.  Case and a trailing dot do not matter."""
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _dot, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return host == pattern


class PolicyCache:
    """Policies by domain, in memory and in the JSON file ``path`` (None:
    memory only).  A file that cannot be read starts an empty cache."""

    def __init__(self, path: Optional[str], clock: Callable[[], float]) -> None:
        self.path = path
        self.clock = clock
        self._policies: Dict[str, Policy] = {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    for domain, fields in json.load(f).items():
                        fields["mx"] = tuple(fields["mx"])
                        self._policies[domain] = Policy(**fields)
            except (OSError, ValueError, TypeError, KeyError) as e:
                log.warn("MTA-STS cache {path} unreadable ({e}); starting empty", path=path, e=e)
                self._policies = {}

    def get(self, domain: str) -> Optional[Policy]:
        """The unexpired cached policy of ``domain``."""
        policy = self._policies.get(domain)
        if policy is not None and policy.expires <= self.clock():
            return None
        return policy

    def put(self, domain: str, policy: Optional[Policy]) -> None:
        if policy is None:
            self._policies.pop(domain, None)
        else:
            self._policies[domain] = policy
        self._save()

    def _save(self) -> None:
        """Write the file (temporary name, rename); no fsync: a lost cache
        only costs a fetch.  Expired policies are dropped."""
        if not self.path:
            return
        now = self.clock()
        data = {d: asdict(p) for d, p in self._policies.items() if p.expires > now}
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warn("cannot write MTA-STS cache {path}: {e}", path=self.path, e=e)


class FetchError(Exception):
    """The policy could not be fetched; the text says why."""


class _Body(protocol.Protocol):
    def __init__(self, limit: int, done: defer.Deferred) -> None:
        self.limit, self.done, self.data = limit, done, bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit and not self.done.called:
            self.done.errback(FetchError(f"policy larger than {self.limit} octets"))
            self.transport.stopProducing()

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:
            from twisted.web.client import ResponseDone
            from twisted.web.http import PotentialDataLoss

            if reason is None or reason.check(ResponseDone, PotentialDataLoss):
                self.done.callback(bytes(self.data))
            else:
                self.done.errback(FetchError(f"policy transfer failed: {reason.value}"))


class _Endpoints:
    """Agent endpoint factory: TLS to ``mta-sts.DOMAIN:443`` (or where
    ``connect_to`` says), verified for the policy host's name."""

    def __init__(self, reactor, policy, connect_to: Mapping[str, Tuple[str, int]],
                 timeout: float) -> None:
        self.reactor, self.policy, self.connect_to, self.timeout = (
            reactor, policy, connect_to, timeout)

    def endpointForURI(self, uri):
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        address, port = self.connect_to.get(host, (host, uri.port))
        plain = HostnameEndpoint(self.reactor, address, port, timeout=self.timeout)
        return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), plain)


class HTTPSPolicyFetcher:
    """``await fetcher(domain)`` -> the policy text; raises :class:`FetchError`.

    ``trust_root``: a Twisted trust root (None: the platform's CAs)."""

    def __init__(self, reactor, *, trust_root=None, timeout: float = 30.0,
                 max_size: int = MAX_POLICY_SIZE,
                 connect_to: Optional[Mapping[str, Tuple[str, int]]] = None) -> None:
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

        self.reactor, self.timeout, self.max_size = reactor, timeout, max_size
        policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        endpoints = _Endpoints(reactor, policy, dict(connect_to or {}), timeout)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints)

    async def __call__(self, domain: str) -> str:
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt".encode("idna")
        d = self.agent.request(b"GET", url)
        d.addTimeout(self.timeout, self.reactor)
        try:
            response = await d
        except Exception as e:
            raise FetchError(f"cannot fetch {url.decode()}: {type(e).__name__} {e}") from None
        if response.code != 200:
            response.deliverBody(protocol.Protocol())
            raise FetchError(f"{url.decode()} answered HTTP {response.code}")
        ctype = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if ctype.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(protocol.Protocol())
            raise FetchError(f"{url.decode()} is not text/plain")
        if isinstance(response.length, int) and response.length > self.max_size:
            response.deliverBody(protocol.Protocol())
            raise FetchError(f"policy larger than {self.max_size} octets")
        done: defer.Deferred = defer.Deferred()
        response.deliverBody(_Body(self.max_size, done))
        done.addTimeout(self.timeout, self.reactor)
        try:
            body = await done
        except FetchError:
            raise
        except Exception as e:
            raise FetchError(f"policy transfer failed: {type(e).__name__}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError("policy is not UTF-8") from None


class MTASTS:
    """The policy in force for a recipient domain (see the module docstring).

    ``resolver``: a twisted.names ``IResolver`` (its ``lookupText``);
    ``fetch``: ``async (domain) -> text`` (:class:`HTTPSPolicyFetcher`);
    ``cache``: a :class:`PolicyCache`; ``clock``: ``() -> seconds``."""

    def __init__(self, resolver, fetch, cache: PolicyCache, clock: Callable[[], float]) -> None:
        self.resolver, self.fetch, self.cache, self.clock = resolver, fetch, cache, clock

    async def _txt_id(self, domain: str) -> Tuple[Optional[str], bool]:
        """``(id, answered)``: the TXT record's policy id, and whether the
        DNS gave an answer at all (False: a lookup failure)."""
        from twisted.names import error as dns_error

        try:
            answers, _auth, _add = await self.resolver.lookupText(f"_mta-sts.{domain}")
        except (dns_error.DNSNameError, dns_error.AuthoritativeDomainError):
            return None, True
        except Exception as e:
            log.info("MTA-STS: TXT lookup for {domain} failed: {e}", domain=domain,
                     e=type(e).__name__)
            return None, False
        texts = [b"".join(rr.payload.data).decode("utf-8", "replace")
                 for rr in answers if getattr(rr.payload, "TYPE", None) == 16]
        return parse_txt(texts), True

    async def policy_for(self, domain: str) -> Optional[Policy]:
        """The policy to apply now for mail to ``domain``, or None."""
        domain = domain.lower().rstrip(".")
        cached = self.cache.get(domain)
        policy_id, answered = await self._txt_id(domain)
        if policy_id is None:
            # No (valid) record, or no answer: a cached policy stays in force
            # until it expires (RFC 8461 §5.1: absence is not a withdrawal).
            return _in_force(cached)
        if cached is not None and cached.id == policy_id:
            return _in_force(cached)
        try:
            text = await self.fetch(domain)
            fetched = parse_policy(text)
        except (FetchError, ValueError) as e:
            log.warn("MTA-STS: policy for {domain} (id {id}) not usable: {e}; {keep}",
                     domain=domain, id=policy_id, e=str(e),
                     keep="keeping the cached one" if cached else "no policy applied")
            return _in_force(cached)
        policy = Policy(fetched.mode, fetched.mx, fetched.max_age, policy_id,
                        self.clock() + fetched.max_age)
        log.info("MTA-STS: {domain} policy id {id}: mode {mode}, mx {mx}, max_age {age}",
                 domain=domain, id=policy_id, mode=policy.mode, mx=",".join(policy.mx),
                 age=policy.max_age)
        self.cache.put(domain, policy)
        return _in_force(policy)


_STORES: Dict[object, tuple] = {}


def _store_for(trust_root):
    """An OpenSSL certificate store holding ``trust_root`` (a Twisted trust
    root; None: the platform's CAs), made once per trust root.  The store
    belongs to a context that is kept with it (pyOpenSSL does not keep the
    context alive for the store)."""
    from OpenSSL import SSL
    from twisted.internet import ssl

    key = "platform" if trust_root is None else trust_root
    if key not in _STORES:
        context = SSL.Context(SSL.TLS_METHOD)
        (trust_root or ssl.platformTrust())._addCACertsToContext(context)
        _STORES[key] = (context, context.get_cert_store())
    return _STORES[key][1]


def certificate_problem(chain, host: str, trust_root=None) -> Optional[str]:
    """None when ``chain`` (the server's certificates, leaf first, as
    cryptography objects) would pass the verification of ``enforce`` mode
    for MX ``host``: a chain to ``trust_root`` and the host name in the
    leaf; otherwise why not."""
    from OpenSSL import crypto
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    if not chain:
        return "no certificate"
    certs = [crypto.X509.from_cryptography(c) for c in chain]
    try:
        crypto.X509StoreContext(_store_for(trust_root), certs[0], certs[1:]).verify_certificate()
    except crypto.X509StoreContextError as e:
        return f"certificate not trusted ({e})"
    try:
        verify_certificate_hostname(chain[0], host)
    except (CertificateError, VerificationError):
        return f"certificate does not name {host}"
    return None


def _in_force(policy: Optional[Policy]) -> Optional[Policy]:
    """``policy`` unless it is absent or says ``mode: none``."""
    return policy if policy is not None and policy.mode != "none" else None
