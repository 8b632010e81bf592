# -*- test-case-name: tests.unit.test_service -*-
"""Listener kinds: what a ``[[listeners]]`` table's ``protocol`` builds.

One table, :data:`KINDS`, says for each kind which protocol mode its core
speaks, whether it offers AUTH, and which checks its acceptance pipeline
runs; :func:`build_listener` turns a listener's config into the Twisted
factory for it (wrapped in TLS from the first byte for ``tls = "implicit"``).
POP3 joins this table in its own issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mailserver.pipeline.acceptance import Acceptance
from mailserver.pipeline.submission import RateLimit, SenderOwnership, SubmissionHeaders
from mailserver.policy import RecipientPolicy
from mailserver.protocols.limits import ConnectionLimiter
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


def _sender_checks(parts: Parts) -> list:
    s = parts.config.submission
    return [SenderOwnership(check_from=s.check_from_header, send_as_anyone=s.send_as_anyone),
            RateLimit(parts.rate_limiter)]


def _smtp_checks(parts: Parts, lc) -> list:
    return _sender_checks(parts) if lc.auth else []


def _submission_checks(parts: Parts, lc) -> list:
    return [*_sender_checks(parts),
            SubmissionHeaders(parts.config.server.hostname, parts.reactor)]


@dataclass(frozen=True)
class ListenerKind:
    mode: Mode
    checks: Callable[[Parts, Any], list]
    auth: Callable[[Any], bool]  # does a listener of this kind offer AUTH?


KINDS = {
    "smtp": ListenerKind(Mode.MX, _smtp_checks, lambda lc: lc.auth),
    "submission": ListenerKind(Mode.SUBMISSION, _submission_checks, lambda lc: True),
    "lmtp": ListenerKind(Mode.LMTP, lambda parts, lc: [], lambda lc: False),
}


def build_listener(parts: Parts, lc):
    """The protocol factory for listener ``lc``."""
    config = parts.config
    kind = KINDS[lc.protocol]
    auth = kind.auth(lc)
    s = config.smtp
    pipeline = Acceptance(
        kind=lc.protocol, hostname=config.server.hostname,
        recipients=RecipientPolicy(parts.directory, config.domains.local,
                                   lmtp=kind.mode is Mode.LMTP,
                                   catch_all=config.domains.catch_all, trusted=parts.trusted,
                                   srs=parts.srs),
        local=parts.local, delivery=parts.delivery, spool_dir=config.server.spool_dir,
        clock=parts.reactor, checks=kind.checks(parts, lc), outbox=parts.outbox,
        max_received=s.max_received_headers,
        hide_client=lc.protocol == "submission" and config.submission.hide_client_address,
        etrn=config.relay.etrn and kind.mode is Mode.MX,
        authenticator=parts.authenticator if auth else None)
    ctx = ListenerContext(
        mode=kind.mode, kind=lc.protocol, hostname=config.server.hostname,
        limits=Limits(max_command_line=s.command_line_limit, max_text_line=s.text_line_limit,
                      max_message_size=s.max_message_size, max_recipients=s.max_recipients,
                      max_errors=s.max_errors),
        pipeline=pipeline, clock=parts.reactor,
        limiter=ConnectionLimiter(config.server.max_connections,
                                  config.server.max_connections_per_client),
        name=lc.name,
        tls=parts.tls if lc.tls == "starttls" else None,
        implicit_tls=lc.tls == "implicit",
        auth_mechanisms=tuple(m.upper() for m in config.auth.mechanisms) if auth else (),
        auth_requires_tls=not lc.plaintext_auth,
        command_timeout=s.command_timeout, data_timeout=s.data_timeout,
        dsn=parts.outbox is not None)
    factory = SMTPFactory(ctx)
    if lc.tls == "implicit":
        from twisted.protocols.tls import TLSMemoryBIOFactory

        return TLSMemoryBIOFactory(parts.tls, False, factory)
    return factory
