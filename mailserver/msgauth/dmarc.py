# -*- test-case-name: tests.unit.test_msgauth -*-
"""DMARC (RFC 7489): the policy record, alignment and the disposition.

* The Author Domain is the domain of the ``From:`` address.  No address at
  all is ``permerror`` (no policy applies); several domains (several
  addresses or fields) are each evaluated and the strictest result counts.
* The record is the TXT at ``_dmarc.<author domain>``, else at
  ``_dmarc.<organisational domain>`` (RFC 7489 6.6.3); the organisational
  domain comes from the public suffix list (publicsuffixlist).  Only
  records starting ``v=DMARC1`` count; more than one is no policy.
* Identifiers align when equal (strict, ``adkim=s``/``aspf=s``) or when
  their organisational domains are equal (relaxed, the default).  DMARC
  passes when an aligned DKIM signature or an aligned SPF result passes.
* When it fails and an aligned DKIM or SPF check had a ``temperror``, the
  result is ``temperror``: a retry may pass.
* The policy is ``p``, or ``sp`` for a sub-domain of the organisational
  domain whose record was found there; ``pct`` below 100 applies it to that
  share of messages, the rest getting the next milder policy (6.6.4).
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

from mailserver.msgauth.dkim_verify import DKIMResult
from mailserver.msgauth.lookups import DNSTrouble, Lookups
from mailserver.msgauth.spf_check import SPFResult

POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}

_psl = None


def organisational_domain(domain: str) -> str:
    """The registered domain (public suffix plus one label), or the domain
    itself when it is a public suffix or unknown."""
    global _psl
    if _psl is None:
        from publicsuffixlist import PublicSuffixList

        _psl = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return _psl.privatesuffix(domain) or domain


@dataclass(frozen=True)
class Record:
    policy: str
    subdomain_policy: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


def parse_record(text: str) -> Optional[Record]:
    """A DMARC record, or None when ``text`` is not a usable one."""
    tags = {}
    for i, part in enumerate(text.split(";")):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            return None
        name, value = name.strip().lower(), value.strip()
        if i == 0 and (name != "v" or value != "DMARC1"):
            return None
        tags.setdefault(name, value)
    if "v" not in tags:
        return None
    policy = tags.get("p", "").lower()
    if policy not in POLICIES:
        # 6.6.3: a bad or missing p= with a rua is treated as p=none.
        if "rua" not in tags:
            return None
        policy = "none"
    sub = tags.get("sp", "").lower()
    if sub not in POLICIES:
        sub = policy
    try:
        pct = min(max(int(tags.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return Record(policy, sub, pct, adkim, aspf)


@dataclass(frozen=True)
class DMARCResult:
    result: str  # pass, fail, none, temperror, permerror
    from_domain: str = ""
    policy: str = ""  # what the record asks for this message (after sp)
    disposition: str = "none"  # what applies to this message (after pct): none, quarantine, reject
    reason: str = ""


def author_domains(from_values: Sequence[str]) -> list:
    """The distinct domains of every address in every From: field, in order."""
    domains = []
    for _name, address in email.utils.getaddresses(list(from_values)):
        if "@" in address:
            domain = address.rpartition("@")[2].strip().lower().rstrip(".")
            if domain and domain not in domains:
                domains.append(domain)
    return domains


def _find_record(lookups: Lookups, domain: str) -> tuple:
    """(Record or None, the domain it was found at)."""
    org = organisational_domain(domain)
    for name in dict.fromkeys((domain, org)):
        found = [r for r in (t.decode("utf-8", "replace") for t in
                             lookups.txt_strings(f"_dmarc.{name}"))
                 if r.strip().startswith("v=DMARC1")]
        if len(found) == 1:
            record = parse_record(found[0])
            if record is not None:
                return record, name
        elif found:
            return None, name  # several records: no policy (6.6.3)
    return None, ""


def _aligned(identifier: str, author: str, mode: str) -> bool:
    identifier = identifier.lower().rstrip(".")
    if not identifier:
        return False
    if mode == "s":
        return identifier == author
    return organisational_domain(identifier) == organisational_domain(author)


_RANK = {"none": 0, "quarantine": 1, "reject": 2}


def evaluate(lookups: Lookups, from_values: Sequence[str], spf: Optional[SPFResult],
             dkim_results: Iterable[DKIMResult],
             chance: Callable[[], float] = random.random) -> DMARCResult:
    """The DMARC result for a message (blocking: DNS).

    A message whose From: fields name several domains (RFC 7489 6.6.1
    leaves it to the receiver) is judged by the strictest of their results,
    so a second From: address cannot dodge a ``p=reject`` policy."""
    domains = author_domains(from_values)
    if not domains:
        return DMARCResult("permerror", reason="no From: address")
    dkim_results = list(dkim_results)
    results = [_evaluate_one(lookups, d, spf, dkim_results, chance) for d in domains]
    return max(results, key=lambda r: (_RANK[r.disposition] if r.result in
                                       ("fail", "temperror") else -1, r.result == "fail"))


def _evaluate_one(lookups: Lookups, author: str, spf: Optional[SPFResult],
                  dkim_results: Sequence[DKIMResult], chance) -> DMARCResult:
    try:
        record, found_at = _find_record(lookups, author)
    except DNSTrouble as e:
        return DMARCResult("temperror", author, reason=str(e))
    if record is None:
        return DMARCResult("none", author)
    sub = found_at != author
    policy = record.subdomain_policy if sub else record.policy
    passing, pending = False, False
    for result in dkim_results:
        if _aligned(result.domain, author, record.adkim):
            passing |= result.result == "pass"
            pending |= result.result == "temperror"
    if spf is not None and _aligned(spf.domain, author, record.aspf):
        passing |= spf.result == "pass"
        pending |= spf.result == "temperror"
    if passing:
        return DMARCResult("pass", author, policy)
    disposition = policy
    if record.pct < 100 and chance() * 100 >= record.pct:
        disposition = _MILDER[policy]
    return DMARCResult("temperror" if pending else "fail", author, policy, disposition)
