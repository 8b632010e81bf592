# -*- test-case-name: tests.unit.test_service -*-
"""Listener kinds: what a ``[[listeners]]`` table's ``protocol`` builds.

One table, :data:`KINDS`, says for each kind how its factory is built and,
for the SMTP family, which mode its core speaks, whether it offers AUTH and
which checks its acceptance pipeline runs; :func:`build_listener` turns a
listener's config into the Twisted factory for it (wrapped in TLS from the
first byte for ``tls = "implicit"``: ports 465 and 995).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mailserver.pipeline.acceptance import Acceptance
from mailserver.pipeline.submission import RateLimit, SenderOwnership, SubmissionHeaders
from mailserver.policy import RecipientPolicy
from mailserver.protocols.limits import ConnectionLimiter, ConnectionRateLimiter
from mailserver.protocols.smtp import ListenerContext, SMTPFactory
from mailserver.sansio.smtp_server import Limits, Mode


@dataclass
class Parts:
    """What every listener shares, built once by the service."""

    config: Any
    reactor: Any
    directory: Any
    local: Any  # delivery.local.LocalDelivery
    delivery: Any  # delivery.recipients.RecipientDelivery
    outbox: Any
    srs: Any
    trusted: Any  # policy.Networks
    authenticator: Any  # pipeline.auth.Authenticator
    rate_limiter: Any  # throttle.RateLimiter
    tls: Any  # tls.ReloadableTLS or None
    store: Any = None  # store.maildir.MaildirStore (POP3 reads the maildirs it names)
    io: Any = None  # io(f, *args) -> Deferred on the I/O thread pool
    metrics: Any = None  # metrics.Metrics when [metrics] is on, else None
    signer: Any = None  # msgauth.dkim_sign.Signer when [dkim] sign is on
    inbound_auth: Any = None  # msgauth.inbound.InboundAuth when [checks] is on, else None
    channel: Any = None  # workers.channel.WorkerChannel in a worker: limits are shared


def _sender_checks(parts: Parts) -> list:
    s = parts.config.submission
    return [SenderOwnership(check_from=s.check_from_header, send_as_anyone=s.send_as_anyone),
            RateLimit(parts.rate_limiter)]


def _smtp_checks(parts: Parts, lc) -> list:
    checks = _sender_checks(parts) if lc.auth else []
    if parts.inbound_auth is not None:  # SPF, DKIM, ARC, DMARC: the MX only
        checks.append(parts.inbound_auth)
    return checks


def _submission_checks(parts: Parts, lc) -> list:
    checks = [*_sender_checks(parts),
              SubmissionHeaders(parts.config.server.hostname, parts.reactor)]
    if parts.signer is not None:  # last: it signs the header fields added before it
        from mailserver.msgauth.dkim_sign import DKIMSigning

        checks.append(DKIMSigning(parts.signer))
    return checks


@dataclass(frozen=True)
class ListenerKind:
    build: Callable[[Parts, Any, "ListenerKind"], Any]  # -> the protocol factory
    mode: Any = None  # the SMTP core's mode, for the SMTP family
    checks: Callable[[Parts, Any], list] = lambda parts, lc: []
    auth: Callable[[Any], bool] = lambda lc: False  # does a listener of this kind offer AUTH?


def _tls_wrapped(parts: Parts, lc, factory):
    """TLS from the first byte (465, 995) around ``factory``, or ``factory``;
    in a worker, the connection-limit gate inside it (see
    :mod:`mailserver.workers.gate`)."""
    if parts.channel is not None:
        from mailserver.workers.gate import GateFactory

        factory = GateFactory(factory, parts.channel, factory.ctx.limiter)
    if lc.tls == "implicit":
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(parts.tls, False, factory)
    return factory


def _smtp_family(parts: Parts, lc, kind: ListenerKind):
    """SMTP, submission and LMTP: the SMTP core and the acceptance pipeline."""
    config = parts.config
    auth = kind.auth(lc)
    s = config.smtp
    limiter, rate_limiter = _limits(parts, lc)
    pipeline = Acceptance(
        kind=lc.protocol, hostname=config.server.hostname,
        recipients=RecipientPolicy(parts.directory, config.domains.local,
                                   lmtp=kind.mode is Mode.LMTP,
                                   catch_all=config.domains.catch_all, trusted=parts.trusted,
                                   srs=parts.srs, relay_domains=config.domains.relay),
        local=parts.local, delivery=parts.delivery, spool_dir=config.server.spool_dir,
        clock=parts.reactor, checks=kind.checks(parts, lc), outbox=parts.outbox,
        max_received=s.max_received_headers,
        hide_client=lc.protocol == "submission" and config.submission.hide_client_address,
        etrn=config.relay.etrn and kind.mode is Mode.MX,
        authenticator=parts.authenticator if auth else None, max_line=s.text_line_limit,
        metrics=parts.metrics)
    ctx = ListenerContext(
        mode=kind.mode, kind=lc.protocol, hostname=config.server.hostname,
        limits=Limits(max_command_line=s.command_line_limit, max_text_line=s.text_line_limit,
                      max_message_size=s.max_message_size, max_recipients=s.max_recipients,
                      max_errors=s.max_errors, max_junk_commands=s.junk_command_limit),
        pipeline=pipeline, clock=parts.reactor, limiter=limiter, name=lc.name,
        tls=parts.tls if lc.tls == "starttls" else None,
        implicit_tls=lc.tls == "implicit",
        auth_mechanisms=tuple(m.upper() for m in config.auth.mechanisms) if auth else (),
        auth_requires_tls=not lc.plaintext_auth,
        command_timeout=s.command_timeout, data_timeout=s.data_timeout,
        min_data_rate=s.min_data_rate,
        rate_limiter=rate_limiter, dsn=parts.outbox is not None, metrics=parts.metrics,
        requiretls=s.requiretls and parts.outbox is not None)
    return _tls_wrapped(parts, lc, SMTPFactory(ctx))


def _pop3(parts: Parts, lc, kind: ListenerKind):
    """POP3 and POP3S: the POP3 core over the maildir store."""
    from mailserver.protocols.pop3 import POP3Context, POP3Factory
    from mailserver.store.maildrop import Maildrop

    config = parts.config
    limiter, rate_limiter = _limits(parts, lc)
    ctx = POP3Context(
        name=lc.name, hostname=config.server.hostname, clock=parts.reactor,
        limiter=limiter, authenticator=parts.authenticator, store=parts.store,
        io=parts.io, open_maildrop=Maildrop.open,
        tls=parts.tls if lc.tls == "starttls" else None, implicit_tls=lc.tls == "implicit",
        plaintext_auth=lc.plaintext_auth,
        mechanisms=tuple(m.upper() for m in config.auth.mechanisms),
        idle_timeout=config.pop3.idle_timeout, junk_limit=config.pop3.junk_command_limit,
        metrics=parts.metrics, rate_limiter=rate_limiter)
    return _tls_wrapped(parts, lc, POP3Factory(ctx))


def connection_limits(config, lc, trusted) -> tuple:
    """Listener ``lc``'s own ``(ConnectionLimiter, ConnectionRateLimiter)``:
    in one process its adapters' (through :func:`_limits`), with workers the
    supervisor's (:mod:`mailserver.workers.channel`)."""
    rate = (config.pop3 if lc.protocol == "pop3" else config.smtp).connection_rate_limit
    return (ConnectionLimiter(config.server.max_connections,
                              config.server.max_connections_per_client),
            ConnectionRateLimiter(rate, exempt=trusted))


def _limits(parts: Parts, lc) -> tuple:
    """The ``limiter`` and ``rate_limiter`` for a listener's context."""
    if parts.channel is not None:
        from mailserver.workers.gate import SharedLimits

        shared = SharedLimits(parts.channel, lc.name)
        return shared, shared
    return connection_limits(parts.config, lc, parts.trusted)


KINDS = {
    "smtp": ListenerKind(_smtp_family, Mode.MX, _smtp_checks, lambda lc: lc.auth),
    "submission": ListenerKind(_smtp_family, Mode.SUBMISSION, _submission_checks,
                               lambda lc: True),
    "lmtp": ListenerKind(_smtp_family, Mode.LMTP),
    "pop3": ListenerKind(_pop3, auth=lambda lc: True),
}


def build_listener(parts: Parts, lc):
    """The protocol factory for listener ``lc``."""
    kind = KINDS[lc.protocol]
    return kind.build(parts, lc, kind)
