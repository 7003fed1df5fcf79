"""``ctlive migrate --metrics HOST:PORT``: the running migration's Prometheus metrics.

A migration of a large workload runs for minutes; these gauges let a fleet's monitoring
watch it as it does the receivers (the same exporter, ``ctlive.ops.metrics.
MetricsServer``). They move with each progress event and stop when the command exits:
the complete figures are in the report (``--json``). docs/operations.md lists them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ctlive.errors import Phase

__all__ = ["SourceMetrics"]


class SourceMetrics:
    """The gauges of one ``ctlive migrate``, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.phase = Gauge("ctlive_source_phase", "1 for the migration's current phase",
                           ["phase"], registry=r)
        for p in Phase:
            self.phase.labels(str(p)).set(0)
        self.iteration = Gauge("ctlive_source_iteration", "the current pre-copy iteration",
                               registry=r)
        self.bytes_sent = Gauge("ctlive_source_sent_bytes", "bytes sent so far (wire)",
                                registry=r)
        self.dirty_rate = Gauge("ctlive_source_dirty_rate_bytes",
                                "bytes of pages dirtied per second (smoothed)", registry=r)
        self.link_rate = Gauge("ctlive_source_link_rate_bytes",
                               "wire bytes per second (smoothed)", registry=r)
        self.predicted = Gauge("ctlive_source_predicted_downtime_seconds",
                               "the downtime predicted if the next dump were the final one",
                               registry=r)
        self.downtime = Gauge("ctlive_source_downtime_seconds",
                              "the measured downtime, once the migration is done", registry=r)
        self.outcomes = Counter("ctlive_source_migrations", "migrations by outcome",
                                ["outcome"], registry=r)
        for o in ("committed", "failed", "in-doubt"):
            self.outcomes.labels(o)

    def progress(self, ev: Any) -> None:
        """Move the gauges to a ``ProgressEvent``'s figures."""
        for p in Phase:
            self.phase.labels(str(p)).set(1 if p == ev.phase else 0)
        self.iteration.set(ev.iteration)
        self.bytes_sent.set(ev.bytes_done)
        self.dirty_rate.set(ev.dirty_rate)
        self.link_rate.set(ev.link_rate)
        self.predicted.set(ev.predicted_downtime)

    def finished(self, outcome: str, downtime: float | None = None) -> None:
        """Count the outcome (committed, failed, in-doubt) and the downtime, if any."""
        self.outcomes.labels(outcome).inc()
        if downtime is not None:
            self.downtime.set(downtime)
