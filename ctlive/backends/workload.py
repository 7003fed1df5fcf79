"""What every backend shares: the source-side :class:`Workload` protocol, a dump's
:class:`DumpResult`, the destination-side :class:`Restored` handle, and process-tree
helpers."""

from __future__ import annotations

import contextlib
import enum
import os
import pathlib
import signal
from typing import Any, Protocol, runtime_checkable

import attrs

from ctlive.errors import CheckpointError, Phase, map_os_errors
from ctlive.images.criu_format import DumpStats

__all__ = [
    "Backend",
    "DumpMethod",
    "DumpResult",
    "Restored",
    "Workload",
    "process_start_time",
    "process_tree",
    "signal_tree",
    "visible_tmpfs",
]


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to ``pid`` and every descendant."""
    for p in process_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def visible_tmpfs(pid: int, path: pathlib.Path) -> str | None:
    """Where ``pid`` sees the tmpfs that holds ``path``, if it lives in a mount namespace
    of its own (CRIU then archives the contents of every tmpfs in that namespace,
    overmounted ones included); None otherwise."""
    try:
        if os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            return None
        dev = os.stat(path).st_dev
        text = pathlib.Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in text.splitlines():
        fields, _, fs = line.partition(" - ")
        f = fields.split()
        if len(f) >= 5 and f[2] == want and fs.split()[:1] == ["tmpfs"]:
            return f[4]
    return None


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None if it is gone: with the pid,
    it names a process across pid reuse."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


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


class DumpMethod(enum.StrEnum):
    """How an iteration's dump was taken (``IterationReport.method``)."""

    PRE_DUMP = "pre-dump"
    """CRIU ``pre-dump`` with soft-dirty tracking: a short freeze."""
    DUMP = "dump"
    """CRIU ``dump --leave-running``: frozen while all memory is written."""
    LIVE_READ = "live-read"
    """Memory read while the workload runs (:mod:`ctlive.backends.liveread`): no freeze."""
    FINAL = "final"
    """The final dump, which leaves the workload stopped."""


@attrs.frozen
class DumpResult:
    """One dump: how long it took and CRIU's own figures."""

    duration: float
    pre_dump: bool
    final: bool
    stats: DumpStats | None
    method: DumpMethod


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


class Backend:
    """Shared by ctlive's backends: every ``OSError`` from dumping, resuming or killing
    becomes a :class:`~ctlive.errors.CheckpointError` naming the phase. Subclasses
    implement ``_dump``, ``_resume`` and ``_kill``."""

    kind: str

    async def dump(self, images_dir: pathlib.Path, *, final: bool,
                   parent: pathlib.Path | None = None) -> DumpResult:
        """Dump into ``images_dir``; ``final`` leaves the workload stopped."""
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        with map_os_errors(CheckpointError, f"dumping the {self.kind} workload", phase=phase):
            return await self._dump(images_dir, final=final, parent=parent)

    async def resume(self) -> None:
        """Continue a workload the final dump left stopped (the abort path)."""
        with map_os_errors(CheckpointError, f"resuming the {self.kind} workload",
                           phase=Phase.ABORT):
            await self._resume()

    async def kill(self) -> None:
        """End the source copy (after the destination is ready)."""
        with map_os_errors(CheckpointError, f"killing the {self.kind} workload",
                           phase=Phase.COMMIT):
            await self._kill()

    def carried_trees(self) -> dict[str, str]:
        """The directory trees pre-copied with the workload's memory, by label (a plain
        name): none unless the backend says so (:mod:`ctlive.images.tree`)."""
        return {}

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        raise NotImplementedError

    async def _resume(self) -> None:
        raise NotImplementedError

    async def _kill(self) -> None:
        raise NotImplementedError


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
