"""The destination's entry point: restore a rebuilt dump stopped, by workload kind."""

from __future__ import annotations

import pathlib
from typing import Any

from ctlive.backends.criu import run_criu
from ctlive.backends.podman import restore_podman
from ctlive.backends.runc import restore_runc
from ctlive.backends.workload import Restored
from ctlive.errors import CheckpointError, RestoreError

__all__ = [
    "restore",
]


async def restore(kind: str, images_dir: pathlib.Path, spec: dict[str, Any], *,
                  external_map: dict[str, str] | None = None) -> Restored:
    """Restore a dump stopped; returns the handle the two-phase commit drives.

    ``external_map`` renames external resources for this host, e.g.
    ``{"veth[eth0]:vh0": "veth[eth0]:vh1"}`` when the outer end of the workload's veth
    has another name here."""
    if kind == "runc":
        return await restore_runc(images_dir, spec)
    if kind == "podman":
        return await restore_podman(images_dir, spec)
    if kind != "process":
        raise RestoreError(f"this receiver cannot restore workloads of kind {kind!r}")
    args = ["restore", "-D", str(images_dir), "-d", "--leave-stopped", "--root", "/",
            "--pidfile", str(images_dir / "restored.pid")]
    if spec.get("tcp_established"):
        args.append("--tcp-established")
    for e in spec.get("external", []):
        if not isinstance(e, str):
            raise RestoreError("bad external resource in the restore spec")
        args += ["--external", (external_map or {}).get(e, e)]
    if spec.get("shell_job"):
        args.append("--shell-job")
    try:
        await run_criu(args, workdir=images_dir, log="restore.log", phase="restore")
    except CheckpointError:
        raise
    except Exception as exc:
        raise RestoreError(f"restore failed: {exc}", phase="restore", cause=exc) from exc
    try:
        pid = int((images_dir / "restored.pid").read_text().strip())
    except (OSError, ValueError) as exc:
        raise RestoreError("CRIU did not report the restored pid", phase="restore",
                           cause=exc) from exc
    return Restored(pid)
