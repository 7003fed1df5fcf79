"""The convergence policy and the report on the pre-dump path: pages CRIU wrote per
pre-dump and the freeze each one costs (CRIU's stats-dump)."""

from __future__ import annotations

import pytest

from ctlive import Convergence
from ctlive.backends.workload import DumpMethod
from ctlive.images.criu_format import DumpStats
from ctlive.migration.report import IterationReport


def it(k: int, changed: int, written: int | None, *, frozen_us: int = 20_000,
       transfer: float = 0.1, method: DumpMethod = DumpMethod.PRE_DUMP) -> IterationReport:
    return IterationReport(k, False, 0.5, transfer, 10_000, changed, 0, changed, 0,
                           10_000 * 4096, changed * 4096, frozen_us, 5_000, method,
                           pages_written=written)


def test_pre_dump_dirty_rate_counts_the_pages_criu_wrote() -> None:
    # 300 pages dirtied, 100 of them to new content: the final dump writes all 300.
    hist = [it(0, 10_000, 10_000), it(1, 100, 300)]
    d = Convergence(max_downtime=0.0, max_iterations=10).decide(hist, [0.0, 2.0])
    assert d.inputs["dirty_rate"] == pytest.approx(300 * 4096 / 2.0)
    assert d.inputs["pages_written"] == 300
    assert d.inputs["iteration_freeze_seconds"] == pytest.approx(0.02)
    # A full dump (no soft-dirty) has no such count: the diff's changed pages it is.
    full = [it(0, 10_000, 10_000, method=DumpMethod.DUMP), it(1, 100, 10_000,
                                                               method=DumpMethod.DUMP)]
    d = Convergence(max_downtime=0.0, max_iterations=10, freeze_cost=0).decide(full, [0.0, 2.0])
    assert d.inputs["dirty_rate"] == pytest.approx(100 * 4096 / 2.0)


def test_stops_when_another_pre_dump_would_freeze_longer_than_it_saves() -> None:
    # Transfer of what is left: far less than the 0.5 s the next pre-dump would freeze.
    hist = [it(0, 10_000, 10_000), it(1, 10, 10, frozen_us=500_000, transfer=0.001)]
    c = Convergence(max_downtime=0.0, max_iterations=10, predump_freeze_cost=1.0)
    d = c.decide(hist, [0.0, 1.0])
    assert d.final_next and "another pre-dump would freeze 0.500s" in d.reason
    # Off by default; and with a short freeze the same history iterates on.
    assert not Convergence(max_downtime=0.0, max_iterations=10).decide(
        hist, [0.0, 1.0]).final_next
    hist = [it(0, 10_000, 10_000), it(1, 10, 10, frozen_us=10, transfer=0.001)]
    assert not c.decide(hist, [0.0, 1.0]).final_next


def test_report_freeze_and_pages_from_stats() -> None:
    stats = DumpStats(freezing_time=1, frozen_time=12_345, memdump_time=2, memwrite_time=3,
                      pages_scanned=4000, pages_skipped_parent=3900, pages_written=100)
    fig = IterationReport.criu_figures(stats)
    assert fig == {"frozen_time_us": 12_345, "memdump_time_us": 2, "pages_written": 100}
    assert IterationReport.criu_figures(None) == {"frozen_time_us": None,
                                                  "memdump_time_us": None,
                                                  "pages_written": None}
    r = IterationReport(1, False, 0.1, 0.1, 1, 1, 0, 1, 0, 4096, 10, **fig,
                        method=DumpMethod.PRE_DUMP)
    assert r.freeze_seconds == pytest.approx(0.012345)
    live = IterationReport(1, False, 0.1, 0.1, 1, 1, 0, 1, 0, 4096, 10, None, None,
                           DumpMethod.LIVE_READ)
    assert live.freeze_seconds == 0.0
