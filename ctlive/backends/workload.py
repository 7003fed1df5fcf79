"""What every backend shares: the source-side :class:`Workload` protocol, a dump's
:class:`DumpResult`, the destination-side :class:`Restored` handle, and process-tree
helpers."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
from typing import Any, Protocol, runtime_checkable

import attrs

from ctlive.images.criu_format import DumpStats

__all__ = [
    "DumpResult",
    "Restored",
    "Workload",
    "process_tree",
    "signal_tree",
]


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` and every descendant."""
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, parents first."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        for task in pathlib.Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


@attrs.frozen
class DumpResult:
    """One dump: how long it took and CRIU's own figures."""

    duration: float
    pre_dump: bool
    final: bool
    stats: DumpStats | None
    method: str = ""
    """``pre-dump`` (CRIU, soft-dirty: a short freeze), ``dump`` (CRIU ``--leave-running``:
    frozen while all memory is written), ``read`` (memory read while the workload runs,
    no freeze; see :mod:`ctlive.backends.liveread`) or ``final``."""


@runtime_checkable
class Workload(Protocol):
    """A checkpointable workload on the source."""

    kind: str

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        """Dump into ``images_dir``; ``final`` leaves the workload stopped."""
        ...

    async def resume(self) -> None:
        """Continue a workload the final dump left stopped (the abort path)."""
        ...

    async def kill(self) -> None:
        """End the source copy (after the destination is ready)."""
        ...

    def restore_spec(self) -> dict[str, Any]:
        """JSON-able facts the destination needs to restore."""
        ...


class Restored:
    """A workload restored stopped on the destination."""

    def __init__(self, pid: int, *, container_id: str | None = None) -> None:
        self.pid = pid
        self._id = container_id

    async def resume(self) -> None:
        """Let it run (the destination's half of COMMIT)."""
        signal_tree(self.pid, signal.SIGCONT)

    async def discard(self) -> None:
        """Kill it (ABORT, or a failure before COMMIT)."""
        signal_tree(self.pid, signal.SIGKILL)
