"""What a migration reports: progress events while it runs, and a frozen
:class:`MigrationReport` at the end (JSON-serialisable, for logs and dashboards)."""

from __future__ import annotations

import json
from typing import Any, TypedDict

import attrs

from ctlive.backends.workload import DumpMethod
from ctlive.errors import Phase
from ctlive.images.criu_format import DumpStats

__all__ = [
    "CriuFigures",
    "Decision",
    "IterationReport",
    "MigrationReport",
    "ProgressEvent",
]


@attrs.frozen
class ProgressEvent:
    """A progress update from ``migrate()``."""

    phase: Phase
    """The phase entered (or, for ``iterate``, the iteration finished): connect,
    attest, preflight, iterate, final-dump, send, restore, commit, done, failed."""
    iteration: int
    bytes_done: int
    bytes_predicted: int
    dirty_rate: float
    """Bytes of pages dirtied per second (smoothed)."""
    link_rate: float
    """Wire bytes per second (smoothed)."""
    predicted_downtime: float


@attrs.frozen
class Decision:
    """A convergence decision and the inputs it was made from."""

    after_iteration: int
    final_next: bool
    reason: str
    predicted_downtime: float
    inputs: dict[str, float]


@attrs.frozen
class IterationReport:
    """One iteration's figures."""

    index: int
    final: bool
    dump_seconds: float
    transfer_seconds: float
    pages_total: int
    pages_changed: int
    pages_zero: int
    pages_delta: int
    pages_raw: int
    image_bytes: int
    wire_bytes: int
    frozen_time_us: int | None
    memdump_time_us: int | None
    method: DumpMethod | None = attrs.field(default=None,
                                            converter=attrs.converters.optional(DumpMethod))
    """How the iteration was taken: ``pre-dump`` (CRIU with soft-dirty tracking: a short
    freeze), ``dump`` (CRIU ``dump --leave-running``: the workload is frozen while all
    its memory is written), ``live-read`` (memory read while the workload runs: no
    freeze), ``final``; None when unknown."""
    file_bytes: int = 0
    """Bytes of carried files (their zstd blobs and manifests) sent in the iteration."""
    pages_written: int | None = None
    """Pages CRIU wrote in this dump (its ``stats-dump``). After a ``pre-dump`` with
    soft-dirty tracking, the pages dirtied since the previous one; None when unknown."""

    @property
    def freeze_seconds(self) -> float | None:
        """How long this iteration froze the workload: CRIU's frozen time (short for a
        ``pre-dump``, the whole memory write for a ``dump``), 0 for a live read, None
        when unknown."""
        if self.method == DumpMethod.LIVE_READ:
            return 0.0
        return None if self.frozen_time_us is None else self.frozen_time_us / 1e6

    @staticmethod
    def criu_figures(stats: DumpStats | None) -> CriuFigures:
        """The fields taken from CRIU's ``stats-dump`` (None each when it is missing)."""
        return {"frozen_time_us": stats.frozen_time if stats else None,
                "memdump_time_us": stats.memdump_time if stats else None,
                "pages_written": stats.pages_written if stats else None}


class CriuFigures(TypedDict):
    """:meth:`IterationReport.criu_figures`: CRIU's own figures for one dump."""

    frozen_time_us: int | None
    memdump_time_us: int | None
    pages_written: int | None


@attrs.frozen
class MigrationReport:
    """The outcome of a migration."""

    migration_id: str
    workload: str
    destination: str
    total_time: float
    downtime: float
    downtime_method: str
    iterations: tuple[IterationReport, ...]
    decisions: tuple[Decision, ...]
    bytes_on_wire: int
    image_bytes: int
    cipher: str
    lanes: int
    attestation: dict[str, Any]
    preflight: dict[str, Any] = attrs.field(factory=dict)
    """What the preflight found (:meth:`~ctlive.migration.preflight.PreflightResult.summary`):
    the destination's kernel, CRIU and cgroup version, the CPU features the workload
    needs, and the differences that did not refuse it."""
    destination_summary: dict[str, Any] = attrs.field(factory=dict)
    downtime_phases: dict[str, float] = attrs.field(factory=dict)
    """Where the downtime went, in seconds on the source's clock: ``dump`` (the final
    dump), ``send`` (its diff and transfer), ``destination`` (until READY: the last
    rebuild's verification and the restore; the destination's own split is in
    ``destination_summary["timings"]``), ``kill`` (the source copy) and ``commit``
    (COMMIT until its ACK, the destination's resume included)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for JSON."""
        return attrs.asdict(self)

    def to_json(self, **kw: Any) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), **kw)
