# -*- test-case-name: tests.unit.test_dnsrecords -*-
"""The DNS records a local domain publishes, and how they compare with DNS.

:func:`records_for` builds, from the configuration and the domain's DKIM
keys, every record ``mailserverctl dns DOMAIN`` prints: MX, SPF, one DKIM
key record per selector, DMARC with a reporting address, the MTA-STS TXT
record (RFC 8461; its ``id`` is a digest of the policy, so it changes
exactly when the policy does) with the policy file to serve, TLS-RPT
(RFC 8460) and the RFC 6186 SRV records of the submission and POP3
listeners.  :func:`compare` sets each beside what a lookup answers now:
``match``, ``missing``, ``different`` or ``error`` (the lookup failed).

Comparisons are by meaning, not by text: tag records (DKIM, DMARC,
MTA-STS, TLS-RPT) by their tags with white space ignored (for DKIM only the
key type and key), SPF with white space runs ignored, MX by host and
preference, SRV by port and target.  Nothing here does I/O; the lookup is
passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, List, Sequence, Tuple

from mailserver.msgauth.keys import txt_strings


@dataclass(frozen=True)
class Record:
    """One resource record in presentation form."""

    what: str  # what it is for: "MX", "SPF", "DKIM s=ed2026", "SRV submission"...
    name: str  # the owner, absolute, no trailing dot
    type: str  # MX, TXT or SRV
    value: str  # MX "10 host.", SRV "0 1 587 host.", TXT the text itself (unquoted)
    ttl: int = 3600

    def zone_line(self) -> str:
        value = txt_strings(self.value) if self.type == "TXT" else self.value
        ttl = f" {self.ttl}" if self.ttl else ""
        return f"{self.name}.{ttl} IN {self.type} {value}"


@dataclass(frozen=True)
class Published:
    """Everything to publish for one domain."""

    domain: str
    records: Tuple[Record, ...]
    mta_sts_policy: str  # the file served at https://mta-sts.DOMAIN/.well-known/mta-sts.txt
    notes: Tuple[str, ...] = ()  # problems found while building (an unusable key)


#: RFC 6186 services: (listener protocol, TLS mode) -> service label.
_SERVICES = {
    ("submission", "starttls"): "_submission",
    ("submission", "none"): "_submission",
    ("submission", "implicit"): "_submissions",
    ("pop3", "starttls"): "_pop3",
    ("pop3", "none"): "_pop3",
    ("pop3", "implicit"): "_pop3s",
}


def mx_hosts(config) -> Tuple[str, ...]:
    hosts = config.dns.mx or (config.server.hostname,)
    return tuple(h.lower().rstrip(".") for h in hosts)


def mta_sts_policy(config) -> str:
    """RFC 8461 3.2: the policy file (CRLF line ends)."""
    lines = ["version: STSv1", f"mode: {config.dns.mta_sts_mode}"]
    lines += [f"mx: {host}" for host in mx_hosts(config)]
    lines.append(f"max_age: {config.dns.mta_sts_max_age}")
    return "".join(line + "\r\n" for line in lines)


def policy_id(policy: str) -> str:
    """An ``id`` that changes with the policy: 20 hex digits of its SHA-256."""
    return hashlib.sha256(policy.encode("utf-8")).hexdigest()[:20]


def srv_records(config, domain: str, ttl: int) -> List[Record]:
    """RFC 6186: one SRV record per offered service and port, target our host."""
    from mailserver.config import parse_address

    out, seen = [], set()
    for lc in config.listeners:
        service = _SERVICES.get((lc.protocol, lc.tls))
        if service is None or lc.address.startswith("unix:"):
            continue
        port = parse_address(lc.address)[2]
        if (service, port) in seen:
            continue
        seen.add((service, port))
        out.append(Record(f"SRV {service[1:]}", f"{service}._tcp.{domain}", "SRV",
                          f"0 1 {port} {config.server.hostname.rstrip('.')}.", ttl))
    return out


def _mailto(template: str, domain: str) -> str:
    return "mailto:" + template.format(domain=domain) if template else ""


def records_for(config, domain: str, keys: Sequence = (), notes: Iterable[str] = ()
                ) -> Published:
    """The records for ``domain``; ``keys``: its DKIM
    :class:`~mailserver.msgauth.keys.SigningKey` objects."""
    domain = domain.lower().rstrip(".")
    d = config.dns
    ttl = d.ttl
    records = [Record("MX", domain, "MX", f"{10 * (i + 1)} {host}.", ttl)
               for i, host in enumerate(mx_hosts(config))]
    if d.spf:
        records.append(Record("SPF", domain, "TXT", d.spf, ttl))
    for key in keys:
        records.append(Record(f"DKIM s={key.selector}", f"{key.selector}._domainkey.{domain}",
                              "TXT", key.tags(), ttl))
    dmarc = f"v=DMARC1; p={d.dmarc_policy}"
    if d.dmarc_reports:
        dmarc += f"; rua={_mailto(d.dmarc_reports, domain)}"
    records.append(Record("DMARC", f"_dmarc.{domain}", "TXT", dmarc, ttl))
    policy = mta_sts_policy(config)
    records.append(Record("MTA-STS", f"_mta-sts.{domain}", "TXT",
                          f"v=STSv1; id={policy_id(policy)}", ttl))
    if d.tls_reports:
        records.append(Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT",
                              f"v=TLSRPTv1; rua={_mailto(d.tls_reports, domain)}", ttl))
    records.extend(srv_records(config, domain, ttl))
    return Published(domain, tuple(records), policy, tuple(notes))


def zone_text(published: Published) -> str:
    """The records as a zone-file fragment, the policy file as comments."""
    out = [f"; DNS records for {published.domain} (mailserverctl dns)"]
    for note in published.notes:
        out.append(f"; WARNING: {note}")
    for record in published.records:
        out.append(f"; {record.what}")
        out.append(record.zone_line())
    out.append(f"; MTA-STS policy: serve this file as text/plain at "
               f"https://mta-sts.{published.domain}/.well-known/mta-sts.txt")
    out.append(f"; (mta-sts.{published.domain} needs an address and a certificate valid for "
               "that name):")
    out.extend(f";   {line}" for line in published.mta_sts_policy.splitlines())
    return "\n".join(out) + "\n"


# -- comparing with what DNS answers ------------------------------------------------

class LookupFailed(Exception):
    """The lookup got no answer (timeout, SERVFAIL, refused)."""


def _tags(text: str) -> dict:
    out = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            out[name.strip().lower()] = "".join(value.split())
    return out


_TAG_KINDS = {"DMARC": "v=dmarc1", "MTA-STS": "v=stsv1", "TLS-RPT": "v=tlsrptv1"}


def _same(record: Record, found: str) -> bool:
    if record.type == "MX":
        want, got = record.value.split(), found.split()
        return len(got) == 2 and int(got[0]) == int(want[0]) and \
            got[1].lower().rstrip(".") == want[1].lower().rstrip(".")
    if record.type == "SRV":
        want, got = record.value.split(), found.split()
        return len(got) == 4 and got[2] == want[2] and \
            got[3].lower().rstrip(".") == want[3].lower().rstrip(".")
    if record.what == "SPF":
        return " ".join(found.lower().split()) == " ".join(record.value.lower().split())
    want, got = _tags(record.value), _tags(found)
    if record.what.startswith("DKIM"):
        return (got.get("k", "rsa").lower(), got.get("p")) == (want["k"], want["p"])
    return got == want


def _relevant(record: Record, found: str) -> bool:
    """Is this answer of the record's kind (a TXT name holds several kinds)?"""
    if record.type != "TXT" or record.what.startswith("DKIM"):
        return True
    head = "".join(found.split()).lower()
    if record.what == "SPF":
        return head.startswith("v=spf1")
    return head.startswith(_TAG_KINDS[record.what] + ";") or head == _TAG_KINDS[record.what]


@dataclass(frozen=True)
class Comparison:
    record: Record
    status: str  # match, missing, different, error
    found: Tuple[str, ...] = ()  # answers of the record's kind (or the error)


def compare(records: Sequence[Record],
            lookup: Callable[[str, str], List[str]]) -> List[Comparison]:
    """Each record beside the answers ``lookup(name, type)`` gives (a list of
    presentation strings, TXT joined; [] for no such name or type;
    LookupFailed when there is no answer)."""
    out = []
    for record in records:
        try:
            answers = lookup(record.name, record.type)
        except LookupFailed as e:
            out.append(Comparison(record, "error", (str(e),)))
            continue
        found = tuple(a for a in answers if _relevant(record, a))
        if not found:
            status = "missing"
        elif any(_same(record, a) for a in found):
            status = "match"
        else:
            status = "different"
        out.append(Comparison(record, status, found))
    return out


def report(comparisons: Sequence[Comparison]) -> str:
    """One line per record, with what was found where it differs."""
    out = []
    for c in comparisons:
        out.append(f"{c.status:<9} {c.record.what:<18} {c.record.zone_line()}")
        if c.status in ("different", "error"):
            out.extend(f"{'':<9} {'found:' if c.status == 'different' else 'error:':<18} {f}"
                       for f in c.found)
    return "\n".join(out) + "\n"


def dnspython_lookup(nameservers: Sequence[str], timeout: float = 5.0
                     ) -> Callable[[str, str], List[str]]:
    """A blocking ``lookup(name, type)`` through dnspython, asking
    ``nameservers`` ("ip" or "ip:port"; none: /etc/resolv.conf)."""
    import dns.exception
    import dns.resolver

    from mailserver.msgauth.lookups import make_dns_resolver

    resolver = make_dns_resolver(nameservers)
    resolver.lifetime = timeout

    def lookup(name: str, rtype: str) -> List[str]:
        try:
            answer = resolver.resolve(name, rtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as e:
            raise LookupFailed(f"{name} {rtype}: {e}") from None
        if answer.rrset is None:
            return []
        if rtype == "TXT":
            return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset]
        return [r.to_text() for r in answer.rrset]

    return lookup


def exit_status(comparisons: Sequence[Comparison]) -> int:
    """0 all match, 1 something missing or different, 75 (EX_TEMPFAIL) only
    lookup failures besides matches."""
    statuses = {c.status for c in comparisons}
    if statuses & {"missing", "different"}:
        return 1
    return 75 if "error" in statuses else 0


__all__ = ["Comparison", "LookupFailed", "Published", "Record", "compare", "dnspython_lookup",
           "exit_status", "records_for", "report", "zone_text"]
