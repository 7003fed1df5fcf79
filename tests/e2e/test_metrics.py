"""The receiver's Prometheus metrics (ctlive.ops.metrics), scraped over HTTP during
and after real migrations, under asyncio and trio."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import anyio
import pytest
from criu_harness import Mutator
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ctlive import errors
from ctlive.backends.process import Process
from ctlive.migration.convergence import Convergence
from ctlive.migration.destination import ReceiverLimits
from ctlive.migration.source import migrate
from ctlive.ops.metrics import ReceiverMetrics
from tests.e2e.conftest import SRC

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, by (name, labels); a blocking call."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """A sample that must be exported: a misnamed metric fails, rather than reading 0."""
    return samples[(name, tuple(sorted(labels.items())))]


class ScrapeAt:
    """Receiver hooks that scrape the endpoint when the receiver reaches a stage (the
    exporter is a thread of its own: a blocking scrape from the loop is fine)."""

    def __init__(self, port: int, stage: str, *more: str) -> None:
        self.port, self.stage, self.more = port, stage, more
        self.samples: dict[Any, float] | None = None
        self.at: dict[str, dict[Any, float]] = {}

    def on_stage(self, stage: str) -> None:
        if stage == self.stage:
            self.samples = scrape(self.port)
        elif stage in self.more:
            self.at[stage] = scrape(self.port)


async def test_metrics_during_and_after_a_migration(mutator: Mutator, receiver_factory: Any,
                                                    verifier: Any) -> None:
    port = free_port()
    hooks = ScrapeAt(port, "before-resume", "before-restore")
    rx = await receiver_factory(hooks=hooks, metrics=f"127.0.0.1:{port}")
    before = await anyio.to_thread.run_sync(scrape, port)  # serving before any session
    assert value(before, "ctlive_receiver_sessions_total") == 0
    assert value(before, "ctlive_receiver_migrations_total", outcome="committed") == 0
    report = await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                           convergence=Convergence(max_iterations=2, max_downtime=0.0))
    during = hooks.samples
    assert during is not None  # READY, COMMIT received, not yet resumed
    assert value(during, "ctlive_receiver_sessions_in_progress") >= 1
    assert value(during, "ctlive_receiver_ready_in_doubt") == 1
    assert value(during, "ctlive_receiver_migrations_total", outcome="committed") == 0
    assert value(during, "ctlive_receiver_phase_seconds_count", phase="restore") == 1
    assert value(during, "ctlive_receiver_phase_seconds_count", phase="verify") >= 1
    receiving = hooks.at["before-restore"]
    assert value(receiving, "ctlive_receiver_state_dir_bytes") > 1 << 20  # the image is there
    assert value(during, "ctlive_receiver_received_bytes_total") > 1 << 20
    with anyio.fail_after(10):
        while True:
            after = await anyio.to_thread.run_sync(scrape, port)
            if value(after, "ctlive_receiver_sessions_in_progress") == 0:
                break
            await anyio.sleep(0.05)
    assert value(after, "ctlive_receiver_sessions_total") >= 1
    assert value(after, "ctlive_receiver_migrations_total", outcome="committed") == 1
    assert value(after, "ctlive_receiver_migrations_total", outcome="failed") == 0
    assert value(after, "ctlive_receiver_ready_in_doubt") == 0
    assert value(after, "ctlive_receiver_phase_seconds_count", phase="resume") == 1
    assert value(after, "ctlive_receiver_downtime_seconds_count") == 1
    downtime = value(after, "ctlive_receiver_downtime_seconds_sum")
    assert 0 < downtime <= report.downtime  # the receiver's part of the source's bound
    assert value(after, "ctlive_receiver_downtime_seconds_bucket", le="+Inf") == 1
    received = value(after, "ctlive_receiver_received_bytes_total")
    assert received >= sum(i.wire_bytes for i in report.iterations)
    assert value(after, "ctlive_receiver_state_dir_bytes") < \
        value(receiving, "ctlive_receiver_state_dir_bytes")  # no image after COMMIT
    assert rx.errors == []


async def test_refusals_and_failures_are_counted(mutator: Mutator, receiver_factory: Any,
                                                 verifier: Any) -> None:
    """An image over the receiver's limit: a refusal by reason and a failed migration,
    in the registry passed to serve()."""
    registry = CollectorRegistry()
    refusals: list[tuple[str, str]] = []
    rx = await receiver_factory(registry=registry, on_refusal=lambda r, p: refusals.append((r, p)),
                                limits=ReceiverLimits(max_image_bytes=1 << 20))
    with pytest.raises(errors.MigrationError):
        await migrate(Process(mutator.pid), rx.addr, identity=SRC, attestation=verifier,
                      convergence=Convergence(max_iterations=2, max_downtime=0.0))
    get = registry.get_sample_value
    assert get("ctlive_receiver_refusals_total", {"reason": "image-too-large"}) == 1
    assert get("ctlive_receiver_migrations_total", {"outcome": "failed"}) == 1
    assert get("ctlive_receiver_migrations_total", {"outcome": "committed"}) == 0
    assert get("ctlive_receiver_downtime_seconds_count") == 0
    assert ("image-too-large", "") in refusals


def test_each_receiver_has_its_own_registry() -> None:
    a, b = ReceiverMetrics(), ReceiverMetrics()
    a.sessions.inc()
    assert a.registry.get_sample_value("ctlive_receiver_sessions_total") == 1
    assert b.registry.get_sample_value("ctlive_receiver_sessions_total") == 0
