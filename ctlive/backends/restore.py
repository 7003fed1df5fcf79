"""The destination's entry point: restore a rebuilt dump stopped, by workload kind."""

from __future__ import annotations

import pathlib
from typing import Any

from ctlive.backends.podman import restore_podman
from ctlive.backends.process import restore_process
from ctlive.backends.runc import restore_runc
from ctlive.backends.workload import Restored
from ctlive.errors import Phase, RestoreError, map_os_errors

__all__ = [
    "restore",
]


async def restore(kind: str, images_dir: pathlib.Path, spec: dict[str, Any], *,
                  external_map: dict[str, str] | None = None) -> Restored:
    """Restore a dump stopped; returns the handle the two-phase commit drives. Every
    failure is a ctlive error (an ``OSError`` becomes :class:`RestoreError`).

    ``external_map`` renames external resources for this host, e.g.
    ``{"veth[eth0]:vh0": "veth[eth0]:vh1"}`` when the outer end of the workload's veth
    has another name here."""
    restorers = {"process": restore_process, "runc": restore_runc, "podman": restore_podman}
    restorer = restorers.get(kind)
    if restorer is None:
        raise RestoreError(f"this receiver cannot restore workloads of kind {kind!r}",
                           phase=Phase.RESTORE)
    with map_os_errors(RestoreError, f"restoring the {kind} workload", phase=Phase.RESTORE):
        return await restorer(images_dir, spec, external_map or {})
