# -*- test-case-name: tests.unit.test_workers -*-
"""Metrics across processes, served once by the supervisor.

Each worker counts into its own :class:`~mailserver.metrics.Metrics` and,
every :data:`INTERVAL` seconds when anything changed, sends the supervisor
its samples (:class:`MetricsReport`, zlib-compressed JSON).  The
supervisor's ``/metrics`` page adds the latest report of every worker to its
own counts (the queue's deliveries, the queue depth), sample by sample.
When a worker dies its counters and histograms are kept (added to a retired
total), so a sum never goes backwards; its gauges (connections open) are
dropped.  A scrape is at most :data:`INTERVAL` seconds behind the workers.

We chose this over prometheus_client's multiprocess mode, which needs an
environment variable set before the library is first imported, a directory
of memory-mapped files per process to clean, and gauges declared per mode.
"""

from __future__ import annotations

import json
import zlib
from typing import Dict, Tuple

from twisted.protocols import amp

INTERVAL = 1.0

Key = Tuple[str, str, Tuple[Tuple[str, str], ...]]  # family, sample name, labels


class MetricsReport(amp.Command):
    arguments = [(b"samples", amp.String())]
    response = []
    requiresAnswer = False


def samples(registry) -> Dict[Key, float]:
    """Every sample of ``registry`` but the ``_created`` timestamps."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(family.name, s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def encode(values: Dict[Key, float]) -> bytes:
    return zlib.compress(json.dumps([[f, n, list(map(list, lb)), v]
                                     for (f, n, lb), v in values.items()]).encode())


def decode(data: bytes) -> Dict[Key, float]:
    return {(f, n, tuple(tuple(x) for x in lb)): v
            for f, n, lb, v in json.loads(zlib.decompress(data))}


class Aggregate:
    """The supervisor's view: its own registry plus the workers' reports.

    Has the ``collect()`` that ``prometheus_client.generate_latest`` calls,
    so it renders like a registry."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.kinds: Dict[str, str] = {}  # family -> type, from the reports' registry shape
        self.live: Dict[object, Dict[Key, float]] = {}  # worker -> its latest report
        self.retired: Dict[Key, float] = {}  # counters of workers that are gone

    def report(self, worker, data: bytes) -> None:
        self.live[worker] = decode(data)

    def gone(self, worker, gauges: frozenset) -> None:
        for key, v in self.live.pop(worker, {}).items():
            if key[0] not in gauges:
                self.retired[key] = self.retired.get(key, 0.0) + v

    def collect(self):
        extra: Dict[Key, float] = dict(self.retired)
        for report in self.live.values():
            for key, v in report.items():
                extra[key] = extra.get(key, 0.0) + v
        for family in self.registry.collect():
            mine = {}
            for s in family.samples:
                key = (family.name, s.name, tuple(sorted(s.labels.items())))
                mine[key] = s
            for key, v in extra.items():
                if key[0] != family.name:
                    continue
                s = mine.get(key)
                if s is not None:
                    mine[key] = s._replace(value=s.value + v)
                else:
                    from prometheus_client.samples import Sample

                    mine[key] = Sample(key[1], dict(key[2]), v, None, None)
            family.samples = list(mine.values())
            yield family


def gauge_families(registry) -> frozenset:
    return frozenset(f.name for f in registry.collect() if f.type == "gauge")


def worker_metrics(config, reactor, parent, channel):
    """A worker's :class:`~mailserver.metrics.Metrics`, reported to the
    supervisor every :data:`INTERVAL` seconds while anything changes."""
    from twisted.application.internet import TimerService

    from mailserver.metrics import Metrics

    metrics = Metrics()
    last = [None]

    def push():
        data = encode(samples(metrics.registry))
        if data != last[0] and channel.up:
            last[0] = data
            channel.send(MetricsReport, samples=data)

    svc = TimerService(INTERVAL, push)
    svc.clock = reactor
    svc.setServiceParent(parent)
    return metrics
