"""The metrics module: counting, the queue collector, the endpoint and its config."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from mailserver import reply as R
from mailserver.config import load_config
from mailserver.errors import ConfigError
from mailserver.metrics import NO_METRICS, Metrics, MetricsResource, reply_class

MINIMAL = """
[domains]
local = ["example.test"]
[directory]
ldif_file = "users.ldif"
[[listeners]]
address = "127.0.0.1:2525"
"""


def samples(metrics: Metrics) -> dict:
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_each_metrics_object_has_its_own_registry():
    """Two Metrics objects never share counts (no global registry)."""
    a, b = Metrics(), Metrics()
    a.message("smtp", "accepted")
    assert samples(a)[("mailserver_messages_received_total",
                       (("listener", "smtp"), ("result", "accepted")))] == 1
    assert not any(k[0] == "mailserver_messages_received_total" for k in samples(b))


def test_an_injected_registry_is_used():
    """A registry passed in receives the metrics."""
    registry = CollectorRegistry()
    Metrics(registry).auth_failed("submission")
    assert registry.get_sample_value("mailserver_auth_failures_total",
                                     {"listener": "submission"}) == 1


def test_deliveries_by_result_and_delay_only_when_sent():
    """A 250 is sent (its delay observed), a 4xx deferred and a 5xx bounced."""
    m = Metrics()
    m.delivery("remote", R.Reply(250, (2, 0, 0), "ok"), 3.0)
    m.delivery("remote", R.Reply(451, (4, 4, 1), "later"), 3.0)
    m.delivery("lmtp", R.Reply(550, (5, 1, 1), "no"), 3.0)
    s = samples(m)
    assert s[("mailserver_deliveries_total", (("result", "sent"), ("target", "remote")))] == 1
    assert s[("mailserver_deliveries_total", (("result", "deferred"), ("target", "remote")))] == 1
    assert s[("mailserver_deliveries_total", (("result", "bounced"), ("target", "lmtp")))] == 1
    assert s[("mailserver_delivery_delay_seconds_count", (("target", "remote"),))] == 1


def test_connections_gauge_goes_up_and_down():
    """The open-connections gauge follows opens and closes; the total only grows."""
    m = Metrics()
    m.connection_opened("pop3")
    m.connection_opened("pop3")
    m.connection_closed("pop3")
    s = samples(m)
    assert s[("mailserver_connections_open", (("listener", "pop3"),))] == 1
    assert s[("mailserver_connections_total", (("listener", "pop3"),))] == 2


def test_reply_classes():
    """Replies are labelled by their class only."""
    assert reply_class(R.Reply(250, (2, 1, 5), "ok")) == "2xx"
    assert reply_class(R.Reply(451, (4, 4, 3), "x")) == "4xx"
    assert reply_class(R.Reply(550, (5, 1, 1), "x")) == "5xx"


def test_no_metrics_does_nothing():
    """With metrics off every call is accepted and nothing is kept."""
    NO_METRICS.message("smtp", "accepted")
    NO_METRICS.directory_lookup("resolve", 0.1, True)
    assert not NO_METRICS.enabled and NO_METRICS.registry is None


def test_queue_depth_is_counted_at_scrape(tmp_path):
    """The queue gauge lists each state directory when rendered."""
    for state in ("incoming", "deferred"):
        (tmp_path / state).mkdir()
    (tmp_path / "deferred" / "A1").write_text("{}")
    (tmp_path / "deferred" / "A2").write_text("{}")
    m = Metrics(queue_dir=str(tmp_path))
    s = samples(m)
    assert s[("mailserver_queue_messages", (("state", "deferred"),))] == 2
    assert s[("mailserver_queue_messages", (("state", "hold"),))] == 0


def test_resource_renders_the_text_format():
    """GET on the resource answers the registry with Prometheus's content type."""
    class Request:
        headers: dict = {}

        def setHeader(self, name, value):
            self.headers[name.lower()] = value

    m = Metrics()
    m.rate_limited("submission")
    request = Request()
    body = MetricsResource(m).render_GET(request)
    assert b"mailserver_rate_limit_hits_total" in body
    assert request.headers[b"content-type"].startswith(b"text/plain")


@pytest.mark.parametrize("table, problem", [
    ('address = "0.0.0.0:9154"', "not a loopback address"),
    ('address = ":9154"', "not a loopback address"),
    ('address = "unix:/run/m.sock"', "not a UNIX socket"),
    ('address = "localhost"', "metrics.address"),
])
def test_metrics_address_is_checked(tmp_path, monkeypatch, table, problem):
    """A non-loopback or malformed metrics address is refused at start."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.ldif").write_text("")
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + "[metrics]\n" + table + "\n")
    with pytest.raises(ConfigError, match=problem):
        load_config(str(path))


def test_remote_metrics_address_allowed_when_asked(tmp_path, monkeypatch):
    """allow_remote = true accepts any address."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "users.ldif").write_text("")
    path = tmp_path / "c.toml"
    path.write_text(MINIMAL + '[metrics]\naddress = "0.0.0.0:9154"\nallow_remote = true\n')
    assert load_config(str(path)).metrics.address == "0.0.0.0:9154"


def test_directory_cache_reports_requests_errors_and_latency():
    """Cache misses and logins are timed; an outage counts as an error, a hit not at all."""
    from twisted.internet import defer, task

    from mailserver.directory.cache import CachingDirectory
    from mailserver.errors import DirectoryUnavailable

    class Backend:
        def resolve(self, address):
            if address.startswith("down"):
                return defer.fail(DirectoryUnavailable("timeout"))
            return defer.succeed(type("Res", (), {"found": True})())

        def authenticate(self, login, password):
            return defer.succeed(None)

    m = Metrics()
    cache = CachingDirectory(Backend(), clock=task.Clock(), metrics=m)
    cache.resolve("a@example.test")
    cache.resolve("a@example.test")  # a hit: the backend is not asked
    cache.resolve("down@example.test").addErrback(lambda f: None)
    cache.authenticate("alice", "pw")
    s = samples(m)
    assert s[("mailserver_directory_lookups_total", (("kind", "resolve"), ("result", "ok")))] == 1
    assert s[("mailserver_directory_lookups_total",
              (("kind", "resolve"), ("result", "error")))] == 1
    assert s[("mailserver_directory_lookups_total",
              (("kind", "authenticate"), ("result", "ok")))] == 1
    assert s[("mailserver_directory_lookup_seconds_count", (("kind", "resolve"),))] == 2
