# -*- test-case-name: tests.unit.test_metrics -*-
"""What the server counts, for Prometheus.

Every metric is defined here, on a :class:`Metrics` object that owns its own
``prometheus_client.CollectorRegistry`` (never the library's global one, so
two servers in one test process never share counts).  The parts that count
(the acceptance pipeline, the protocol adapters through their contexts, the
login check, the queue manager, the directory cache) receive the object and
call its methods; with metrics off they receive :data:`NO_METRICS`, whose
methods do nothing, so nothing else changes behaviour.

Labels stay few and bounded: a listener's configured name, a reply class
(``2xx``/``4xx``/``5xx``), a delivery target (``local``/``remote``/``lmtp``)
and a result.  Addresses, logins and client IPs are never labels.

:class:`MetricsResource` renders the registry in the Prometheus text format
for twisted.web; :func:`build_metrics_site` is the site the service listens
with (``[metrics] address``).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from twisted.web import resource, server

#: Seconds: directory answers are fast (cached, local LDAP) or timing out.
LOOKUP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds from arrival to delivery: at once, after a retry, after hours.
DELIVERY_BUCKETS = (0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0,
                    86400.0, 5 * 86400.0)
QUEUE_STATES = ("incoming", "active", "deferred", "hold", "corrupt")


def reply_class(reply) -> str:
    """``2xx``, ``4xx`` or ``5xx`` for a reply (anything odd is ``5xx``)."""
    code = getattr(reply, "code", 500)
    return f"{code // 100}xx" if code // 100 in (2, 4, 5) else "5xx"


def delivery_result(reply) -> str:
    """``sent``, ``deferred`` or ``bounced``, as the queue's log says."""
    if reply.is_positive:
        return "sent"
    return "bounced" if reply.code // 100 == 5 else "deferred"


class QueueDepthCollector:
    """Counts the envelope files in each queue state directory when scraped.

    One directory listing per state, no file opened: cheap enough for a
    scrape every few seconds on a queue of thousands."""

    def __init__(self, queue_dir: str) -> None:
        self.queue_dir = queue_dir

    def counts(self) -> dict:
        out = {}
        for state in QUEUE_STATES:
            try:
                with os.scandir(os.path.join(self.queue_dir, state)) as it:
                    out[state] = sum(1 for e in it if not e.name.startswith("."))
            except OSError:
                out[state] = 0
        return out

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("mailserver_queue_messages",
                                   "Messages in the outbound queue, by state.", labels=["state"])
        for state, n in self.counts().items():
            family.add_metric([state], n)
        yield family

    def describe(self) -> Iterable:
        return self.collect()


class NullMetrics:
    """Metrics switched off: every call does nothing."""

    enabled = False
    registry = None

    def message(self, listener: str, result: str) -> None:
        pass

    def recipient(self, listener: str, reply) -> None:
        pass

    def delivery(self, target: str, reply, latency: Optional[float] = None) -> None:
        pass

    def connection_opened(self, listener: str) -> None:
        pass

    def connection_closed(self, listener: str) -> None:
        pass

    def connection_refused(self, listener: str) -> None:
        pass

    def auth_failed(self, listener: str) -> None:
        pass

    def login_blocked(self, listener: str) -> None:
        pass

    def rate_limited(self, listener: str) -> None:
        pass

    def directory_lookup(self, kind: str, seconds: float, error: bool) -> None:
        pass


NO_METRICS = NullMetrics()


class Metrics(NullMetrics):
    """The server's metrics, on ``registry`` (a new one when None)."""

    enabled = True

    def __init__(self, registry=None, queue_dir: Optional[str] = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.messages = Counter(
            "mailserver_messages_received", "Messages at the end of the data, by listener and "
            "result (accepted: a 250 for at least one recipient; refused).",
            ["listener", "result"], registry=r)
        self.recipients = Counter(
            "mailserver_recipients", "RCPT commands answered, by listener and reply class.",
            ["listener", "reply"], registry=r)
        self.deliveries = Counter(
            "mailserver_deliveries", "Delivery attempts per recipient, by target "
            "(local, remote, lmtp) and result (sent, deferred, bounced).",
            ["target", "result"], registry=r)
        self.delivery_seconds = Histogram(
            "mailserver_delivery_delay_seconds", "Seconds from a message's arrival to its "
            "delivery to a recipient.", ["target"], buckets=DELIVERY_BUCKETS, registry=r)
        self.connections_open = Gauge(
            "mailserver_connections_open", "Client connections open now, by listener.",
            ["listener"], registry=r)
        self.connections = Counter(
            "mailserver_connections", "Client connections accepted, by listener.",
            ["listener"], registry=r)
        self.connections_refused = Counter(
            "mailserver_connections_refused", "Client connections refused by the connection "
            "limits, by listener.", ["listener"], registry=r)
        self.auth_failures = Counter(
            "mailserver_auth_failures", "Failed logins (wrong login or password), by listener.",
            ["listener"], registry=r)
        self.login_blocks = Counter(
            "mailserver_login_blocks", "Logins refused by the failed-login throttle, by "
            "listener.", ["listener"], registry=r)
        self.rate_limit_hits = Counter(
            "mailserver_rate_limit_hits", "MAIL or RCPT refused by a submission rate limit, "
            "by listener.", ["listener"], registry=r)
        self.directory_lookups = Counter(
            "mailserver_directory_lookups", "Requests to the directory backend (cache misses "
            "and logins), by kind and result (ok, error).", ["kind", "result"], registry=r)
        self.directory_seconds = Histogram(
            "mailserver_directory_lookup_seconds", "Seconds the directory backend took to "
            "answer, by kind.", ["kind"], buckets=LOOKUP_BUCKETS, registry=r)
        if queue_dir:
            r.register(QueueDepthCollector(queue_dir))
        # What render() shows: the registry, or under a supervisor the
        # registry plus the workers' counts (mailserver.workers.metrics).
        self.exposed = r

    def message(self, listener: str, result: str) -> None:
        self.messages.labels(listener, result).inc()

    def recipient(self, listener: str, reply) -> None:
        self.recipients.labels(listener, reply_class(reply)).inc()

    def delivery(self, target: str, reply, latency: Optional[float] = None) -> None:
        result = delivery_result(reply)
        self.deliveries.labels(target, result).inc()
        if result == "sent" and latency is not None:
            self.delivery_seconds.labels(target).observe(max(latency, 0.0))

    def connection_opened(self, listener: str) -> None:
        self.connections.labels(listener).inc()
        self.connections_open.labels(listener).inc()

    def connection_closed(self, listener: str) -> None:
        self.connections_open.labels(listener).dec()

    def connection_refused(self, listener: str) -> None:
        self.connections_refused.labels(listener).inc()

    def auth_failed(self, listener: str) -> None:
        self.auth_failures.labels(listener).inc()

    def login_blocked(self, listener: str) -> None:
        self.login_blocks.labels(listener).inc()

    def rate_limited(self, listener: str) -> None:
        self.rate_limit_hits.labels(listener).inc()

    def directory_lookup(self, kind: str, seconds: float, error: bool) -> None:
        self.directory_lookups.labels(kind, "error" if error else "ok").inc()
        self.directory_seconds.labels(kind).observe(max(seconds, 0.0))

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.exposed)


class MetricsResource(resource.Resource):
    """``GET /metrics``: the registry, rendered on the reactor thread (a few
    hundred lines of text; the queue collector lists five directories)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        from prometheus_client import CONTENT_TYPE_LATEST

        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


class _QuietSite(server.Site):
    """No access log line per scrape in the mail log."""

    noisy = False

    def log(self, request) -> None:
        pass


def build_metrics_site(metrics: Metrics) -> server.Site:
    """The HTTP site: ``/metrics`` (and ``/`` for convenience)."""
    root = resource.Resource()
    page = MetricsResource(metrics)
    root.putChild(b"metrics", page)
    root.putChild(b"", page)
    return _QuietSite(root)


__all__ = ["Metrics", "NullMetrics", "NO_METRICS", "MetricsResource", "QueueDepthCollector",
           "build_metrics_site", "reply_class", "delivery_result"]
