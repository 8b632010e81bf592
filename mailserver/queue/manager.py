# -*- test-case-name: tests.unit.test_queue_manager -*-
"""The queue manager: decides what is delivered when, like Postfix's qmgr.

It scans the spool's ``incoming/`` and ``deferred/`` directories, claims up to
``max_active`` messages by moving them to ``active/`` (a rename: another
process that got there first simply wins), and hands each message's pending
recipients to the router, which groups them by destination.  Each
destination's results come back per recipient:

* 2xx: delivered, the recipient is done;
* 5xx: failed, a bounce (RFC 3464 DSN) goes to the sender unless NOTIFY says
  otherwise or the message is itself a bounce; a bounce (any message from
  ``<>``) that fails for good brings ``postmaster`` a short notice instead
  (Postfix ``notify_classes = bounce, 2bounce``), unless it is such a notice
  itself, which is dropped with a log line;
* 4xx (or any exception): tried again later, with a backoff that doubles from
  ``min_backoff`` to ``max_backoff``, until the message is older than
  ``lifetime``, when the rest bounce as expired.

A bounce is committed to the spool before the message it reports on is
updated, so a crash in between can duplicate a bounce but never lose one.
Time comes from the injected clock; spool work runs through the injected
``io`` (a worker thread in the server).

Faults of our own (a full disk while saving an envelope, an unreadable
directory, a bug) never become a loop: a message whose processing failed goes
back to ``deferred/`` and is held in memory for a backoff before its next try,
and recipients delivered in the failed round are remembered so the next round
does not deliver them again.  Only an envelope that cannot be parsed goes to
``corrupt/``; an I/O error is a reason to wait, not to quarantine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, OutboundMessage
from mailserver.errors import is_known, to_reply

log = Logger(namespace="mailserver.qmgr")

@dataclasses.dataclass(frozen=True)
class Schedule:
    """Retry and lifetime settings, in seconds."""

    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    lifetime: float = 5 * 86400.0
    delay_warning: float = 0.0  # 0: no delay warnings
    scan_interval: float = 60.0
    max_active: int = 100
    destination_concurrency: int = 20
    flush_poll: float = 2.0  # seconds between checks of the spool's flush file

    def backoff(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed try (1, 2, ...)."""
        doublings = min(max(attempts - 1, 0), 40)  # flushes count: attempts grow without bound
        return min(self.max_backoff, self.min_backoff * (2.0 ** doublings))


class QueueManager(service.Service):
    """Runs deliveries from ``spool`` through ``router`` on ``clock``."""

    def __init__(self, spool, router, clock, *, hostname: str, schedule: Schedule = Schedule(),
                 bounces=None, io=None, metrics=None,
                 postmaster: Optional[str] = None) -> None:
        from mailserver.metrics import NO_METRICS
        from mailserver.queue import bounce

        self.metrics = metrics or NO_METRICS  # deliveries by target and result, delays

        self.spool = spool
        self.router = router
        self.clock = clock
        self.hostname = hostname
        self.schedule = schedule
        self.bounces = bounces or bounce
        self.postmaster = postmaster  # undeliverable bounces are reported here; None: logged
        self.active: Dict[str, defer.Deferred] = {}
        self._semaphores: Dict[tuple, defer.DeferredSemaphore] = {}
        # Spool work (listings, envelope reads, writes with fsync) runs through
        # ``io``: a worker thread in the server, inline in tests.
        self._io = io or (lambda f, *a: defer.maybeDeferred(f, *a))
        self._scanning = False
        self._rescan = False
        # After a failed round: {id: (not before, failures)} and the replies
        # of recipients delivered in that round but not saved.
        self._held: Dict[str, tuple] = {}
        self._unsaved: Dict[str, Dict[str, tuple]] = {}
        self._timer = None
        self._poller = None
        self._flush_mtime = self._flush_stamp()
        self._stopping = False

    # -- service ---------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._stopping = False
        counts = self.spool.recover()
        if counts:
            log.info("queue recovered: {counts}", counts=counts)
        self.wake()
        self._poller = self.clock.callLater(self.schedule.flush_poll, self._poll)

    def stopService(self):
        """Stop scanning; give deliveries in flight a bounded time to finish.

        Whatever is still active when the process exits goes back to
        ``incoming/`` at the next start (``spool.recover``)."""
        super().stopService()
        self._stopping = True
        self._cancel_timer()
        if self._poller is not None and self._poller.active():
            self._poller.cancel()
        if not self.active:
            return None
        pending = defer.DeferredList(list(self.active.values()), consumeErrors=True)
        done = defer.Deferred()

        def finished(_):
            if timeout.active():
                timeout.cancel()
            if not done.called:
                done.callback(None)

        timeout = self.clock.callLater(10.0, finished, None)
        pending.addBoth(finished)
        return done

    # -- scheduling ------------------------------------------------------
    def wake(self) -> None:
        """Scan soon (new mail, a flush, or a slot freed)."""
        if self._stopping:
            return
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds():
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(0, self.scan)

    def _flush_stamp(self) -> float:
        try:
            return os.stat(self.spool.flush_path).st_mtime
        except OSError:
            return 0.0

    def _poll(self) -> None:
        """Scan at once when ``mailserverctl queue flush`` (or another process)
        touched the spool's flush file."""
        stamp = self._flush_stamp()
        if stamp != self._flush_mtime:
            self._flush_mtime = stamp
            self.wake()
        if not self._stopping:
            self._poller = self.clock.callLater(self.schedule.flush_poll, self._poll)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def scan(self) -> None:
        """Claim what is due, up to ``max_active``; plan the next scan."""
        self._timer = None
        if self._stopping:
            return
        if self._scanning:
            self._rescan = True
            return
        self._scanning = True
        d = defer.ensureDeferred(self._scan())
        d.addErrback(lambda f: log.failure("queue scan failed", f))

    async def _scan(self) -> None:
        now = self.clock.seconds()
        try:
            room = self.schedule.max_active - len(self.active)
            held = {k: until for k, (until, _n) in self._held.items()}
            try:
                claimed, next_due = await self._io(self._claim_due, now, room,
                                                   set(self.active), held)
            except Exception:
                # An unreadable spool directory (EMFILE, EIO): try again later.
                log.failure("queue scan failed; next try in {s:.0f} s", s=self.schedule.scan_interval)
                claimed, next_due = [], now + self.schedule.scan_interval
            if self._stopping:
                # Shutting down while the claim ran: no delivery may start that
                # stopService does not wait for; recover() requeues them.
                return
            self._forget_stale(now)
            for queue_id, loaded in claimed:
                d = defer.ensureDeferred(self._process(queue_id, loaded))
                self.active[queue_id] = d
                d.addErrback(self._crashed, queue_id)
                d.addBoth(self._finished, queue_id)
        finally:
            self._scanning = False
        if self._stopping:
            return
        if self._rescan:
            self._rescan = False
            next_due = now
        when = max(next_due - now, 0.0)
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= now + when:
                return  # a wake() during the scan already planned an earlier one
            self._timer.cancel()
        self._timer = self.clock.callLater(when, self.scan)

    def _forget_stale(self, now: float) -> None:
        """Drop failure records of messages not seen for a whole lifetime
        (deleted or quarantined meanwhile): memory stays bounded."""
        for queue_id, (until, _n) in list(self._held.items()):
            if until < now - self.schedule.lifetime and queue_id not in self.active:
                self._held.pop(queue_id, None)
                self._unsaved.pop(queue_id, None)

    def _claim_due(self, now: float, room: int, busy: set, held: Dict[str, float]) -> tuple:
        """([(id, its envelope or the error loading it)] claimed, when the
        next deferred one is due); runs in a worker thread: a directory
        listing, small envelope reads and renames.  Loading here saves each
        message a trip through the thread pool."""
        claimed = []
        next_due = now + self.schedule.scan_interval
        for state in ("incoming", "deferred"):
            for _state, queue_id in list(self.spool.list(state)):
                if len(claimed) >= room:
                    return claimed, next_due
                if queue_id in busy:
                    continue
                if held.get(queue_id, now) > now:
                    next_due = min(next_due, held[queue_id])
                    continue
                if state == "deferred":
                    due = self._due_time(queue_id)
                    if due is None:
                        continue
                    if due > now:
                        next_due = min(next_due, due)
                        continue
                if self._claim(queue_id):
                    try:
                        loaded = self.spool.load(queue_id)[1]
                    except Exception as e:
                        loaded = e
                    claimed.append((queue_id, loaded))
        return claimed, next_due

    def _due_time(self, queue_id: str) -> Optional[float]:
        from mailserver.queue.spool import EnvelopeError, NotQueued

        try:
            _state, env = self.spool.load(queue_id)
        except (NotQueued, FileNotFoundError):
            return None  # another process took it, or it was deleted
        except EnvelopeError as e:
            self._quarantine(queue_id, e)
            return None
        except OSError as e:
            log.warn("{id}: cannot read the envelope now: {error}", id=queue_id, error=e)
            return None
        return env.next_attempt

    def _claim(self, queue_id: str) -> bool:
        from mailserver.queue.spool import AlreadyClaimed

        try:
            self.spool.move(queue_id, "active")
        except (AlreadyClaimed, FileNotFoundError):
            return False
        except OSError as e:
            # The rename may have happened and the directory fsync failed:
            # then the message is ours, in active/, and must be processed.
            log.warn("{id}: claiming: {error}", id=queue_id, error=e)
            return os.path.exists(self.spool.envelope_path("active", queue_id))
        return True

    def _finished(self, _result, queue_id: str) -> None:
        self.active.pop(queue_id, None)
        if not self._stopping:
            self.wake()

    def _crashed(self, failure, queue_id: str):
        """Processing failed (a full disk, an I/O error, a bug): put the
        message back, held for a backoff that grows with each failure."""
        _until, failures = self._held.get(queue_id, (0.0, 0))
        failures += 1
        wait = self.schedule.backoff(failures)
        self._held[queue_id] = (self.clock.seconds() + wait, failures)
        log.failure("{id}: processing failed; next try in {wait:.0f} s", failure, id=queue_id,
                    wait=wait)

        def back():
            try:
                self.spool.move(queue_id, "deferred", from_states=("active",))
            except Exception:
                pass

        return self._io(back).addErrback(lambda _: None)

    def _quarantine(self, queue_id: str, error: BaseException) -> None:
        log.error("{id}: unreadable queue file moved to corrupt/: {error}", id=queue_id,
                  error=repr(error))
        try:
            self.spool.quarantine(queue_id, repr(error))
        except Exception:
            log.failure("{id}: could not quarantine", id=queue_id)

    # -- one message -----------------------------------------------------
    async def _process(self, queue_id: str, loaded) -> None:
        """Deliver one claimed message; ``loaded`` is its envelope, or the
        exception raised loading it."""
        from mailserver.queue.spool import EnvelopeError, NotQueued

        try:
            if isinstance(loaded, BaseException):
                raise loaded
            env = loaded
        except NotQueued:
            self._forget(queue_id)
            return  # deleted between the claim and now
        except EnvelopeError as e:
            self._forget(queue_id)
            await self._io(self._quarantine, queue_id, e)
            return
        for r in env.pending():  # delivered in a round whose outcome was not saved
            if r.address in self._unsaved.get(queue_id, {}):
                r.record(*self._unsaved[queue_id][r.address])
        failed, delivered_here = [], []
        if env.pending():
            message = env.outbound(self.spool.content_path(queue_id))
            results = await self._deliver_all(message)
            failed, delivered_here = self._record(env, results, self.clock.seconds())
        try:
            wake = await self._io(self._conclude, queue_id, env, failed, delivered_here,
                                  self.clock.seconds())
        except Exception:
            self._unsaved[queue_id] = {r.address: (r.last_reply, r.remote, r.last_attempt)
                                       for r in env.recipients if r.state == "delivered"}
            raise
        self._forget(queue_id)
        if wake:
            self.wake()

    def _forget(self, queue_id: str) -> None:
        self._held.pop(queue_id, None)
        self._unsaved.pop(queue_id, None)

    def _conclude(self, queue_id: str, env, failed: list, delivered_here: list,
                  now: float) -> bool:
        """After an attempt: notices, then delete, or save and defer.  Runs in
        a worker thread (it writes and fsyncs); True when it queued a notice."""
        wake = False
        still = env.pending()
        if still and now - env.arrival >= self.schedule.lifetime:
            for r in still:
                r.expire()
                log.info("{id}: to=<{to}>, status=expired (last: {reply})", id=env.id,
                         to=r.address, reply=str(r.last_reply or "never tried"))
            failed += still
            still = []
        if failed:
            wake |= self._bounce(queue_id, env, failed, "failure", now)
            if env.sender == "":
                wake |= self._notify_postmaster(queue_id, env, failed, now)
        if delivered_here:  # NOTIFY=SUCCESS: we are the final hop for local mailboxes
            wake |= self._bounce(queue_id, env, delivered_here, "success", now)
        if still and self.schedule.delay_warning and \
                now - env.arrival >= self.schedule.delay_warning:
            late = [r for r in still if not r.delay_notified]
            if late:
                wake |= self._bounce(queue_id, env, late, "delay", now)
                for r in late:
                    r.delay_notified = True
        if not still:
            log.info("{id}: removed", id=queue_id)
            self.spool.delete(queue_id)
            return wake
        env.attempts += 1
        env.next_attempt = now + self.schedule.backoff(env.attempts)
        env.last_error = str(still[0].last_reply or "")
        self.spool.save(queue_id, env)
        self.spool.move(queue_id, "deferred")
        return wake

    async def _deliver_all(self, message: OutboundMessage) -> Dict[str, tuple]:
        """``{rcpt: (Reply, remote, forwards queued)}`` for every recipient of
        ``message``."""
        try:
            groups = await self.router.group(message)
        except Exception as e:
            reply = to_reply(e, message.queue_id)
            if not is_known(e):
                log.failure("{id}: routing failed", id=message.queue_id)
            return {r.address: (reply, "", False) for r in message.recipients}
        # The per-destination limit counts next hops: every domain behind one
        # smarthost shares its slots, each MX domain has its own.
        attempts = [self._deliver_group(target, (id(target), nexthop.lower()), sub)
                    for target, nexthop, sub in groups]
        results: Dict[str, tuple] = {}
        for part in await defer.gatherResults([defer.ensureDeferred(a) for a in attempts]):
            results.update(part)
        return results

    async def _deliver_group(self, target, key, message: OutboundMessage) -> Dict[str, tuple]:
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = defer.DeferredSemaphore(
                self.schedule.destination_concurrency)
        await sem.acquire()
        try:
            report: DeliveryReport = await defer.maybeDeferred(target.deliver, message)
        except Exception as e:
            if not is_known(e):
                log.failure("{id}: delivery to {key} failed", id=message.queue_id, key=key)
            reply = to_reply(e, message.queue_id)
            if reply.is_permanent and not is_known(e):
                reply = R.INTERNAL_ERROR
            return {r.address: (reply, "", False) for r in message.recipients}
        finally:
            sem.release()
            if sem.tokens == sem.limit and not sem.waiting:
                # Idle: keep entries for busy destinations only.
                if self._semaphores.get(key) is sem:
                    del self._semaphores[key]
        out = {}
        for r in message.recipients:
            reply = report.replies.get(r.address) or R.INTERNAL_ERROR
            out[r.address] = (reply, report.remotes.get(r.address, report.remote),
                              r.address in report.forwarded)
        self._count(target, message, out)
        return out

    def _count(self, target, message: OutboundMessage, results: Dict[str, tuple]) -> None:
        """Deliveries by target (local, lmtp, remote) and result, and the
        delay since arrival of those sent."""
        if not self.metrics.enabled:
            return
        now = self.clock.seconds()
        latency = None if message.arrival is None else now - message.arrival
        for reply, remote, _forwarded in results.values():
            kind = ("local" if remote == "local" else
                    "lmtp" if getattr(target, "lmtp", False) else "remote")
            self.metrics.delivery(kind, reply, latency)

    def _record(self, env, results: Dict[str, tuple], now: float) -> tuple:
        """Apply results to the envelope; return the recipients that failed now
        and those delivered now into local mailboxes."""
        failed, delivered_here = [], []
        for r in env.pending():
            if r.address not in results:
                continue
            reply, remote, forwarded = results[r.address]
            if forwarded:
                r.mailbox_only = True  # its forwards are queued: a retry must not repeat them
            r.record(reply, remote, now)
            status = {"delivered": "sent", "bounced": "bounced"}.get(r.state, "deferred")
            log.info("{id}: to=<{to}>, relay={relay}, status={status} ({reply})",
                     id=env.id, to=r.address, relay=remote or "none", status=status,
                     reply=str(reply))
            if r.state == "bounced":
                failed.append(r)
            elif r.state == "delivered" and remote == "local":
                delivered_here.append(r)
        return failed, delivered_here

    def _bounce(self, queue_id: str, env, recipients: List, kind: str, now: float) -> bool:
        """Queue a DSN about ``recipients`` when their NOTIFY wants one; never
        for a bounce.  Committed before the caller updates the original."""
        b = self.bounces
        wanted = [r for r in recipients
                  if b.should_notify(env, r, kind, delay_default=bool(self.schedule.delay_warning))]
        if not wanted:
            return False
        dsn = b.make_dsn(env, wanted, reporting_mta=self.hostname, kind=kind,
                         original_path=self.spool.content_path(queue_id), now=now,
                         will_retry_until=env.arrival + self.schedule.lifetime)
        with self.spool.begin() as writer:
            writer.write(dsn)
            new_id = writer.commit(b.bounce_envelope(env, writer.queue_id, now, dsn,
                                                     reporting_mta=self.hostname))
        log.info("{id}: sender {kind} notification: {dsn}", id=queue_id, kind=kind, dsn=new_id)
        return True

    def _notify_postmaster(self, queue_id: str, env, failed: List, now: float) -> bool:
        """A bounce failed for good: queue a notice to the postmaster (never
        about a notice: that one is dropped, logged).  Committed before the
        caller removes the bounce."""
        b = self.bounces
        path = self.spool.content_path(queue_id)
        what = "; ".join(f"<{r.address}>: {r.last_reply or 'never tried'}" for r in failed)
        if b.is_postmaster_notice(env, path):
            log.error("{id}: postmaster notice undeliverable ({what}); dropped", id=queue_id,
                      what=what)
            return False
        if not self.postmaster:
            log.warn("{id}: undeliverable bounce dropped ({what})", id=queue_id, what=what)
            return False
        notice = b.make_postmaster_notice(env, failed, reporting_mta=self.hostname,
                                          postmaster=self.postmaster, original_path=path,
                                          now=now)
        with self.spool.begin() as writer:
            writer.write(notice)
            new_id = writer.commit(b.notice_envelope(writer.queue_id, now, notice,
                                                     postmaster=self.postmaster,
                                                     reporting_mta=self.hostname))
        log.warn("{id}: undeliverable bounce ({what}); notice to <{pm}>: {notice}", id=queue_id,
                 what=what, pm=self.postmaster, notice=new_id)
        return True
