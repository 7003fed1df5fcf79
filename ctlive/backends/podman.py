"""podman containers: checkpoint archives, flattened so that image diff sees one
directory, and restored from the rebuilt archive."""

from __future__ import annotations

import contextlib
import pathlib
import time
from typing import Any

import anyio

from ctlive.backends.criu import run_runtime
from ctlive.backends.liveread import live_read_dump
from ctlive.backends.workload import Backend, DumpMethod, DumpResult, Restored
from ctlive.errors import CtliveError, Phase, RestoreError
from ctlive.images.criu_format import read_stats

__all__ = [
    "PodmanContainer",
    "restore_podman",
]

# Names in a flattened podman archive: top-level files get this prefix, the CRIU
# images of checkpoint/ keep their names, so image diff sees one flat directory.
_TOP = "podman+"


def _flatten(archive: pathlib.Path, out: pathlib.Path) -> None:
    import tarfile

    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.removeprefix("./")
            if not m.isfile():
                continue
            target = (name.removeprefix("checkpoint/") if name.startswith("checkpoint/")
                      else _TOP + name)
            if "/" in target:
                continue  # nested files (none in podman 4 archives) are not migrated
            src = tar.extractfile(m)
            assert src is not None
            (out / target).write_bytes(src.read())


def _unflatten(flat: pathlib.Path, archive: pathlib.Path) -> None:
    import tarfile

    with tarfile.open(archive, "w") as tar:
        for d in ("checkpoint", "artifacts"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for p in sorted(flat.iterdir()):
            if not p.is_file() or p.name.endswith(".log"):
                continue
            name = p.name[len(_TOP):] if p.name.startswith(_TOP) else f"checkpoint/{p.name}"
            tar.add(p, arcname=name)


class PodmanContainer(Backend):
    """A podman container, checkpointed with ``podman container checkpoint --export``.

    Iterations use ``--leave-running``. Podman cannot checkpoint a paused container,
    so the final dump stops it and keeps the exported archive; ``resume()`` (the
    abort path) restores the container locally from that archive. Podman's CRIU
    options cannot leave a restore stopped, so the destination pauses the restored
    container immediately (see docs/backends.md for what that window means).
    """

    kind = "podman"

    def __init__(self, name: str, *, live_read: bool = True) -> None:
        self.name = name
        self.live_read = live_read
        """Pre-copy by reading the container's memory while it runs (no freeze) instead
        of ``podman container checkpoint --leave-running``."""
        self._final_archive: pathlib.Path | None = None

    async def _dump(self, images_dir: pathlib.Path, *, final: bool,
                    parent: pathlib.Path | None) -> DumpResult:
        images_dir.mkdir(parents=True, exist_ok=True)
        phase = Phase.FINAL_DUMP if final else Phase.ITERATE
        if not final and self.live_read:
            pid = await run_runtime(["container", "inspect", "--format", "{{.State.Pid}}",
                                     self.name], phase=phase, tool="podman")
            return await live_read_dump(int(pid.strip()), images_dir)
        archive = images_dir.parent / f"{images_dir.name}.tar"
        t = time.monotonic()
        args = ["container", "checkpoint", "--export", str(archive), "--compress", "none"]
        if not final:
            args.append("--leave-running")
        await run_runtime([*args, self.name], phase=phase, tool="podman")
        duration = time.monotonic() - t
        if final:
            self._final_archive = archive
        await anyio.to_thread.run_sync(_flatten, archive, images_dir)
        if not final:
            archive.unlink()
        stats = None
        with contextlib.suppress(Exception):
            stats = read_stats(images_dir / "stats-dump")
        return DumpResult(duration, False, final, stats,
                          DumpMethod.FINAL if final else DumpMethod.DUMP)

    async def _resume(self) -> None:
        if self._final_archive is None:
            return
        await run_runtime(["rm", "--force", self.name], phase=Phase.ABORT, tool="podman")
        await run_runtime(["container", "restore", "--import", str(self._final_archive), "--name",
                           self.name], phase=Phase.ABORT, tool="podman")

    async def _kill(self) -> None:
        await run_runtime(["rm", "--force", "--time", "0", self.name], phase=Phase.COMMIT,
                          tool="podman")

    def restore_spec(self) -> dict[str, Any]:
        return {"name": self.name}


class _PodmanRestored(Restored):
    async def resume(self) -> None:
        assert self._id is not None
        await run_runtime(["unpause", self._id], phase=Phase.COMMIT, tool="podman")

    async def discard(self) -> None:
        with contextlib.suppress(CtliveError):
            await run_runtime(["rm", "--force", "--time", "0", self._id or ""], phase=Phase.ABORT,
                              tool="podman")


async def restore_podman(images_dir: pathlib.Path, spec: dict[str, Any],
                         external_map: dict[str, str]) -> Restored:
    name = spec.get("name")
    if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
        raise RestoreError("bad podman restore spec", phase=Phase.RESTORE)
    archive = images_dir.parent / "restore.tar"
    await anyio.to_thread.run_sync(_unflatten, images_dir, archive)
    new_name = f"{name}-{images_dir.parent.name[:8]}"
    await run_runtime(["container", "restore", "--import", str(archive), "--name", new_name],
                      phase=Phase.RESTORE, tool="podman")
    # Not atomic: the container runs for the moment between restore and pause.
    await run_runtime(["pause", new_name], phase=Phase.RESTORE, tool="podman")
    pid = int((await run_runtime(["inspect", new_name, "--format", "{{.State.Pid}}"],
                                 phase=Phase.RESTORE, tool="podman")).strip())
    return _PodmanRestored(pid, container_id=new_name)
