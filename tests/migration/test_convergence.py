"""The convergence policy and the report: pure, no I/O."""

from __future__ import annotations

import json

import attrs
import pytest

from ctlive import Convergence, MigrationReport
from ctlive.errors import ConfigError
from ctlive.migration.report import IterationReport


def it(k: int, changed: int, wire: int, *, dump: float = 0.2, transfer: float = 0.1,
       total: int = 10000, method: str | None = None) -> IterationReport:
    return IterationReport(k, False, dump, transfer, total, changed, 0, changed, 0,
                           total * 4096, wire, 50_000, 10_000, method)


def test_first_iteration_always_continues() -> None:
    d = Convergence(max_downtime=10.0).decide([it(0, 10000, 40_000_000)], [0.0])
    assert not d.final_next
    assert d.after_iteration == 0


def test_stops_when_predicted_downtime_fits() -> None:
    hist = [it(0, 10000, 40_000_000), it(1, 100, 4_000)]
    d = Convergence(max_downtime=0.5).decide(hist, [0.0, 1.0])
    assert d.final_next and "fits" in d.reason
    assert d.inputs["dirty_rate"] == pytest.approx(100 * 4096 / 1.0)
    assert d.predicted_downtime <= 0.5


def test_keeps_iterating_when_too_slow_and_shrinking() -> None:
    hist = [it(0, 10000, 40_000_000), it(1, 5000, 20_000_000, transfer=10.0)]
    d = Convergence(max_downtime=0.1, max_iterations=10).decide(hist, [0.0, 1.0])
    assert not d.final_next
    assert "exceeds" in d.reason


def test_stops_when_dirty_set_stops_shrinking() -> None:
    hist = [it(0, 10000, 4e7), it(1, 5000, 2e7, transfer=10.0), it(2, 4900, 2e7, transfer=10.0)]
    d = Convergence(max_downtime=0.01, max_iterations=10, min_shrink=0.1).decide(
        hist, [0.0, 1.0, 1.0])  # type: ignore[arg-type]
    assert d.final_next and "shrinking" in d.reason


def test_full_dumps_stop_when_a_freeze_costs_more_than_it_saves() -> None:
    # Without soft-dirty every pre-copy iteration freezes the workload for a whole dump
    # (0.05 s here): once the predicted final transfer is shorter, iterating only adds
    # outages.
    hist = [it(0, 10000, 40_000_000, method="dump"),
            it(1, 2000, 200_000, transfer=0.1, method="dump")]
    d = Convergence(max_downtime=0.01, max_iterations=10).decide(hist, [0.0, 1.0])
    assert d.final_next and "freeze" in d.reason
    assert d.inputs["predicted_transfer_seconds"] < 0.05
    # The same history from pre-dumps or live reads (short or no freezes) keeps
    # iterating ...
    for method in ("pre-dump", "live-read"):
        pre = [attrs.evolve(h, method=method) for h in hist]
        assert not Convergence(max_downtime=0.01, max_iterations=10).decide(
            pre, [0.0, 1.0]).final_next
    # ... and so do full dumps whose delta still takes longer to send than a freeze.
    slow = [hist[0], attrs.evolve(hist[1], transfer_seconds=20.0, wire_bytes=8_000_000)]
    assert not Convergence(max_downtime=0.01, max_iterations=10).decide(slow, [0.0, 1.0]
                                                                          ).final_next
    # freeze_cost=0 turns the rule off.
    assert not Convergence(max_downtime=0.01, max_iterations=10, freeze_cost=0).decide(
        hist, [0.0, 1.0]).final_next


def test_iteration_cap() -> None:
    hist = [it(0, 10000, 4e7), it(1, 9000, 4e7, transfer=100)]  # type: ignore[arg-type]
    d = Convergence(max_downtime=0.0, max_iterations=3).decide(hist, [0.0, 1.0])
    assert d.final_next and "cap" in d.reason


def test_invalid_settings() -> None:
    with pytest.raises(ConfigError):
        Convergence(max_iterations=0)
    with pytest.raises(ConfigError):
        Convergence(max_downtime=-1)


def test_report_serialises() -> None:
    r = MigrationReport("m1", "process", "127.0.0.1:1", 2.0, 0.3, "source clock",
                        (it(0, 1, 2),), (), 100, 200, "AESGCM", 1, {"platform": "x"})
    data = json.loads(r.to_json())
    assert data["iterations"][0]["pages_changed"] == 1
    assert data["downtime"] == 0.3
