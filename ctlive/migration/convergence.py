"""When to stop pre-copying: the convergence policy.

After every iteration the policy sees the history and decides whether the next
dump is the final one. The default, :class:`Convergence`, predicts the downtime of
stopping now (final dump + transfer of what will be dirty by then + restore)
from smoothed dirty and link rates, and stops when that fits ``max_downtime``,
when the dirty set stops shrinking, or at ``max_iterations``. When pre-copy
iterations are full ``dump --leave-running`` (a backend with ``live_read=False`` on a
kernel without soft-dirty tracking), each freezes the workload as long as the final
dump does; the policy then also stops as soon as another iteration could save less
time than the freeze it costs. On the pre-dump path (CRIU ``pre-dump`` with soft-dirty
tracking) the dirty rate comes from the pages CRIU wrote (exactly the pages dirtied since
the previous pre-dump), and ``predump_freeze_cost`` can weigh each pre-dump's own, short,
freeze the same way. Users can pass any object with the same ``decide`` method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import attrs

from ctlive.backends.workload import DumpMethod
from ctlive.errors import ConfigError
from ctlive.migration.report import Decision, IterationReport

__all__ = [
    "Convergence",
    "ConvergencePolicy",
]


@runtime_checkable
class ConvergencePolicy(Protocol):
    """Decides, after each iteration, whether the next dump is the final one."""

    def decide(self, history: Sequence[IterationReport], intervals: Sequence[float]
               ) -> Decision:
        """``intervals[i]`` is the wall time between dump i-1 and dump i (0 for the first)."""
        ...


def _positive(_: object, attr: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ConfigError(f"{attr.name} must not be negative")


@attrs.frozen(kw_only=True)
class Convergence:
    """The default policy."""

    max_iterations: int = attrs.field(default=8)
    """Total dumps including the final one (at least 1)."""
    max_downtime: float = attrs.field(default=0.3, validator=_positive)
    """Target downtime in seconds."""
    min_shrink: float = attrs.field(default=0.1, validator=_positive)
    """Stop when the changed-page count shrinks by less than this fraction."""
    smoothing: float = attrs.field(default=0.5, validator=_positive)
    """Weight of the newest sample in the rate averages (1 = no smoothing)."""
    restore_rate: float = attrs.field(default=1.0e9, validator=_positive)
    """Assumed restore speed, image bytes per second, until one is measured."""
    freeze_cost: float = attrs.field(default=1.0, validator=_positive)
    """When pre-copy iterations are full dumps (no soft-dirty tracking), stop once the
    predicted final transfer is below this multiple of the freeze another iteration
    would cost (0 disables the rule)."""

    predump_freeze_cost: float = attrs.field(default=0.0, validator=_positive)
    """On the pre-dump path, stop once the predicted final transfer is below this
    multiple of the freeze another pre-dump would cost (CRIU's frozen time of the last
    one; 0, the default, disables the rule: a pre-dump's freeze is short)."""

    def __attrs_post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ConfigError("max_iterations must be at least 1")

    def decide(self, history: Sequence[IterationReport], intervals: Sequence[float]
               ) -> Decision:
        """Decide after the last iteration in ``history``."""
        last = history[-1]
        k = last.index
        dirty_rate = link_rate = 0.0
        a = self.smoothing
        for it, dt in zip(history, intervals, strict=True):
            if it.index > 0 and dt > 0:
                # A pre-dump counts what the kernel saw dirtied, not only what changed.
                pages = (it.pages_written if it.method == DumpMethod.PRE_DUMP
                         and it.pages_written is not None else it.pages_changed)
                sample = pages * 4096 / dt
                dirty_rate = sample if dirty_rate == 0 else a * sample + (1 - a) * dirty_rate
            if it.transfer_seconds > 0:
                sample = it.wire_bytes / it.transfer_seconds
                link_rate = sample if link_rate == 0 else a * sample + (1 - a) * link_rate
        # What will have changed by the final dump: the pages dirtied during the time the
        # last iteration took, at the measured dirty rate (iteration 0: unknown, so assume
        # the whole image, which keeps iterating).
        interval = last.dump_seconds + last.transfer_seconds
        dirty_bytes = dirty_rate * interval if k > 0 else float(last.image_bytes)
        ratio = last.wire_bytes / max(last.pages_changed * 4096, 1)
        wire_bytes = dirty_bytes * min(max(ratio, 0.01), 1.0)
        frozen = (last.frozen_time_us or 0) / 1e6 or last.dump_seconds
        # What another iteration would freeze the workload for: a whole dump, or a pre-dump.
        freeze = last.freeze_seconds if last.freeze_seconds is not None else frozen
        predicted = (frozen + wire_bytes / max(link_rate, 1.0)
                     + last.image_bytes / self.restore_rate)
        inputs = {"dirty_rate": dirty_rate, "link_rate": link_rate, "dirty_bytes": dirty_bytes,
                  "predicted_wire_bytes": wire_bytes, "final_dump_seconds": frozen,
                  "iteration_freeze_seconds": freeze,
                  "pages_written": float(last.pages_written or 0)}
        transfer = wire_bytes / max(link_rate, 1.0)
        inputs["predicted_transfer_seconds"] = transfer
        if k + 2 >= self.max_iterations:
            reason, final = f"iteration cap ({self.max_iterations} dumps)", True
        elif k > 0 and predicted <= self.max_downtime:
            reason, final = (f"predicted downtime {predicted:.3f}s fits {self.max_downtime}s",
                             True)
        elif k > 0 and last.method == DumpMethod.DUMP and transfer < self.freeze_cost * frozen:
            # Another iteration can shorten the final phase by at most the transfer
            # time, and would freeze the workload for a whole dump to do so.
            reason, final = (f"another full-dump iteration would freeze {frozen:.3f}s to "
                             f"save at most {transfer:.3f}s of transfer", True)
        elif (k > 0 and last.method == DumpMethod.PRE_DUMP
              and transfer < self.predump_freeze_cost * freeze):
            reason, final = (f"another pre-dump would freeze {freeze:.3f}s to save at most "
                             f"{transfer:.3f}s of transfer", True)
        elif k > 1 and history[-2].pages_changed > 0 and (
                last.pages_changed > history[-2].pages_changed * (1 - self.min_shrink)):
            reason, final = ("dirty set stopped shrinking "
                             f"({history[-2].pages_changed} -> {last.pages_changed} pages)", True)
        else:
            reason, final = f"predicted downtime {predicted:.3f}s exceeds target; iterate", False
        return Decision(k, final, reason, predicted, inputs)
