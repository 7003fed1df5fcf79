"""Fault hooks for the destination receiver: ``serve(..., hooks=FaultHooks(...))``.

The receiver (``ctlive.migration.destination``) calls ``hooks.on_stage(stage)`` at
these stages of each migration, in this order:

``"mid-iteration"``
    After each change item of iteration 1 (the second iteration, the first
    incremental one) has been applied and its bytes granted back to the source;
    runs once per item, while the source is still sending.
``"before-restore"``
    The final image is complete and verified, nothing is restored yet.
``"before-ready"``
    The workload is restored *stopped* (and ``post_restore`` ran), READY is not
    sent yet: the source still owns the workload.
``"before-resume"``
    COMMIT arrived, the restored copy is not resumed yet (``post_resume`` has not
    run).

What a hook raises fails the migration at that stage as any receiver error would
(e.g. ``BrokenChannelError`` for a cut connection); a hook may also cancel the
receiver's scope to make it die there.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = [
    "STAGES",
    "FaultHooks",
]

STAGES = ("mid-iteration", "before-restore", "before-ready", "before-resume")
"""The stage names the receiver reports, in the order a migration reaches them."""


class FaultHooks:
    """A ``ctlive.migration.destination.DestinationHooks`` that calls the function given
    for a stage (by keyword: ``mid_iteration``, ``before_restore``, ``before_ready``,
    ``before_resume``) each time the receiver reaches it, and records every stage
    reached in ``reached``.

    >>> hooks = FaultHooks(before_ready=lambda: None)
    >>> hooks.on_stage("before-ready"); hooks.reached
    ['before-ready']
    """

    def __init__(self, *, mid_iteration: Callable[[], object] | None = None,
                 before_restore: Callable[[], object] | None = None,
                 before_ready: Callable[[], object] | None = None,
                 before_resume: Callable[[], object] | None = None) -> None:
        self.actions: dict[str, Callable[[], object] | None] = {
            "mid-iteration": mid_iteration,
            "before-restore": before_restore,
            "before-ready": before_ready,
            "before-resume": before_resume,
        }
        self.reached: list[str] = []
        """Every stage reported so far, in order (repeats included)."""

    def on_stage(self, stage: str) -> None:
        """Record ``stage`` and run its function, if one was given (stages not in
        ``STAGES`` are only recorded)."""
        self.reached.append(stage)
        action = self.actions.get(stage)
        if action is not None:
            action()
