"""Checkpoint backends: what ``migrate()`` dumps on the source and restores on the
destination.

The source side is a :class:`Workload`: ``dump(dir, final=…)`` takes an iteration
while the workload runs (``pre-dump`` where the kernel tracks dirty pages, else a live
read of its memory, :mod:`ctlive.backends.liveread`, or with ``live_read=False`` a full
``dump --leave-running``) or the final dump, which leaves the workload
*stopped* so it can be resumed if the migration fails. The destination side is
:func:`restore`, which restores *stopped* and returns a :class:`Restored` that the
two-phase commit resumes or discards. The restore spec comes from the source and is
untrusted: the receiver's :class:`RestorePolicy` says what it may ask for.

One module per backend (``process``, ``runc``, ``podman``); ``criu`` finds and runs
CRIU and the runtimes that drive it; ``liveread`` reads a running tree's memory.
"""

from __future__ import annotations

from ctlive.backends.podman import PodmanContainer
from ctlive.backends.process import Process
from ctlive.backends.restore import RestorePolicy, restore
from ctlive.backends.runc import RuncContainer
from ctlive.backends.workload import DumpMethod, DumpResult, Restored, Workload

__all__ = [
    "DumpMethod",
    "DumpResult",
    "PodmanContainer",
    "Process",
    "RestorePolicy",
    "Restored",
    "RuncContainer",
    "Workload",
    "restore",
]
