# -*- test-case-name: tests.unit.test_msgauth -*-
"""The MX's authentication check: SPF at MAIL, DKIM, ARC and DMARC after the data.

:class:`InboundAuth` is an acceptance-pipeline :class:`Check` on the smtp
listeners (port 25).  Authenticated sessions and clients in
``relay.trusted_networks`` are not checked: their mail is ours.

* MAIL: SPF for the envelope sender (the HELO name for the null sender).
  Only ``[checks] spf_reject`` turns a ``fail`` into ``550 5.7.23``; the
  result is otherwise kept for the header and for DMARC.
* End of data: every DKIM signature, the ARC chain and DMARC, then
  :func:`decide` applies the policy: a DMARC failure whose disposition is
  ``reject`` is ``550 5.7.1`` (``dmarc_reject``); ``quarantine`` marks the
  message as junk (``X-Spam-Flag: YES``, and the junk folder when one is
  configured); a DMARC ``temperror`` of a ``p=reject`` domain is ``451
  4.7.1``, since only a retry can tell.  Any other DNS trouble is reported
  as ``temperror`` and the message accepted.
* Received ``Authentication-Results`` fields with our authserv-id are
  removed (:mod:`.strip`) and ours is added on top, just below our
  Received line.

The libraries block: each step runs on the checks' own thread pool with a
DNS time budget (``dns_timeout``); the reactor also stops waiting a little
after it, and treats the step as ``temperror``.  A bug in a step is logged
and treated the same way: the checks never lose or refuse mail by mistake.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from twisted.internet import defer
from twisted.logger import Logger

from mailserver import reply as R
from mailserver.msgauth.dkim_verify import (ARCResult, DKIMResult, header_fields, verify_arc,
                                            verify_dkim)
from mailserver.msgauth.dmarc import DMARCResult, evaluate
from mailserver.msgauth.lookups import Lookups
from mailserver.msgauth.results import authentication_results, authserv_id
from mailserver.msgauth.spf_check import SPFResult, check_spf
from mailserver.msgauth.strip import rewrite_without
from mailserver.pipeline.acceptance import Check

log = Logger(namespace="mailserver.checks")

JUNK_HEADER = ("X-Spam-Flag", "YES")
_GRACE = 2.0  # seconds the reactor waits past the DNS budget for a worker
_NO_RESULT = "no result in time"


@dataclass(frozen=True)
class Settings:
    authserv_id: str
    dmarc_reject: bool = True
    dmarc_quarantine: bool = True
    spf_reject: bool = False
    junk_folder: str = ""
    dns_timeout: float = 10.0


@dataclass(frozen=True)
class Report:
    """What the end-of-data checks found."""

    dkim: Tuple[DKIMResult, ...] = ()
    arc: Optional[ARCResult] = None
    dmarc: Optional[DMARCResult] = None
    forged: int = 0  # received A-R fields claiming our authserv-id


@dataclass(frozen=True)
class Verdict:
    reply: Optional[R.Reply] = None  # a refusal, or None to accept
    junk: bool = False
    action: str = "accept"  # for the log: accept, junk, reject, defer


def decide(settings: Settings, dmarc: Optional[DMARCResult]) -> Verdict:
    """The policy, applied to a DMARC result."""
    if dmarc is None:
        return Verdict()
    if dmarc.result == "fail":
        if dmarc.disposition == "reject" and settings.dmarc_reject:
            return Verdict(R.DMARC_REJECTED, action="reject")
        if dmarc.disposition in ("reject", "quarantine") and settings.dmarc_quarantine:
            return Verdict(junk=True, action="junk")
    if dmarc.result == "temperror" and dmarc.disposition == "reject" and settings.dmarc_reject:
        return Verdict(R.DMARC_TEMPORARY, action="defer")
    return Verdict()


@dataclass
class _State:
    spf: Optional[SPFResult] = None


class InboundAuth(Check):
    name = "inbound-auth"

    def __init__(self, settings: Settings, *, run: Callable, clock, resolver, trusted=(),
                 chance: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.run = run  # run(f, *args) -> Deferred, on the checks' thread pool
        self.clock = clock
        self.resolver = resolver  # dnspython resolver with the configured nameservers
        self.trusted = trusted  # policy.Networks: relay clients, not checked
        self.chance = chance

    def _skip(self, session) -> bool:
        return (session.kind != "smtp" or session.authenticated
                or session.client_ip in self.trusted)

    async def _in_thread(self, what: str, queue_id: str, f, *args):
        """``f(*args)`` on the pool, within the budget; None on time-out or bug."""
        d = self.run(f, *args)
        d.addTimeout(self.settings.dns_timeout + _GRACE, self.clock)
        try:
            return await d
        except defer.TimeoutError:
            log.warn("{id}: {what}: no result within {t:.0f} s", id=queue_id, what=what,
                     t=self.settings.dns_timeout + _GRACE)
        except Exception:
            log.failure("{id}: {what} failed", id=queue_id, what=what)
        return None

    async def on_mail(self, session, txn) -> Optional[R.Reply]:
        if self._skip(session):
            return None
        helo = session.helo or ""
        spf = await self._in_thread("SPF", "NOQUEUE", self._spf, session.client_ip,
                                    txn.sender, helo)
        if spf is None:
            spf = SPFResult("temperror", "mailfrom" if txn.sender else "helo",
                            txn.sender or helo, "", _NO_RESULT)
        txn.checks[self.name] = _State(spf)
        if spf.result == "fail" and self.settings.spf_reject:
            log.info("{listener}: NOQUEUE: SPF fail for <{sender}> from {client}",
                     listener=session.listener, sender=txn.sender, client=session.client_ip)
            return R.SPF_FAILED
        return None

    def _spf(self, ip: str, sender: str, helo: str) -> SPFResult:
        return check_spf(Lookups(self.resolver, self.settings.dns_timeout), ip, sender, helo)

    async def on_data(self, session, txn) -> Optional[R.Reply]:
        state = txn.checks.get(self.name)
        if state is None or self._skip(session):
            return None
        message = txn.message
        queue_id = message.queue_id
        data = getattr(message, "data", None)  # a small message is still in memory
        report = await self._in_thread("DKIM/ARC/DMARC", queue_id, self._content,
                                       message.path if data is None else data, state.spf)
        unknown = report is None  # timed out or a bug: forged fields unknown too
        if unknown:
            report = Report(dkim=(DKIMResult("temperror", reason=_NO_RESULT),),
                            arc=ARCResult("temperror"),
                            dmarc=DMARCResult("temperror", reason=_NO_RESULT))
        verdict = decide(self.settings, report.dmarc)
        log.info("{id}: authentication: spf={spf} dkim={dkim} arc={arc} dmarc={dmarc}"
                 "{policy} from={domain}: {action}", id=queue_id, spf=state.spf.result,
                 dkim=",".join(d.result for d in report.dkim) or "none",
                 arc=report.arc.result if report.arc else "none",
                 dmarc=report.dmarc.result if report.dmarc else "none",
                 policy=f" (p={report.dmarc.policy})" if report.dmarc and report.dmarc.policy
                 else "", domain=report.dmarc.from_domain if report.dmarc else "",
                 action=verdict.action)
        if verdict.reply is not None:
            return verdict.reply
        if report.forged or unknown:  # the rewrite looks for them itself
            size = await self.run(rewrite_without, message.path, self.settings.authserv_id)
            if size is not None:
                message.size = size
                log.info("{id}: removed Authentication-Results field(s) claiming to be ours",
                         id=queue_id)
        txn.add_header("Authentication-Results", authentication_results(
            self.settings.authserv_id, spf=state.spf, dkim=report.dkim, arc=report.arc,
            dmarc=report.dmarc))
        if verdict.junk:
            txn.add_header(*JUNK_HEADER)
            txn.folder = self.settings.junk_folder
        return None

    def _content(self, source, spf: Optional[SPFResult]) -> Report:
        """DKIM, ARC and DMARC for the message, its bytes or its spooled
        file's path (blocking)."""
        if isinstance(source, bytes):
            data = source
        else:
            with open(source, "rb") as f:
                data = f.read()  # dkimpy verifies from memory; see docs/decisions.rst
        lookups = Lookups(self.resolver, self.settings.dns_timeout)
        fields = header_fields(data)
        dkim_results = tuple(verify_dkim(data, lookups, headers=fields))
        arc = verify_arc(data, lookups, headers=fields)
        del data
        headers = [(name.decode("ascii", "replace").strip(),
                    value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", ""))
                   for name, value in fields]
        dmarc = evaluate(lookups, [v for n, v in headers if n == "from"], spf, dkim_results,
                         self.chance)
        ours = self.settings.authserv_id.lower()
        forged = sum(1 for n, v in headers
                     if n == "authentication-results" and authserv_id(v) == ours)
        return Report(dkim_results, arc, dmarc, forged)


def build_inbound_auth(config, reactor, parent, trusted) -> Optional[InboundAuth]:
    """The MX check with its thread pool (a child service of ``parent``), or
    None when ``[checks] enabled`` is off."""
    c = config.checks
    if not c.enabled:
        return None
    from twisted.internet import threads
    from twisted.python.threadpool import ThreadPool

    from mailserver.msgauth.lookups import make_dns_resolver

    pool = ThreadPool(minthreads=0, maxthreads=c.threads, name="mailserver-checks")
    from mailserver.service import ThreadPoolService

    ThreadPoolService(pool).setServiceParent(parent)
    settings = Settings(authserv_id=c.authserv_id or config.server.hostname,
                        dmarc_reject=c.dmarc_reject, dmarc_quarantine=c.dmarc_quarantine,
                        spf_reject=c.spf_reject, junk_folder=c.junk_folder,
                        dns_timeout=c.dns_timeout)
    return InboundAuth(settings, run=lambda f, *a: threads.deferToThreadPool(reactor, pool, f, *a),
                       clock=reactor, resolver=make_dns_resolver(config.relay.nameservers),
                       trusted=trusted)
