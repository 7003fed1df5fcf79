"""The operator's surface: logging (:mod:`ctlive.ops.logs`) and the receiver's
Prometheus metrics (:mod:`ctlive.ops.metrics`)."""

from __future__ import annotations

from ctlive.ops.logs import bind, configure, current_migration_id

__all__ = ["bind", "configure", "current_migration_id"]
