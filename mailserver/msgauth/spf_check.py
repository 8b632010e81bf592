# -*- test-case-name: tests.unit.test_msgauth -*-
"""SPF (RFC 7208) through pyspf, for the MAIL command.

The identity checked is the envelope sender's domain; for the null sender
it is the HELO name (RFC 7208 2.4: ``postmaster@<helo>``).  A HELO that is
an address literal or not a domain name gives ``none``.  pyspf does the
evaluation; its DNS goes through our :class:`~.lookups.Lookups` (bounded
time, the configured nameservers), so DNS trouble is ``temperror``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailserver.msgauth.lookups import Lookups, install_spf_hook, using

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")


@dataclass(frozen=True)
class SPFResult:
    result: str  # one of RESULTS
    identity: str  # "mailfrom" or "helo"
    value: str  # the address (mailfrom) or the HELO name checked
    domain: str  # the domain whose policy decided (for DMARC alignment)
    reason: str = ""


def _is_domain(name: str) -> bool:
    name = name.rstrip(".")
    if not name or "." not in name or name.startswith("["):
        return False
    return all(0 < len(label) < 64 for label in name.split("."))


def check_spf(lookups: Lookups, client_ip: str, sender: str, helo: str) -> SPFResult:
    """Evaluate SPF for one MAIL (blocking: run it on a worker thread)."""
    import spf

    install_spf_hook()
    helo = helo.strip()
    if sender:
        identity, value = "mailfrom", sender
        domain = sender.rpartition("@")[2].lower().rstrip(".")
    else:
        identity, value = "helo", helo
        domain = helo.lower().rstrip(".")
    if not _is_domain(domain):
        return SPFResult("none", identity, value, domain, "no domain to check")
    budget = max(lookups.deadline - lookups.clock(), 0.001)
    with using(lookups):
        try:
            query = spf.query(i=client_ip, s=sender or f"postmaster@{domain}", h=helo or domain,
                              timeout=budget, querytime=budget)
            result, _code, explanation = query.check()
        except Exception as e:  # pyspf raises only for arguments it cannot use
            return SPFResult("permerror", identity, value, domain, str(e)[:200])
    result = result.lower()
    if result not in RESULTS:
        result = "permerror" if "error" in result else "neutral"
    return SPFResult(result, identity, value, domain, explanation or "")
