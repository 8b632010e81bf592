# -*- test-case-name: tests.unit.test_outbound -*-
"""The Twisted edge of outbound SMTP and LMTP delivery.

:func:`deliver_to_host` makes one connection, runs one message through the
sans-IO :class:`~mailserver.sansio.smtp_client.SMTPClientConnection` and
answers ``(report, retry_elsewhere)`` (a :class:`HostAttempt`).
:class:`~mailserver.protocols.outbound_pool.OutboundConnectionPool` does the
same but keeps the connection open for a short while, so the next message to
the same destination reuses it (RSET, then the next transaction; a failed
RSET opens a fresh connection).

:class:`OutboundProtocol` owns the transport: it feeds the core, writes its
commands, starts TLS when told, streams the content file through a pull
producer (one chunk each time the transport's buffer drains, so a large
message is never in memory and a slow server slows us down rather than
filling our buffers) and runs the timeouts on the injected reactor.

Endpoints: ``HostnameEndpoint`` for a host name, ``TCP4ClientEndpoint`` /
``TCP6ClientEndpoint`` for an IP literal, ``UNIXClientEndpoint`` when
``unix_path`` is given (LMTP over a UNIX socket).

TLS policy (``tls=``):

* ``none``: never STARTTLS.
* ``may``: STARTTLS when offered, certificate not checked.  If the handshake
  fails, the same host is tried once more without TLS, as Postfix (2.6 and
  later) does for opportunistic TLS: an attacker who can break the handshake
  can as well strip STARTTLS from the EHLO reply, so refusing the plaintext
  retry would buy no security and would lose mail to servers with broken TLS.
* ``encrypt``: TLS required (``451 4.7.4`` when not offered), not verified.
* ``verify``: TLS required and the certificate must match ``tls_hostname``
  (default: ``host``), checked by ``optionsForClientTLS`` with
  service_identity against ``trust_root``: a PEM file name (one or more CA
  certificates), a Twisted trust root or certificate, or ``None`` for the
  platform's CAs.  A failed handshake or check is ``451 4.7.5``.
* ``dane``: TLS required, and once the handshake is done the server's chain
  must satisfy one of ``tlsa`` (DANE TLSA records, checked by
  :func:`~mailserver.delivery.dane.check_chain` with ``tls_hostname``);
  otherwise the connection is dropped before EHLO is repeated, nothing of
  the message sent: ``451 4.7.5``, next MX.

Connection failures and timeouts give every recipient a temporary reply and
``retry_elsewhere=True``.  Timeouts (:class:`Timeouts`) default to RFC 5321
§4.5.3.2: greeting, MAIL and RCPT 5 minutes, DATA 2, each data block 3, the
final dot 10.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from twisted.internet import defer, error, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mailserver import reply as R
from mailserver.delivery.interfaces import DeliveryReport, OutboundMessage
from mailserver.sansio._client_commands import check_message, unsendable
from mailserver.sansio._client_policy import PHASE_WORDS, Destination, Timeouts, ip_version
from mailserver.sansio.smtp_client import (
    NEED_DATA,
    ClientResult,
    Closed,
    MessageDone,
    NeedTLS,
    Phase,
    SendContent,
    SMTPClientConnection,
)
from mailserver.reply import Reply

__all__ = [
    "deliver_to_host", "HostAttempt", "Destination", "Timeouts",
    "OutboundProtocol", "tls_options", "CHUNK_SIZE",
]

log = Logger(namespace="mailserver.outbound")

CHUNK_SIZE = 65536


class HostAttempt(NamedTuple):
    """What :func:`deliver_to_host` answers; unpacks as ``(report, retry_elsewhere)``."""

    report: DeliveryReport
    retry_elsewhere: bool


# --- TLS ---------------------------------------------------------------------
_CA_CACHE: Dict[Tuple[str, float], Any] = {}


def _trust_root(trust_root: Any) -> Any:
    """A Twisted trust root for ``trust_root`` (see the module docstring)."""
    if trust_root is None:
        return ssl.platformTrust()
    if not isinstance(trust_root, (str, os.PathLike)):
        return trust_root
    path = os.fspath(trust_root)
    key = (path, os.stat(path).st_mtime)
    if key not in _CA_CACHE:
        with open(path, "rb") as f:
            data = f.read()
        marker = b"-----BEGIN CERTIFICATE-----"
        certs = [ssl.Certificate.loadPEM(marker + part) for part in data.split(marker)[1:]]
        if not certs:
            raise ValueError(f"{path}: no PEM certificate")
        _CA_CACHE[key] = ssl.trustRootFromCertificates(certs)
    return _CA_CACHE[key]


def tls_options(dest: Destination) -> Any:
    """The client TLS options for ``dest``'s policy; ``None`` for "none"."""
    if dest.tls == "none":
        return None
    if dest.tls == "verify":
        name = dest.tls_hostname or str(dest.host).strip("[]")
        return ssl.optionsForClientTLS(name, trustRoot=_trust_root(dest.trust_root))
    return ssl.CertificateOptions(verify=False)  # "dane" checks after the handshake


def dane_check(dest: Destination):
    """For the "dane" policy: ``chain -> None or why it fails`` (see
    :func:`~mailserver.delivery.dane.check_chain`); else None."""
    if dest.tls != "dane":
        return None
    from mailserver.delivery.dane import check_chain

    name = dest.tls_hostname or str(dest.host).strip("[]")
    return lambda chain: check_chain(dest.tlsa, chain, name)


def sts_testing_check(dest: Destination):
    """Under an MTA-STS ``testing`` policy: ``chain -> None or why enforce
    would refuse it`` (:func:`~mailserver.delivery.mtasts.certificate_problem`,
    against ``trust_root``), only to be logged; else None."""
    if not dest.sts_testing or dest.tls not in ("may", "encrypt"):
        return None
    from mailserver.delivery.mtasts import certificate_problem

    name = dest.tls_hostname or str(dest.host).strip("[]")
    return lambda chain: certificate_problem(chain, name, dest.trust_root)


# --- the protocol ---------------------------------------------------------------
@implementer(IPullProducer)
class _ContentSender:
    """Streams the content file into the core, one chunk per resumeProducing."""

    def __init__(self, proto: "OutboundProtocol", path: str, chunk_size: int) -> None:
        self.proto = proto
        self.chunk_size = chunk_size
        self.file = open(path, "rb")

    def resumeProducing(self) -> None:
        proto = self.proto
        if self.file is None or proto.core.phase is not Phase.CONTENT:
            self.stopProducing()
            return
        try:
            chunk = self.file.read(self.chunk_size)
            last = False
            if len(chunk) < self.chunk_size:  # a short read: the end, unless...
                more = self.file.read(1)
                chunk, last = chunk + more, not more
        except OSError:
            log.failure("cannot read {path}", path=self.file.name)
            self.stopProducing()
            proto.core.abort(R.CONTENT_UNREADABLE, retry_elsewhere=False)
            proto.drive()
            return
        proto.core.send_content(chunk)
        if last:
            self.stopProducing()
            proto.transport.unregisterProducer()
            proto.sender = None
            proto.core.end_content()
        proto.drive()

    def stopProducing(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


@implementer(IHandshakeListener)
class OutboundProtocol(Protocol):
    """One outbound connection, driving an :class:`SMTPClientConnection`.

    :meth:`next_result` fires with each message's :class:`ClientResult`;
    :meth:`send_next` reuses the connection; :meth:`quit` ends it and fires
    once the connection is closed.
    """

    def __init__(self, core: SMTPClientConnection, clock, timeouts: Timeouts,
                 tls: Any, *, chunk_size: int = CHUNK_SIZE, tls_check=None,
                 tls_report=None) -> None:
        self.core = core
        self.tls_check = tls_check  # chain -> why to hang up, or None
        self.tls_report = tls_report  # chain -> what to log, or None
        self.clock = clock
        self.timeouts = timeouts
        self.tls = tls
        self.chunk_size = chunk_size
        self.timer = None
        self.sender: Optional[_ContentSender] = None
        self.tls_pending = False
        self.tls_failed = False
        self.connected = False
        self.closing = False
        self.lost = False
        self.messages = 0
        self.opened = time.monotonic()
        self._abort = False
        self._broken = False
        self._driving = False
        self._again = False
        self._results: List[ClientResult] = []
        self._result_waiters: List[defer.Deferred] = []
        self._close_waiters: List[defer.Deferred] = []

    # -- what the callers use --------------------------------------------
    @property
    def reusable(self) -> bool:
        return self.connected and not self.closing and self.core.phase is Phase.IDLE

    def next_result(self) -> defer.Deferred:
        """Fires with the result of the current message."""
        if self._results:
            return defer.succeed(self._results.pop(0))
        d: defer.Deferred = defer.Deferred()
        self._result_waiters.append(d)
        return d

    def send_next(self, message: OutboundMessage) -> defer.Deferred:
        """RSET and deliver ``message`` on this connection."""
        self.core.next_message(message)
        self.drive()
        return self.next_result()

    def when_closed(self) -> defer.Deferred:
        if self.lost:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._close_waiters.append(d)
        return d

    def quit(self) -> defer.Deferred:
        """QUIT (or just close, when not between messages); fires once closed."""
        if not self.lost and not self.closing:
            if self.core.phase is Phase.IDLE:
                self.core.quit()
                self.drive()
            else:
                self._close(abort=True)
        return self.when_closed()

    # -- Twisted callbacks ------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        self._arm_timer()

    def dataReceived(self, data: bytes) -> None:
        self.core.receive_data(data)
        self.drive()

    def handshakeCompleted(self) -> None:
        self.tls_pending = False
        why = self._check_peer(self.tls_check)
        if why is not None:
            log.warn("DANE: {remote}: {why}; not delivering there", remote=self.core.remote,
                     why=why)
            self.tls_failed = True
            self._abort = True
            self.core.abort(R.REMOTE_DANE_MISMATCH, retry_elsewhere=True)
        else:
            why = self._check_peer(self.tls_report)
            if why is not None:
                log.warn("{id}: MTA-STS (testing): {remote}: {why}; enforce mode would not "
                         "deliver there; delivering anyway", id=self.core.message.queue_id,
                         remote=self.core.remote, why=why)
            self.core.tls_started()
        self.drive()

    def _check_peer(self, check) -> Optional[str]:
        """None when the peer's certificate passes ``check`` (or there is none)."""
        if check is None:
            return None
        try:
            chain = self.transport.getHandle().get_peer_cert_chain(as_cryptography=True)
        except Exception as e:
            return f"cannot read the certificate chain ({type(e).__name__})"
        return check(list(chain or ()))

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        self.closing = True
        self._cancel_timer()
        if self.sender is not None:
            self.sender.stopProducing()
        if self.tls_pending:
            self.tls_failed = True
            self.core.abort(R.REMOTE_TLS_FAILED, retry_elsewhere=True)
        else:
            self.core.connection_lost()
        self.drive()
        waiters, self._close_waiters = self._close_waiters, []
        for d in waiters:
            d.callback(None)

    # -- the event loop ----------------------------------------------------
    def drive(self) -> None:
        """Handle every pending event of the core, then write its output."""
        if self._driving:
            self._again = True
            return
        self._driving = True
        done: List[ClientResult] = []
        start_sender = None
        if self._broken:
            return
        try:
            self._again = True
            while self._again:
                self._again = False
                while (event := self.core.next_event()) is not NEED_DATA:
                    if isinstance(event, MessageDone):
                        self.messages += 1
                        done.append(event.result)
                    elif isinstance(event, SendContent):
                        start_sender = self._content_sender() or start_sender
                    elif isinstance(event, NeedTLS):
                        self._flush()
                        self.tls_pending = True
                        self.transport.startTLS(self.tls)
                    elif isinstance(event, Closed):
                        self._close(abort=self._abort)
                self._flush()
        except Exception:
            log.failure("internal error talking to {remote}", remote=self.core.remote)
            self._break()
            return
        finally:
            self._driving = False
        self._arm_timer()
        if start_sender is not None and not self.closing:
            self.sender = start_sender
            self.transport.registerProducer(start_sender, False)
        for result in done:
            self._deliver_result(result)

    def _break(self) -> None:
        """A bug in the client: answer whoever waits with 451 4.3.0 and hang up."""
        self._broken = True
        message = self.core.message
        text = f"{R.INTERNAL_ERROR.text} ({message.queue_id})"
        reply = R.INTERNAL_ERROR.with_text(text)
        result = ClientResult(replies={r.address: reply for r in message.recipients},
                              connection_error=reply)
        waiters, self._result_waiters = self._result_waiters, []
        for d in waiters:
            d.callback(result)
        if not self._results and not waiters:
            self._results.append(result)
        self.closing = True
        self._cancel_timer()
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()

    def _content_sender(self) -> Optional[_ContentSender]:
        try:
            return _ContentSender(self, self.core.message.content_path, self.chunk_size)
        except OSError as e:
            log.error("{id}: cannot open {path}: {e}", id=self.core.message.queue_id,
                      path=self.core.message.content_path, e=e)
            self.core.abort(R.CONTENT_UNREADABLE, retry_elsewhere=False)
            return None

    def _deliver_result(self, result: ClientResult) -> None:
        if self._result_waiters:
            self._result_waiters.pop(0).callback(result)
        else:
            self._results.append(result)

    def _flush(self) -> None:
        out = self.core.data_to_send()
        if out and not self.lost:
            self.transport.write(out)

    def _close(self, *, abort: bool) -> None:
        if self.closing:
            return
        self.closing = True
        self._flush()
        if self.sender is not None:
            self.sender.stopProducing()
            self.transport.unregisterProducer()
            self.sender = None
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    # -- timeouts ----------------------------------------------------------
    def _arm_timer(self) -> None:
        self._cancel_timer()
        if self.lost:
            return
        phase = Phase.CLOSED if self.closing else self.core.phase
        seconds = self.timeouts.for_phase(phase)
        if seconds:
            self.timer = self.clock.callLater(seconds, self._timed_out, phase)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _timed_out(self, phase: Phase) -> None:
        self.timer = None
        words = PHASE_WORDS.get(phase)
        if words is None or self.closing:
            self.closing = True
            self.transport.abortConnection()
            return
        log.info("timeout waiting for {what} from {remote}", what=words, remote=self.core.remote)
        reply = R.REMOTE_TIMEOUT.with_text(f"Timed out waiting for {words} from {self.core.remote}")
        self._abort = True
        self.core.abort(reply)
        self.drive()


class _OneConnection(Factory):
    """Builds the protocol for one connection, naming the peer for replies."""

    def __init__(self, dest: Destination, message: OutboundMessage, clock,
                 timeouts: Timeouts, tls: Any) -> None:
        self.dest, self.message, self.clock = dest, message, clock
        self.timeouts, self.tls = timeouts, tls

    def buildProtocol(self, addr) -> OutboundProtocol:
        dest, tls = self.dest, self.tls
        core = SMTPClientConnection(
            dest.helo, lmtp=dest.lmtp, tls_available=tls is not None,
            require_tls=dest.tls in ("encrypt", "verify", "dane"), auth=dest.auth,
            message=self.message, allow_plaintext_auth=dest.allow_plaintext_auth,
            remote=dest.describe(getattr(addr, "host", None)),
        )
        proto = OutboundProtocol(core, self.clock, self.timeouts, tls,
                                 tls_check=dane_check(dest),
                                 tls_report=sts_testing_check(dest))
        proto.factory = self
        return proto


def _endpoint(reactor, dest: Destination, timeouts: Timeouts):
    if dest.unix_path:
        return UNIXClientEndpoint(reactor, dest.unix_path, timeout=timeouts.connect)
    host = str(dest.host).strip("[]")
    port = dest.port or 25
    version = ip_version(host)
    if version == 4:
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeouts.connect)
    if version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeouts.connect)
    return HostnameEndpoint(reactor, host, port, timeout=timeouts.connect)


def _connect_failure(dest: Destination, failure: Exception) -> Reply:
    remote = dest.describe()
    if isinstance(failure, (error.DNSLookupError, error.UnknownHostError)):
        words = "Host not found:"
    elif isinstance(failure, (error.TimeoutError, defer.TimeoutError, defer.CancelledError,
                              error.ConnectingCancelledError)):
        words = "Timed out connecting to"
    else:
        words = "Cannot connect to"
    return R.CONNECT_FAILED.with_text(f"{words} {remote}")


def _everyone(message: OutboundMessage, reply: Reply, remote: str) -> DeliveryReport:
    return DeliveryReport(replies={r.address: reply for r in message.recipients}, remote=remote)


def unsendable_attempt(message: OutboundMessage) -> Optional[HostAttempt]:
    """The final answer, without connecting, when no address of ``message``
    can be sent (see :func:`~mailserver.sansio._client_commands.unsendable`);
    ``None`` when there is something to send.  A message without recipients
    raises ValueError."""
    check_message(message)
    refused = unsendable(message)
    if any(r.address not in refused for r in message.recipients):
        return None
    log.info("{id}: no address can be sent over SMTP ({reply})", id=message.queue_id,
             reply=str(next(iter(refused.values()))))
    return HostAttempt(DeliveryReport(replies=refused), False)


async def _open(reactor, dest: Destination, message: OutboundMessage, timeouts: Timeouts,
                plaintext: bool = False):
    """Connect and start ``message``; a :class:`HostAttempt` when that fails.

    A TLS policy that cannot be set up (an unreadable CA file) raises: that
    is not the remote's fault.
    """
    tls = None if plaintext else tls_options(dest)
    factory = _OneConnection(dest, message, reactor, timeouts, tls)
    d = _endpoint(reactor, dest, timeouts).connect(factory)
    d.addTimeout(timeouts.connect, reactor)
    try:
        return await d
    except Exception as e:
        reply = _connect_failure(dest, e)
        log.info("{id}: {why} ({e})", id=message.queue_id, why=reply.text, e=e)
        return HostAttempt(_everyone(message, reply, dest.describe()), True)


def remote_name(dest: Destination, proto: OutboundProtocol) -> str:
    peer = getattr(proto.transport.getPeer(), "host", None) if proto.transport else None
    return dest.describe(peer)


async def attempt_host(reactor, dest: Destination, message: OutboundMessage, timeouts: Timeouts):
    """Open a connection and send ``message``: ``(protocol or None, HostAttempt)``.

    Under the "may" policy a failed handshake is retried once in plaintext.
    When no address can be sent (:func:`unsendable_attempt`), no connection is
    made; otherwise the client refuses the unsendable recipients itself.
    """
    refused = unsendable_attempt(message)
    if refused is not None:
        return None, refused
    for plaintext in (False, True):
        proto = await _open(reactor, dest, message, timeouts, plaintext)
        if isinstance(proto, HostAttempt):
            return None, proto
        result: ClientResult = await proto.next_result()
        if proto.tls_failed and dest.tls == "may" and not plaintext:
            log.info("{id}: TLS handshake with {remote} failed; trying again without TLS",
                     id=message.queue_id, remote=proto.core.remote)
            await proto.when_closed()
            continue
        break
    report = DeliveryReport(replies=dict(result.replies), remote=remote_name(dest, proto),
                            details=dict(result.details))
    return proto, HostAttempt(report, result.retry_elsewhere)


async def deliver_to_host(reactor, host: Optional[str], port: Optional[int],
                          message: OutboundMessage, *, helo: str, tls: str = "may",
                          tls_hostname: Optional[str] = None, trust_root: Any = None,
                          auth: Optional[Tuple[str, str]] = None, lmtp: bool = False,
                          unix_path: Optional[str] = None, timeouts: Timeouts = Timeouts(),
                          allow_plaintext_auth: bool = False, tlsa: tuple = (),
                          sts_testing: bool = False) -> HostAttempt:
    """Deliver ``message`` to one host (or UNIX socket) and QUIT.

    Never raises for a delivery problem: connection failures, timeouts and
    refusals all become replies in the report.  ``reactor`` provides the
    connections and the clock.
    """
    dest = Destination(host, port, helo, tls, tls_hostname, trust_root, auth, lmtp,
                       unix_path, allow_plaintext_auth, tlsa, sts_testing)
    proto, attempt = await attempt_host(reactor, dest, message, timeouts)
    if proto is not None:
        await proto.quit()
    return attempt
